"""Gemma 3 text models against transformers: logits, decoding, export."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import hf_models
from xfusion_jax import llm
from xfusion_jax import sharding
from xfusion_jax.llm import model as model_lib

TOLERANCE = 1e-4


def _inputs(batch=2, seq=hf_models.SEQ_LEN, seed=0):
  return np.random.default_rng(seed).integers(3, 128, (batch, seq))


def _saved(tmp_path, seed=0, **overrides):
  model = hf_models.build_model(hf_models.tiny_gemma3_config(**overrides),
                                seed=seed)
  return model, hf_models.save_model(model, tmp_path / "gemma3")


def _max_logit_error(hf_model, model_dir, **load_kwargs):
  input_ids = _inputs()
  expected = hf_models.reference_logits(hf_model, input_ids)
  lm = llm.from_pretrained(model_dir, dtype="float32", load_tokenizer=False,
                           **load_kwargs)
  actual = np.asarray(lm.logits(input_ids))
  assert actual.shape == expected.shape
  return float(np.abs(actual - expected).max())


def _edit_config(model_dir, edit):
  path = model_dir / "config.json"
  config = json.loads(path.read_text())
  edit(config)
  path.write_text(json.dumps(config))


@pytest.mark.parametrize("kv_heads,tied", [
    pytest.param(kv, tied, id=f"kv{kv}-{'tied' if tied else 'untied'}")
    for kv in (1, 2) for tied in (True, False)
])
def test_gemma3_matrix(tmp_path, kv_heads, tied):
  model, path = _saved(tmp_path, num_key_value_heads=kv_heads,
                       tie_word_embeddings=tied)
  config = llm.load_config(path)
  assert config.sliding_window < hf_models.SEQ_LEN
  assert config.layer_types.count("full_attention") == 1
  assert _max_logit_error(model, path) <= TOLERANCE


def test_gemma3_parsed_config(tmp_path):
  _, path = _saved(tmp_path)
  config = llm.load_config(path)
  assert config.model_type == "gemma3_text"
  assert config.rope.theta == 1e6
  assert config.sliding_rope.theta == 1e4
  assert config.hidden_act == "gelu_pytorch_tanh"
  assert config.attention_scale == 24**-0.5
  assert config.embed_scale == 8.0
  assert config.norm_unit_offset
  assert config.qk_norm
  assert config.sandwich_norms
  assert config.final_logit_softcapping is None


def test_gemma3_swapped_rope_bases_change_logits(tmp_path):
  """Local and global RoPE bases each matter, so a mix-up cannot pass."""
  model, path = _saved(tmp_path)

  def swap(config):
    parameters = config["rope_parameters"]
    parameters["full_attention"], parameters["sliding_attention"] = (
        parameters["sliding_attention"], parameters["full_attention"])

  _edit_config(path, swap)
  # Ten times the parity tolerance: a loader that used one base for every
  # layer would fail the matrix above.
  assert _max_logit_error(model, path) > 10 * TOLERANCE


def test_gemma3_classic_rope_keys(tmp_path):
  """transformers 4.x writes rope_theta and rope_local_base_freq instead."""
  model, path = _saved(
      tmp_path,
      rope_parameters={
          "full_attention": {"rope_type": "linear", "factor": 4.0,
                             "rope_theta": 5e4},
          "sliding_attention": {"rope_type": "default", "rope_theta": 300.0},
      })

  def to_classic(config):
    parameters = config.pop("rope_parameters")
    config["rope_theta"] = parameters["full_attention"]["rope_theta"]
    config["rope_scaling"] = {"rope_type": "linear", "factor": 4.0}
    config["rope_local_base_freq"] = (
        parameters["sliding_attention"]["rope_theta"])

  _edit_config(path, to_classic)
  config = llm.load_config(path)
  assert (config.rope.theta, config.rope.rope_type, config.rope.factor) == (
      5e4, "linear", 4.0)
  assert config.sliding_rope.theta == 300.0
  assert _max_logit_error(model, path) <= TOLERANCE


def test_gemma3_final_logit_softcapping(tmp_path):
  cap = 0.5
  model, path = _saved(tmp_path, final_logit_softcapping=cap)
  assert _max_logit_error(model, path) <= TOLERANCE
  input_ids = _inputs()
  capped = llm.from_pretrained(path, dtype="float32", load_tokenizer=False)
  capped_logits = np.asarray(capped.logits(input_ids))
  assert np.abs(capped_logits).max() <= cap
  _edit_config(path, lambda c: c.update(final_logit_softcapping=None))
  plain = llm.from_pretrained(path, dtype="float32", load_tokenizer=False)
  # The cap must change these logits for the parity check to cover it.
  assert np.abs(np.asarray(plain.logits(input_ids))).max() > 2 * cap


def test_gemma3_default_layer_pattern(tmp_path):
  """Without layer_types, every 6th layer is global, as in transformers."""
  model, path = _saved(tmp_path, num_hidden_layers=7, layer_types=None)
  _edit_config(path, lambda c: c.pop("layer_types"))
  config = llm.load_config(path)
  assert config.layer_types == ("sliding_attention",) * 5 + (
      "full_attention", "sliding_attention")
  assert _max_logit_error(model, path) <= TOLERANCE


def test_gemma3_sharded_checkpoint(tmp_path):
  model, path = _saved(tmp_path)
  hf_models.save_model(model, path, max_shard_size="30KB")
  assert (path / "model.safetensors.index.json").exists()
  assert _max_logit_error(model, path) <= TOLERANCE


def test_gemma3_mesh_matches_single_device(tmp_path):
  assert jax.device_count() == 8, "tests need 8 simulated CPU devices"
  _, path = _saved(tmp_path, num_key_value_heads=2)
  input_ids = _inputs(batch=4)
  single = llm.from_pretrained(path, dtype="float32", load_tokenizer=False)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sharded = llm.from_pretrained(path, dtype="float32", mesh=mesh,
                                load_tokenizer=False)
  q_norm = sharded.weights["model"]["layers"]["self_attn"]["q_norm"]["scale"]
  assert q_norm.shape == (4, 16)
  np.testing.assert_allclose(
      np.asarray(sharded.logits(input_ids)),
      np.asarray(single.logits(input_ids)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,value,message", [
    ("attn_logit_softcapping", 50.0, "Unsupported attn_logit_softcapping"),
    ("use_bidirectional_attention", True,
     "Unsupported use_bidirectional_attention"),
    ("hidden_activation", "relu", "Unsupported activation 'relu'"),
])
def test_gemma3_unsupported_settings(tmp_path, name, value, message):
  _, path = _saved(tmp_path)
  _edit_config(path, lambda c: c.update({name: value}))
  with pytest.raises(ValueError, match=message):
    llm.from_pretrained(path, load_tokenizer=False)


def test_gemma3_multimodal_config_rejected(tmp_path):
  _, path = _saved(tmp_path)

  def nest(config):
    text_config = dict(config)
    config.clear()
    config.update(model_type="gemma3", text_config=text_config)

  _edit_config(path, nest)
  with pytest.raises(ValueError, match="Unsupported model_type 'gemma3'"):
    llm.from_pretrained(path, load_tokenizer=False)


@pytest.fixture(name="tiny", scope="module")
def fixture_tiny(tmp_path_factory):
  # Prompt + generation (9 + 12) exceed the window of 8, so the windowed mask
  # inside the cache is exercised.
  model = hf_models.build_model(
      hf_models.tiny_gemma3_config(num_key_value_heads=2), seed=3)
  path = hf_models.save_model(model, tmp_path_factory.mktemp("gemma3"))
  lm = llm.from_pretrained(path, dtype="float32", load_tokenizer=False)
  return model, lm


def _left_padded_batch():
  rng = np.random.default_rng(7)
  lengths = [9, 5, 7]
  width = max(lengths)
  input_ids = np.zeros((len(lengths), width), np.int32)
  mask = np.zeros_like(input_ids)
  for row, length in enumerate(lengths):
    input_ids[row, width - length:] = rng.integers(3, 128, length)
    mask[row, width - length:] = 1
  return input_ids, mask


def test_gemma3_cached_decode_equals_recompute(tiny):
  _, lm = tiny
  module, variables = lm.module, lm.variables
  input_ids, mask = _left_padded_batch()
  batch, prompt_len = input_ids.shape
  steps = 12
  key_valid = np.concatenate([mask, np.ones((batch, steps), np.int32)], 1)
  positions = model_lib.positions_from_mask(jnp.asarray(mask))
  cache = model_lib.init_cache(lm.config, batch, prompt_len + steps,
                               jnp.float32)
  apply = jax.jit(module.apply)
  logits, cache = apply(variables, input_ids, positions,
                        jnp.asarray(key_valid, bool), cache, 0)
  sequence, sequence_mask = input_ids, mask
  next_position = positions[:, -1] + 1
  for step in range(steps):
    token = np.asarray(jnp.argmax(logits[:, -1], -1), np.int32)
    sequence = np.concatenate([sequence, token[:, None]], 1)
    sequence_mask = np.concatenate([sequence_mask, np.ones((batch, 1))], 1)
    full = np.asarray(lm.logits(sequence, sequence_mask))[:, -1]
    logits, cache = apply(variables, token[:, None], next_position[:, None],
                          jnp.asarray(key_valid, bool), cache,
                          prompt_len + step)
    next_position = next_position + 1
    np.testing.assert_allclose(np.asarray(logits[:, -1]), full, atol=1e-5,
                               rtol=0, err_msg=f"step {step}")


def test_gemma3_greedy_matches_transformers(tiny):
  model, lm = tiny
  input_ids, mask = _left_padded_batch()
  new_tokens = 16
  ours = lm.generate(input_ids, mask, max_new_tokens=new_tokens)
  with torch.no_grad():
    reference = model.generate(
        input_ids=torch.as_tensor(input_ids, dtype=torch.long),
        attention_mask=torch.as_tensor(mask),
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
        pad_token_id=0, eos_token_id=None)[:, input_ids.shape[1]:].numpy()
  # The EOS id of the tiny model (1) can come up by chance; compare up to it.
  for row in range(len(ours)):
    expected = list(reference[row])
    if 1 in expected:
      expected = expected[:expected.index(1) + 1]
    assert list(ours[row][:len(expected)]) == expected, f"row {row}"


@pytest.mark.parametrize("tied", [True, False])
def test_gemma3_export_roundtrip(tmp_path, tied):
  source, path = _saved(tmp_path, tie_word_embeddings=tied,
                        final_logit_softcapping=30.0)
  lm = llm.from_pretrained(path, dtype="float32", load_tokenizer=False)
  llm.save_pretrained(lm, tmp_path / "export", max_shard_size="40KB")
  assert (tmp_path / "export" / "model.safetensors.index.json").exists()
  # Eager attention as in the source model, so that equal weights must give
  # bit-identical logits.
  reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / "export", output_loading_info=True, dtype="auto",
      attn_implementation="eager")
  for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
    assert not info[kind], f"{kind}: {info[kind]}"
  assert type(reloaded).__name__ == "Gemma3ForCausalLM"
  assert reloaded.config.rope_parameters == source.config.rope_parameters
  assert reloaded.config.layer_types == source.config.layer_types
  assert reloaded.config.final_logit_softcapping == 30.0
  expected = source.state_dict()
  actual = reloaded.eval().state_dict()
  assert set(actual) == set(expected)
  for name, tensor in expected.items():
    assert torch.equal(actual[name], tensor), f"{name} changed in export"
  input_ids = _inputs(seed=1)
  np.testing.assert_array_equal(
      hf_models.reference_logits(reloaded, input_ids),
      hf_models.reference_logits(source, input_ids))
