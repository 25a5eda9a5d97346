"""Logit parity of the Flax decoder with transformers' PyTorch models."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_models
from xfusion_jax import llm
from xfusion_jax import sharding
from xfusion_jax.llm import model as model_lib

TOLERANCE = 1e-4
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small, so that the scaled band covers frequencies a 40-token input uses.
    "original_max_position_embeddings": 8,
}


def _inputs(vocab_size=128, batch=2, seq=hf_models.SEQ_LEN, seed=0):
  return np.random.default_rng(seed).integers(3, vocab_size, (batch, seq))


def _max_logit_error(hf_model, model_dir, **load_kwargs):
  input_ids = _inputs()
  expected = hf_models.reference_logits(hf_model, input_ids)
  lm = llm.from_pretrained(model_dir, dtype="float32", load_tokenizer=False,
                           **load_kwargs)
  actual = np.asarray(lm.logits(input_ids))
  assert actual.shape == expected.shape
  return float(np.abs(actual - expected).max())


MATRIX = [
    pytest.param(kv_heads, tied, rope_scaling,
                 id=f"kv{kv_heads}-{'tied' if tied else 'untied'}-"
                 f"{'llama3' if rope_scaling else 'plain'}")
    for kv_heads in (1, 2, 8)
    for tied in (False, True)
    for rope_scaling in (None, LLAMA3_ROPE)
]


@pytest.mark.parametrize("kv_heads,tied,rope_scaling", MATRIX)
def test_llama_matrix(tmp_path, kv_heads, tied, rope_scaling):
  config = hf_models.tiny_config(
      "llama", num_key_value_heads=kv_heads, tie_word_embeddings=tied,
      rope_scaling=rope_scaling, rope_theta=500000.0)
  model = hf_models.build_model(config)
  hf_models.save_model(model, tmp_path)
  assert _max_logit_error(model, tmp_path) <= TOLERANCE


def test_llama3_scaling_changes_logits(tmp_path):
  plain = hf_models.build_model(hf_models.tiny_config("llama"))
  hf_models.save_model(plain, tmp_path / "plain")
  scaled_config = json.loads((tmp_path / "plain" / "config.json").read_text())
  scaled_config["rope_parameters"] = dict(LLAMA3_ROPE, rope_theta=10000.0)
  (tmp_path / "plain" / "config.json").write_text(json.dumps(scaled_config))
  scaled = llm.from_pretrained(tmp_path / "plain", dtype="float32",
                               load_tokenizer=False)
  input_ids = _inputs()
  difference = np.abs(
      np.asarray(scaled.logits(input_ids)) -
      hf_models.reference_logits(plain, input_ids)).max()
  # Ten times the parity tolerance: a loader that ignored the scaling would
  # fail the llama3 cases of the matrix above.
  assert difference > 10 * TOLERANCE, "llama3 scaling had no effect on logits"


def test_llama_biases(tmp_path):
  config = hf_models.tiny_config("llama", attention_bias=True, mlp_bias=True)
  model = hf_models.build_model(config)
  hf_models.save_model(model, tmp_path)
  assert _max_logit_error(model, tmp_path) <= TOLERANCE


def test_qwen2_with_biases(tmp_path):
  model = hf_models.build_model(hf_models.tiny_config("qwen2"))
  assert float(model.model.layers[0].self_attn.q_proj.bias.detach().abs().min()) > 0
  hf_models.save_model(model, tmp_path)
  assert _max_logit_error(model, tmp_path) <= TOLERANCE


def test_qwen2_without_attention_bias_key(tmp_path):
  model = hf_models.build_model(hf_models.tiny_config("qwen2"))
  hf_models.save_model(model, tmp_path)
  config_path = tmp_path / "config.json"
  config = json.loads(config_path.read_text())
  config.pop("attention_bias", None)
  config_path.write_text(json.dumps(config))
  assert _max_logit_error(model, tmp_path) <= TOLERANCE


def test_mistral_sliding_window(tmp_path):
  # A window shorter than the input makes the sliding mask matter.
  model = hf_models.build_model(
      hf_models.tiny_config("mistral", sliding_window=8))
  hf_models.save_model(model, tmp_path)
  assert _max_logit_error(model, tmp_path) <= TOLERANCE


def test_sharded_checkpoint(tmp_path):
  model = hf_models.build_model(hf_models.tiny_config("llama"))
  hf_models.save_model(model, tmp_path, max_shard_size="30KB")
  assert (tmp_path / "model.safetensors.index.json").exists()
  assert _max_logit_error(model, tmp_path) <= TOLERANCE


def test_unreferenced_files_ignored(tmp_path):
  model = hf_models.build_model(hf_models.tiny_config("llama"))
  hf_models.save_model(model, tmp_path, max_shard_size="30KB")
  (tmp_path / "stale-00001-of-00001.safetensors").write_bytes(b"not used")
  assert _max_logit_error(model, tmp_path) <= TOLERANCE


def test_classic_rope_keys(tmp_path):
  """transformers 4.x writes rope_theta and rope_scaling, not rope_parameters."""
  config = hf_models.tiny_config("llama", rope_scaling=LLAMA3_ROPE,
                                 rope_theta=500000.0)
  model = hf_models.build_model(config)
  hf_models.save_model(model, tmp_path)
  config_path = tmp_path / "config.json"
  source = json.loads(config_path.read_text())
  parameters = source.pop("rope_parameters")
  source["rope_theta"] = parameters.pop("rope_theta")
  source["rope_scaling"] = parameters
  config_path.write_text(json.dumps(source))
  assert _max_logit_error(model, tmp_path) <= TOLERANCE


def test_mesh_matches_single_device(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top

  assert jax.device_count() == 8, "tests need 8 simulated CPU devices"
  model = hf_models.build_model(
      hf_models.tiny_config("llama", num_key_value_heads=2))
  hf_models.save_model(model, tmp_path)
  input_ids = _inputs(batch=4)
  single = llm.from_pretrained(tmp_path, dtype="float32",
                               load_tokenizer=False)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sharded = llm.from_pretrained(tmp_path, dtype="float32", mesh=mesh,
                                load_tokenizer=False)
  q_kernel = sharded.weights["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q_kernel.sharding.spec == jax.sharding.PartitionSpec(
      None, "fsdp", "tensor", None)
  assert len(q_kernel.addressable_shards[0].data.shape) == 4
  assert q_kernel.addressable_shards[0].data.shape[2] == 4
  np.testing.assert_allclose(
      np.asarray(sharded.logits(input_ids)),
      np.asarray(single.logits(input_ids)), atol=1e-5, rtol=0)


def test_mesh_other_shape(tmp_path):
  """A KV-head count below the tensor axis size is replicated, not refused."""
  model = hf_models.build_model(
      hf_models.tiny_config("llama", num_key_value_heads=1))
  hf_models.save_model(model, tmp_path)
  mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4})
  sharded = llm.from_pretrained(tmp_path, dtype="float32", mesh=mesh,
                                load_tokenizer=False)
  input_ids = _inputs(batch=2)
  expected = hf_models.reference_logits(model, input_ids)
  assert np.abs(np.asarray(sharded.logits(input_ids)) -
                expected).max() <= TOLERANCE


@pytest.mark.parametrize("equation, x_shape, kernel_shape", [
    ("bsd,df->bsf", (2, 5, 6), (6, 7)),
    ("bsd,dhk->bshk", (2, 5, 6), (6, 3, 4)),
    ("bshk,hkd->bsd", (2, 5, 3, 4), (3, 4, 6)),
    ("bsd,vd->bsv", (2, 5, 6), (9, 6)),
    ("bd,df->bf", (2, 6), (6, 7)),
    ("bsd,bdf->bsf", (2, 5, 6), (2, 6, 7)),
])
@pytest.mark.parametrize("merge", [True, False])
def test_token_einsum_values_and_grads(equation, x_shape, kernel_shape, merge):
  rng = np.random.default_rng(0)
  x = rng.standard_normal(x_shape).astype(np.float32)
  kernel = rng.standard_normal(kernel_shape).astype(np.float32)
  cotangent = rng.standard_normal(
      np.einsum(equation, x, kernel).shape).astype(np.float32)

  def loss(fn):
    return lambda x, k: (fn(equation, x, k) * cotangent).sum()

  with model_lib.merge_token_axes(merge):
    ours = jax.value_and_grad(loss(model_lib.token_einsum), (0, 1))(x, kernel)
    values = model_lib.token_einsum(equation, x, kernel)
  plain = jax.value_and_grad(loss(jnp.einsum), (0, 1))(x, kernel)
  np.testing.assert_allclose(values, np.einsum(equation, x, kernel),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ours[0], plain[0], rtol=1e-5)
  np.testing.assert_allclose(ours[1][0], plain[1][0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ours[1][1], plain[1][1], rtol=1e-5, atol=1e-5)
