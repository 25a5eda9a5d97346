"""KV-cache decoding and sampling against full recomputation and transformers."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_models
from xfusion_jax import llm
from xfusion_jax.llm import model as model_lib
from xfusion_jax.llm import sampling


@pytest.fixture(name="tiny", scope="module")
def fixture_tiny(tmp_path_factory):
  # A sliding window shorter than prompt + generation also covers the
  # windowed mask inside the cache.
  config = hf_models.tiny_config("mistral", sliding_window=12,
                                 num_key_value_heads=2)
  model = hf_models.build_model(config, seed=3)
  path = hf_models.save_model(model, tmp_path_factory.mktemp("tiny"))
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


def test_cached_decode_equals_recompute(tiny):
  """Each cached step's logits equal a full forward pass over the prefix."""
  _, lm = tiny
  module, variables = lm.module, lm.variables
  input_ids, mask = _left_padded_batch()
  batch, prompt_len = input_ids.shape
  steps = 12
  total = prompt_len + steps
  key_valid = np.concatenate([mask, np.ones((batch, steps), np.int32)], 1)
  positions = model_lib.positions_from_mask(jnp.asarray(mask))
  cache = model_lib.init_cache(lm.config, batch, total, jnp.float32)
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


@pytest.fixture(name="tiny_tied", scope="module")
def fixture_tiny_tied(tmp_path_factory):
  config = hf_models.tiny_config("llama", tie_word_embeddings=True)
  model = hf_models.build_model(config, seed=5)
  path = hf_models.save_model(model, tmp_path_factory.mktemp("tiny_tied"))
  return model, llm.from_pretrained(path, dtype="float32",
                                    load_tokenizer=False)


def _stacked(arrays):
  return np.stack(arrays) if isinstance(arrays, tuple) else np.asarray(arrays)


@pytest.mark.parametrize("model_name", ["tiny", "tiny_tied"])
def test_decoding_model_equals_scan(model_name, request):
  """The CPU decoding model equals the scanned stack over prefill and a step.

  Three variants: the scan with a stacked cache (the reference), the layer
  loop with a stacked cache, and what `generate` runs on CPU (layer loop,
  per-layer cache and a separate LM head weight, also for a tied model).
  """
  _, lm = request.getfixturevalue(model_name)
  input_ids, mask = _left_padded_batch()
  batch, prompt_len = input_ids.shape
  positions = model_lib.positions_from_mask(jnp.asarray(mask))
  key_valid = jnp.asarray(
      np.concatenate([mask, np.ones((batch, 4), np.int32)], 1), bool)
  decoding = {model_lib.FROZEN: model_lib.decoding_weights(lm.config,
                                                           lm.weights)}
  assert "layers" not in decoding[model_lib.FROZEN]["model"]
  if lm.config.tie_word_embeddings:
    np.testing.assert_array_equal(
        decoding[model_lib.FROZEN]["lm_head"]["kernel"],
        np.asarray(lm.weights["model"]["embed_tokens"]).T)
  variants = [
      (lm.module, lm.variables, False),
      (lm.module.clone(scan_layers=False),
       {model_lib.FROZEN: model_lib.unstack_layers(lm.weights)}, False),
      (lm.module.clone(scan_layers=False, untie_head=True), decoding, True),
  ]
  results = []
  for module, variables, per_layer in variants:
    apply = jax.jit(module.apply)
    cache = model_lib.init_cache(lm.config, batch, prompt_len + 4,
                                 jnp.float32, per_layer=per_layer)
    assert isinstance(cache.keys, tuple) == per_layer
    logits, cache = apply(variables, input_ids, positions, key_valid, cache,
                          0)
    token = jnp.argmax(logits[:, -1:], -1).astype(jnp.int32)
    step_logits, cache = apply(variables, token, positions[:, -1:] + 1,
                               key_valid, cache, prompt_len)
    results.append((logits, step_logits, _stacked(cache.keys),
                    _stacked(cache.values)))
  for variant in results[1:]:
    for ours, reference in zip(variant, results[0]):
      np.testing.assert_allclose(np.asarray(ours), np.asarray(reference),
                                 atol=1e-5, rtol=1e-5)


def test_per_layer_cache_needs_layer_loop(tiny):
  _, lm = tiny
  cache = model_lib.init_cache(lm.config, 1, 8, jnp.float32, per_layer=True)
  ids = jnp.ones((1, 2), jnp.int32)
  with pytest.raises(ValueError, match="scan_layers=False"):
    lm.module.apply(lm.variables, ids, jnp.arange(2)[None],
                    jnp.ones((1, 8), bool), cache, 0)


@pytest.mark.parametrize("model_name", ["tiny", "tiny_tied"])
def test_greedy_matches_transformers(model_name, request):
  model, lm = request.getfixturevalue(model_name)
  input_ids, mask = _left_padded_batch()
  new_tokens = 16
  ours = lm.generate(input_ids, mask, max_new_tokens=new_tokens)
  with torch.no_grad():
    reference = model.generate(
        input_ids=torch.as_tensor(input_ids, dtype=torch.long),
        attention_mask=torch.as_tensor(mask),
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
        pad_token_id=0, eos_token_id=None)[:, input_ids.shape[1]:].numpy()
  # The EOS id of the tiny model (2) can come up by chance; compare up to it.
  for row in range(len(ours)):
    expected = list(reference[row])
    if 2 in expected:
      expected = expected[:expected.index(2) + 1]
    assert list(ours[row][:len(expected)]) == expected, f"row {row}"


def test_left_padding_equals_unpadded(tiny):
  _, lm = tiny
  input_ids, mask = _left_padded_batch()
  batched = lm.generate(input_ids, mask, max_new_tokens=8)
  for row in range(len(input_ids)):
    alone = input_ids[row][mask[row] == 1][None]
    np.testing.assert_array_equal(
        lm.generate(alone, max_new_tokens=8)[0], batched[row])


def test_stops_at_eos(tiny):
  _, lm = tiny
  input_ids, mask = _left_padded_batch()
  first = lm.generate(input_ids, mask, max_new_tokens=1)[:, 0]
  lm.generation_config = {"eos_token_id": int(first[0]), "pad_token_id": 0}
  try:
    tokens = lm.generate(input_ids, mask, max_new_tokens=6)
  finally:
    lm.generation_config = {}
  assert tokens[0, 0] == first[0]
  assert (tokens[0, 1:] == 0).all()


def test_replaced_weights_decode_fresh(tiny):
  """A copy with other weights never decodes with the first copy's cache."""
  _, lm = tiny
  input_ids, mask = _left_padded_batch()
  lm.generate(input_ids, mask, max_new_tokens=2)
  other = dataclasses.replace(
      lm, weights=jax.tree.map(lambda w: -w, lm.weights))
  tokens = other.generate(input_ids, mask, max_new_tokens=3)
  sequence, sequence_mask = input_ids, mask
  for _ in range(3):
    logits = np.asarray(other.logits(sequence, sequence_mask))[:, -1]
    sequence = np.concatenate(
        [sequence, logits.argmax(-1).astype(np.int32)[:, None]], 1)
    sequence_mask = np.concatenate([sequence_mask, np.ones_like(mask[:, :1])],
                                   1)
  # The EOS id of the tiny model (2) can come up by chance; compare up to it.
  for row, expected in enumerate(sequence[:, -3:].tolist()):
    if 2 in expected:
      expected = expected[:expected.index(2) + 1]
    assert tokens[row][:len(expected)].tolist() == expected, f"row {row}"


def test_sampling_filters():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
  rng = jax.random.key(0)
  greedy = sampling.sample_tokens(logits, rng, 0.0, 0, 1.0)
  assert (np.asarray(greedy) == 0).all()
  top_k = np.asarray(sampling.sample_tokens(logits, rng, 1.0, 2, 1.0))
  assert set(top_k.tolist()) == {0, 1}
  # Nucleus 0.7: tokens 0 and 1 (mass 0.8) are kept, 2 and 3 dropped.
  top_p = np.asarray(sampling.sample_tokens(logits, rng, 1.0, 0, 0.7))
  assert set(top_p.tolist()) == {0, 1}
  assert abs((top_p == 0).mean() - 0.5 / 0.8) < 0.03
  plain = np.asarray(sampling.sample_tokens(logits, rng, 1.0, 0, 1.0))
  frequencies = np.bincount(plain, minlength=4) / len(plain)
  np.testing.assert_allclose(frequencies, [0.5, 0.3, 0.15, 0.05], atol=0.03)


def test_sampled_generation_seeded(tiny):
  _, lm = tiny
  input_ids, mask = _left_padded_batch()
  kwargs = dict(max_new_tokens=8, temperature=0.8, top_k=20, top_p=0.9)
  first = lm.generate(input_ids, mask, seed=1, **kwargs)
  np.testing.assert_array_equal(first,
                                lm.generate(input_ids, mask, seed=1, **kwargs))
  assert not np.array_equal(first, lm.generate(input_ids, mask, seed=2,
                                               **kwargs))


def test_invalid_sampling_settings(tiny):
  _, lm = tiny
  with pytest.raises(ValueError, match="top_p"):
    lm.generate(np.ones((1, 3), np.int32), top_p=0.0)
  with pytest.raises(ValueError, match="max_new_tokens"):
    lm.generate(np.ones((1, 3), np.int32), max_new_tokens=0)
