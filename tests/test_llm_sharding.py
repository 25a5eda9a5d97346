"""Exact results of the frozen LLM on meshes that do not divide its axes.

A KV-head count below the `tensor` axis size is replicated, and a vocabulary
that the `tensor` axis does not divide is padded. Both must give the logits,
the loss and the exported checkpoint of the unsharded model.
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec
import numpy as np
import optax
import pytest
import safetensors.numpy
import transformers

import hf_models
from xfusion_jax import llm
from xfusion_jax import sharding
from xfusion_jax.llm import config as config_lib
from xfusion_jax.llm import model as model_lib

# Not divisible by 2, 4 or 8, so every `tensor` axis larger than 1 pads it.
ODD_VOCAB = 101
# Differences between the sharded and unsharded float32 runs come only from
# the order of partial sums.
ATOL = 1e-5


def _inputs(vocab_size, batch=4, seq=hf_models.SEQ_LEN, seed=0):
  return np.random.default_rng(seed).integers(3, vocab_size, (batch, seq))


def _save(tmp_path, name, **overrides):
  model = hf_models.build_model(hf_models.tiny_config("llama", **overrides))
  return model, hf_models.save_model(model, tmp_path / name)


def _load(model_dir, mesh=None):
  return llm.from_pretrained(model_dir, dtype="float32", mesh=mesh,
                             load_tokenizer=False)


def _padded_logits(lm, input_ids):
  """Return the module's logits with the padding columns kept."""
  ids = jnp.asarray(input_ids, jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)

  def forward(variables):
    key_valid = jnp.ones(ids.shape, bool)
    return lm.module.apply(variables, ids, positions, key_valid)[0]

  with jax.set_mesh(lm.mesh):
    return np.asarray(jax.jit(forward)(lm.variables))


@pytest.mark.parametrize("mesh_shape", [{"fsdp": 2, "tensor": 4},
                                        {"tensor": 8}],
                         ids=["fsdp2-tensor4", "tensor8"])
def test_kv_heads_below_tensor_replicated(tmp_path, mesh_shape):
  _, model_dir = _save(tmp_path, "kv2", num_key_value_heads=2)
  mesh = sharding.make_mesh(mesh_shape)
  sharded = _load(model_dir, mesh)
  single = _load(model_dir)

  attention = sharded.weights["model"]["layers"]["self_attn"]
  # [layers, embed, heads, head_dim]: query heads split over `tensor`, the
  # two KV heads copied to every `tensor` shard.
  assert attention["q_proj"]["kernel"].sharding.spec == PartitionSpec(
      None, "fsdp", "tensor", None)
  assert attention["k_proj"]["kernel"].sharding.spec == PartitionSpec(
      None, "fsdp", None, None)
  assert attention["v_proj"]["kernel"].sharding.spec == PartitionSpec(
      None, "fsdp", None, None)

  input_ids = _inputs(128)
  np.testing.assert_allclose(np.asarray(sharded.logits(input_ids)),
                             np.asarray(single.logits(input_ids)), atol=ATOL,
                             rtol=0)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_vocab_padded_logits_match(tmp_path, tied):
  hf_model, model_dir = _save(tmp_path, "odd", vocab_size=ODD_VOCAB,
                              tie_word_embeddings=tied)
  mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4})
  sharded = _load(model_dir, mesh)
  single = _load(model_dir)

  assert single.config.vocab_padding == 0
  assert sharded.config.vocab_padding == 3
  embed = sharded.weights["model"]["embed_tokens"]
  assert embed.shape == (104, 64)
  assert embed.sharding.spec == PartitionSpec("tensor", "fsdp")
  np.testing.assert_array_equal(np.asarray(embed)[ODD_VOCAB:], 0)
  if not tied:
    head = sharded.weights["lm_head"]["kernel"]
    assert head.shape == (64, 104)
    assert head.sharding.spec == PartitionSpec("fsdp", "tensor")

  input_ids = _inputs(ODD_VOCAB)
  logits = np.asarray(sharded.logits(input_ids))
  assert logits.shape == (4, hf_models.SEQ_LEN, ODD_VOCAB)
  np.testing.assert_allclose(logits, np.asarray(single.logits(input_ids)),
                             atol=ATOL, rtol=0)
  expected = hf_models.reference_logits(hf_model, input_ids)
  assert np.abs(logits - expected).max() <= 1e-4

  padded = _padded_logits(sharded, input_ids)
  assert padded.shape[-1] == 104
  np.testing.assert_array_equal(padded[..., ODD_VOCAB:],
                                np.finfo(np.float32).min)


def test_vocab_padding_excluded_from_loss(tmp_path):
  _, model_dir = _save(tmp_path, "odd", vocab_size=ODD_VOCAB)
  sharded = _load(model_dir, sharding.make_mesh({"tensor": 8}))
  single = _load(model_dir)
  input_ids = _inputs(ODD_VOCAB)
  targets = jnp.asarray(np.roll(input_ids, -1, axis=1))

  padded = jnp.asarray(_padded_logits(sharded, input_ids))
  unpadded = jnp.asarray(_padded_logits(single, input_ids))
  assert padded.shape[-1] == 104
  assert unpadded.shape[-1] == ODD_VOCAB
  padded_loss = optax.softmax_cross_entropy_with_integer_labels(
      padded, targets)
  unpadded_loss = optax.softmax_cross_entropy_with_integer_labels(
      unpadded, targets)
  np.testing.assert_allclose(padded_loss, unpadded_loss, rtol=1e-6, atol=1e-6)
  probabilities = jax.nn.softmax(padded, axis=-1)
  np.testing.assert_array_equal(probabilities[..., ODD_VOCAB:], 0)

  # Gradients reach no padded column, so training never moves them.
  grads = jax.grad(lambda x: optax.softmax_cross_entropy_with_integer_labels(
      x, targets).sum())(padded)
  np.testing.assert_array_equal(grads[..., ODD_VOCAB:], 0)


def test_padded_logits_never_win():
  config = config_lib.config_from_dict(
      hf_models.tiny_config("llama", vocab_size=ODD_VOCAB,
                            tie_word_embeddings=True).to_dict())
  config = dataclasses.replace(config, vocab_padding=3)
  rng = np.random.default_rng(0)
  table = rng.normal(size=(104, 64)).astype(np.float32)
  # Padding rows far larger than any real row: unmasked, they would win
  # every argmax below.
  table[ODD_VOCAB:] = 100.0 * np.abs(table[ODD_VOCAB:])
  hidden = np.abs(rng.normal(size=(2, 5, 64))).astype(np.float32)

  logits = np.asarray(model_lib.vocab_logits(
      config, jnp.asarray(hidden), jnp.float32, jnp.asarray(table)))
  unmasked = np.asarray(model_lib.vocab_logits(
      dataclasses.replace(config, vocab_padding=0), jnp.asarray(hidden),
      jnp.float32, jnp.asarray(table)))
  assert (unmasked.argmax(-1) >= ODD_VOCAB).all()
  assert (logits.argmax(-1) < ODD_VOCAB).all()
  np.testing.assert_array_equal(logits[..., :ODD_VOCAB],
                                unmasked[..., :ODD_VOCAB])


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_padded_export_strips_padding(tmp_path, tied):
  hf_model, model_dir = _save(tmp_path, "odd", vocab_size=ODD_VOCAB,
                              tie_word_embeddings=tied)
  sharded = _load(model_dir, sharding.make_mesh({"fsdp": 2, "tensor": 4}))
  assert sharded.config.vocab_padding == 3
  out = tmp_path / "export"
  llm.save_pretrained(sharded, out)

  exported = safetensors.numpy.load_file(out / "model.safetensors")
  original = safetensors.numpy.load_file(model_dir / "model.safetensors")
  names = ["model.embed_tokens.weight"] + ([] if tied else ["lm_head.weight"])
  for name in names:
    assert exported[name].shape == (ODD_VOCAB, 64), name
    np.testing.assert_array_equal(exported[name], original[name])

  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      out, attn_implementation="eager")
  assert reloaded.config.vocab_size == ODD_VOCAB
  input_ids = _inputs(ODD_VOCAB)
  np.testing.assert_array_equal(
      hf_models.reference_logits(reloaded, input_ids),
      hf_models.reference_logits(hf_model, input_ids))
