"""X-Fusion layers against a plain reference, the mask, and text invariance."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_models
from xfusion_jax import llm
from xfusion_jax.llm import config as lm_config
from xfusion_jax.xfusion import inference
from xfusion_jax.xfusion import model as xf
from xfusion_jax.xfusion import objective
from xfusion_jax.xfusion import sequences
from xfusion_jax.xfusion import task

LATENT_SIZE = (4, 4)
PATCH = 2
TOKENS_PER_IMAGE = 4


@pytest.fixture(name="tiny_lm", scope="module")
def fixture_tiny_lm(tmp_path_factory):
  model = hf_models.build_model(
      hf_models.tiny_config("llama", num_key_value_heads=2, vocab_size=128))
  path = hf_models.save_model(model, tmp_path_factory.mktemp("lm"))
  return llm.from_pretrained(path, dtype="float32", load_tokenizer=False)


def _module(lm, architecture="dual_tower", xfuse=False):
  config = xf.XFusionConfig(architecture=architecture, xfuse=xfuse,
                            latent_size=LATENT_SIZE, patch_size=PATCH)
  return xf.XFusion(lm.config, config)


def _perturbed(params, seed, scale=0.05):
  """Random trainable weights, as after some training."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      leaf + scale * jax.random.normal(k, leaf.shape)
      for leaf, k in zip(leaves, keys)])


def _batch(seed=0):
  """Two rows: an understanding and a generation sample."""
  rng = np.random.default_rng(seed)
  captions = [list(rng.integers(3, 128, 5)), list(rng.integers(3, 128, 3))]
  seq_len = sequences.sequence_length(6, TOKENS_PER_IMAGE)
  rows = sequences.layout_batch(captions, np.array([False, True]),
                                TOKENS_PER_IMAGE, seq_len, eos_id=2, pad_id=0)
  latents = rng.standard_normal((2, 1, *LATENT_SIZE, 4)).astype(np.float32)
  t = np.array([[0.0], [0.7]], np.float32)
  return rows, latents, t


def _apply(module, frozen, params, rows, latents, t):
  return module.apply({"frozen": frozen, "params": params}, rows["tokens"],
                      rows["kinds"], rows["image_ids"], rows["positions"],
                      rows["valid"], latents, t)


# ----------------------------------------------------------------------------
# A straightforward reference: every tower runs over every token with the
# full mask, and each token then takes its own tower's output.


def _rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def _rope(x, positions, theta):
  half = x.shape[-1] // 2
  inv = 1.0 / theta**(np.arange(0, 2 * half, 2) / (2 * half))
  angles = positions[:, None] * inv[None]
  cos = np.cos(np.concatenate([angles, angles], -1))[:, None]
  sin = np.sin(np.concatenate([angles, angles], -1))[:, None]
  rotated = np.concatenate([-x[..., half:], x[..., :half]], -1)
  return x * cos + rotated * sin


def _tower_layer(w, x, mask, positions, config):
  """One Llama layer over all tokens of one row, from one layer's weights `w`."""
  eps, theta = config.rms_norm_eps, config.rope.theta
  h = _rms(x, w["input_layernorm"]["scale"], eps)
  q = _rope(np.einsum("sd,dhk->shk", h, w["self_attn"]["q_proj"]["kernel"]),
            positions, theta)
  k = _rope(np.einsum("sd,dhk->shk", h, w["self_attn"]["k_proj"]["kernel"]),
            positions, theta)
  v = np.einsum("sd,dhk->shk", h, w["self_attn"]["v_proj"]["kernel"])
  group = q.shape[1] // k.shape[1]
  k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
  scores = np.einsum("qhk,shk->hqs", q, k) / np.sqrt(q.shape[-1])
  scores = np.where(mask[None], scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  attended = np.einsum("hqs,shk->qhk", probs, v)
  x = x + np.einsum("qhk,hkd->qd", attended,
                    w["self_attn"]["o_proj"]["kernel"])
  h = _rms(x, w["post_attention_layernorm"]["scale"], eps)
  mlp = w["mlp"]
  gate = h @ mlp["gate_proj"]["kernel"]
  hidden = gate / (1 + np.exp(-gate)) * (h @ mlp["up_proj"]["kernel"])
  return x + hidden @ mlp["down_proj"]["kernel"]


def _reference_hidden(module, frozen, params, rows, latents, t, row):
  """Final hidden states of one row, in original slot order."""
  variables = {"frozen": frozen, "params": params}
  kinds = rows["kinds"][row]
  x = np.asarray(module.apply(variables, rows["tokens"][row:row + 1],
                              kinds[None], method=xf.XFusion.embed_text))[0]
  image_tokens = np.asarray(module.apply(
      variables, latents[row:row + 1], t[row:row + 1],
      method=xf.XFusion.embed_images))[0]
  x = x.copy()
  x[kinds == xf.IMAGE] = image_tokens
  ids = rows["image_ids"][row]
  seq = len(kinds)
  mask = np.tril(np.ones((seq, seq), bool)) | (
      (ids[:, None] == ids[None]) & (ids[:, None] > 0))
  mask &= rows["valid"][row][None]
  is_image = (kinds == xf.IMAGE)[:, None]
  positions = rows["positions"][row].astype(np.float64)
  text_layers = jax.tree.map(np.asarray, frozen["layers"]["text"])
  vision_layers = jax.tree.map(np.asarray, params["layers"]["vision"])
  for layer in range(module.lm_config.num_hidden_layers):
    text_w = jax.tree.map(lambda a, i=layer: a[i], text_layers)
    vision_w = jax.tree.map(lambda a, i=layer: a[i], vision_layers)
    by_text = _tower_layer(text_w, x, mask, positions, module.lm_config)
    by_vision = _tower_layer(vision_w, x, mask, positions, module.lm_config)
    x = np.where(is_image, by_vision, by_text)
  return x


def test_dual_tower_equals_reference(tiny_lm):
  module = _module(tiny_lm)
  frozen = xf.frozen_from_lm(tiny_lm.weights)
  params = _perturbed(nn.meta.unbox(
      xf.init_trainable(module, frozen, jax.random.key(0))), seed=1)
  rows, latents, t = _batch()
  out = _apply(module, frozen, params, rows, latents, t)
  for row in range(2):
    hidden = _reference_hidden(module, frozen, params, rows, latents, t, row)
    kinds = rows["kinds"][row]
    text_hidden = hidden[kinds != xf.IMAGE]
    normed = _rms(text_hidden, np.asarray(frozen["norm"]["scale"]),
                  tiny_lm.config.rms_norm_eps)
    expected_logits = normed @ np.asarray(frozen["lm_head"]["kernel"])
    np.testing.assert_allclose(np.asarray(out.text_logits[row]),
                               expected_logits, atol=1e-4, rtol=0)
    image_hidden = _rms(hidden[kinds == xf.IMAGE],
                        np.asarray(params["vision_norm"]["scale"]),
                        tiny_lm.config.rms_norm_eps)
    patches = (image_hidden @ np.asarray(params["patch_out"]["kernel"]) +
               np.asarray(params["patch_out"]["bias"]))
    expected_velocity = np.asarray(
        xf.unpatchify(jnp.asarray(patches[None]), 1, LATENT_SIZE, PATCH))[0]
    np.testing.assert_allclose(np.asarray(out.velocity[row]),
                               expected_velocity, atol=1e-4, rtol=0)


def test_unrolled_layer_scan_is_identical(tiny_lm):
  # The AOT cost count compiles the stack unrolled; only the loop changes.
  module = _module(tiny_lm)
  unrolled = xf.XFusion(tiny_lm.config, dataclasses.replace(
      module.config, scan_unroll=tiny_lm.config.num_hidden_layers))
  frozen = xf.frozen_from_lm(tiny_lm.weights)
  params = _perturbed(nn.meta.unbox(
      xf.init_trainable(module, frozen, jax.random.key(0))), seed=9)
  rows, latents, t = _batch()
  out = _apply(module, frozen, params, rows, latents, t)
  out_unrolled = _apply(unrolled, frozen, params, rows, latents, t)
  np.testing.assert_allclose(np.asarray(out_unrolled.text_logits),
                             np.asarray(out.text_logits), atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(out_unrolled.velocity),
                             np.asarray(out.velocity), atol=1e-5, rtol=0)


def test_mask_causal_text_bidirectional_image():
  rows, _, _ = _batch()
  mask = np.asarray(xf.fusion_mask(jnp.asarray(rows["kinds"]),
                                   jnp.asarray(rows["image_ids"]),
                                   jnp.asarray(rows["valid"])))[:, 0]
  for row in range(2):
    kinds = rows["kinds"][row]
    image = np.flatnonzero(kinds == xf.IMAGE)
    for q in range(len(kinds)):
      for k in range(len(kinds)):
        if not rows["valid"][row][k]:
          assert not mask[row, q, k]
        elif kinds[q] == xf.IMAGE and kinds[k] == xf.IMAGE:
          assert mask[row, q, k], "image tokens must see their whole image"
        else:
          assert mask[row, q, k] == (k <= q), (row, q, k)
    assert image.size == TOKENS_PER_IMAGE


def test_later_tokens_invisible_to_text(tiny_lm):
  """Changing the image of a generation row leaves its caption logits alone."""
  module = _module(tiny_lm)
  frozen = xf.frozen_from_lm(tiny_lm.weights)
  params = _perturbed(nn.meta.unbox(
      xf.init_trainable(module, frozen, jax.random.key(0))), seed=2)
  rows, latents, t = _batch()
  first = _apply(module, frozen, params, rows, latents, t)
  second = _apply(module, frozen, params, rows, latents + 1.0, t)
  caption_len = 3
  np.testing.assert_array_equal(
      np.asarray(first.text_logits[1, :caption_len]),
      np.asarray(second.text_logits[1, :caption_len]))
  assert not np.allclose(np.asarray(first.velocity[1]),
                         np.asarray(second.velocity[1]))


@pytest.mark.parametrize("architecture,xfuse,invariant", [
    ("dual_tower", False, True),
    ("dual_tower", True, True),
    ("dual_projection", False, True),
    ("single_tower", False, False),
])
def test_text_only_invariant(tiny_lm, architecture, xfuse, invariant):
  module = _module(tiny_lm, architecture, xfuse)
  frozen = xf.frozen_from_lm(tiny_lm.weights)
  initial = nn.meta.unbox(xf.init_trainable(module, frozen, jax.random.key(0)))
  input_ids = np.random.default_rng(3).integers(3, 128, (2, 33))
  base = np.asarray(tiny_lm.logits(input_ids))
  zeros = np.zeros_like(input_ids)
  positions = np.broadcast_to(np.arange(33), input_ids.shape)
  valid = np.ones(input_ids.shape, bool)
  # Jitted, like `tiny_lm.logits`, so both run compiled programs.
  text_logits = jax.jit(lambda variables: module.apply(
      variables, input_ids, zeros, zeros, positions, valid).text_logits)
  for params in (initial, _perturbed(initial, seed=4)):
    logits = text_logits({"frozen": frozen, "params": params})
    difference = np.abs(np.asarray(logits) - base).max()
    if invariant:
      # Text-only input runs the frozen LLM's own code: equal bit for bit.
      np.testing.assert_array_equal(np.asarray(logits), base)
    elif params is initial:
      assert difference <= 1e-6, f"{architecture}: text logits changed"
    else:
      assert difference > 1e-3, f"{architecture}: text logits did not change"


def test_loss_gradients_reach_vision_tower(tiny_lm):
  module = _module(tiny_lm)
  frozen = xf.frozen_from_lm(tiny_lm.weights)
  params = _perturbed(nn.meta.unbox(
      xf.init_trainable(module, frozen, jax.random.key(0))), seed=5)
  captions = [[5, 6, 7], [8, 9, 10, 11]]
  seq_len = sequences.sequence_length(6, TOKENS_PER_IMAGE)
  batch = sequences.layout_both(captions, TOKENS_PER_IMAGE, seq_len, 2, 0)
  batch["latents"] = np.random.default_rng(0).standard_normal(
      (2, *LATENT_SIZE, 4)).astype(np.float32)
  config = objective.ObjectiveConfig(generation_fraction=0.5)

  def loss(p):
    return objective.loss_fn(module, config, p, frozen, batch,
                             jax.random.key(0))[0]

  grads = jax.grad(loss)(params)
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  for path, grad in flat:
    assert float(jnp.abs(grad).max()) > 0, jax.tree_util.keystr(path)


@pytest.mark.parametrize("architecture,xfuse", [
    ("dual_tower", False), ("dual_tower", True), ("single_tower", False),
    ("gated", False), ("dual_projection", False)])
def test_captioning_equals_growing_recompute(tiny_lm, architecture, xfuse):
  """Greedy captions equal rerunning the model on each longer caption."""
  module = _module(tiny_lm, architecture, xfuse)
  frozen = xf.frozen_from_lm(tiny_lm.weights)
  params = _perturbed(nn.meta.unbox(
      xf.init_trainable(module, frozen, jax.random.key(0))), seed=6)
  latents = np.random.default_rng(1).standard_normal(
      (2, *LATENT_SIZE, 4)).astype(np.float32)
  new_tokens = 6
  tokens = inference.caption_latents(module, frozen, params, latents,
                                     max_new_tokens=new_tokens, eos_ids=(),
                                     pad_id=0)
  # Recompute: append each greedy token to an understanding row and rerun.
  caption = [[], []]
  for step in range(new_tokens):
    seq_len = TOKENS_PER_IMAGE + 2 + step + 1
    rows = sequences.layout_batch(caption, np.zeros(2, bool),
                                  TOKENS_PER_IMAGE, seq_len, eos_id=0,
                                  pad_id=0)
    out = _apply(module, frozen, params, rows, latents[:, None],
                 np.zeros((2, 1), np.float32))
    # Text-first order: BOI, EOI, caption tokens, then the EOS slot.
    next_tokens = np.asarray(out.text_logits[:, 1 + step]).argmax(-1)
    for row in range(2):
      caption[row].append(int(next_tokens[row]))
  np.testing.assert_array_equal(tokens, np.array(caption))

  # A row stops at its first EOS token; pad ids follow.
  eos = caption[0][2]
  stopped = inference.caption_latents(module, frozen, params, latents,
                                      max_new_tokens=new_tokens,
                                      eos_ids=(eos,), pad_id=0)
  for row in range(2):
    end = caption[row].index(eos) + 1 if eos in caption[row] else new_tokens
    expected = caption[row][:end] + [0] * (new_tokens - end)
    np.testing.assert_array_equal(stopped[row], expected)


def test_captioning_compiles_once_per_setting(tiny_lm):
  """Batches of one shape and settings reuse one compiled decode loop."""
  module = _module(tiny_lm, "dual_tower", False)
  frozen = xf.frozen_from_lm(tiny_lm.weights)
  params = nn.meta.unbox(xf.init_trainable(module, frozen, jax.random.key(0)))
  rng = np.random.default_rng(2)
  compiled = inference._caption_jit  # pylint: disable=protected-access
  before = compiled._cache_size()  # pylint: disable=protected-access
  # The same settings, spelled as a tuple, a list and arrays.
  for eos_ids, pad_id in (((2,), 0), ([2], np.int32(0)),
                          (jnp.array([2]), jnp.int32(0))):
    latents = rng.standard_normal((2, *LATENT_SIZE, 4)).astype(np.float32)
    inference.caption_latents(module, frozen, params, latents,
                              max_new_tokens=3, eos_ids=eos_ids,
                              pad_id=pad_id)
  after = compiled._cache_size()  # pylint: disable=protected-access
  assert after - before == 1


def test_generate_latents_shape_and_guidance(tiny_lm):
  module = _module(tiny_lm)
  frozen = xf.frozen_from_lm(tiny_lm.weights)
  params = _perturbed(nn.meta.unbox(
      xf.init_trainable(module, frozen, jax.random.key(0))), seed=7)
  captions = [[5, 6, 7], [9]]
  guided = inference.generate_latents(module, frozen, params, captions,
                                      cfg_scale=3.0, steps=4,
                                      rng=jax.random.key(0))
  unguided = inference.generate_latents(module, frozen, params, captions,
                                        cfg_scale=1.0, steps=4,
                                        rng=jax.random.key(0))
  assert guided.shape == (2, *LATENT_SIZE, 4)
  assert np.isfinite(np.asarray(guided)).all()
  assert not np.allclose(np.asarray(guided), np.asarray(unguided))


@pytest.mark.parametrize("architecture", ["dual_tower", "gated"])
@pytest.mark.parametrize("layer", [1, 2])
def test_image_hidden_equals_truncated_stack(tiny_lm, architecture, layer):
  module = _module(tiny_lm, architecture)
  frozen = xf.frozen_from_lm(tiny_lm.weights)
  params = _perturbed(nn.meta.unbox(
      xf.init_trainable(module, frozen, jax.random.key(0))), seed=8)
  rows, latents, t = _batch()
  aligned = xf.XFusion(tiny_lm.config, module.config, align_layer=layer)
  # A stack cut after `layer` layers ends with the same hidden states, which
  # its output head turns into the velocity.
  cut_config = dataclasses.replace(tiny_lm.config, num_hidden_layers=layer)
  cut = xf.XFusion(cut_config, module.config)

  def first_layers(tree):
    return jax.tree.map(lambda x: x[:layer], tree)

  cut_frozen = dict(frozen, layers=first_layers(frozen["layers"]))
  cut_params = dict(params, layers=first_layers(params["layers"]))

  out = _apply(aligned, frozen, params, rows, latents, t)
  plain = _apply(module, frozen, params, rows, latents, t)
  reference = _apply(cut, cut_frozen, cut_params, rows, latents, t)

  assert plain.image_hidden is None
  assert out.image_hidden.shape == (2, TOKENS_PER_IMAGE,
                                    tiny_lm.config.hidden_size)
  np.testing.assert_array_equal(np.asarray(out.velocity),
                                np.asarray(plain.velocity))
  hidden = np.asarray(out.image_hidden, np.float64)
  normed = _rms(hidden, np.asarray(params["vision_norm"]["scale"]),
                tiny_lm.config.rms_norm_eps)
  head = params["patch_out"]
  patches = normed @ np.asarray(head["kernel"]) + np.asarray(head["bias"])
  velocity = xf.unpatchify(jnp.asarray(patches, jnp.float32), 1, LATENT_SIZE,
                           PATCH)
  np.testing.assert_allclose(np.asarray(velocity),
                             np.asarray(reference.velocity), atol=1e-5)


def test_align_layer_outside_stack_raises(tiny_lm):
  module = _module(tiny_lm)
  bad = xf.XFusion(tiny_lm.config, module.config, align_layer=3)
  rows, latents, t = _batch()
  with pytest.raises(ValueError, match="align_layer 3 is outside the stack"):
    bad.init({"params": jax.random.key(0)}, rows["tokens"], rows["kinds"],
             rows["image_ids"], rows["positions"], rows["valid"], latents, t)


def test_gemma_blocks_are_refused():
  """The fusion layers implement the Llama block; Gemma 3 adds more norms."""
  config = lm_config.config_from_dict(
      hf_models.tiny_gemma3_config().to_dict())
  module = xf.XFusion(config, xf.XFusionConfig(latent_size=LATENT_SIZE,
                                                patch_size=PATCH))
  with pytest.raises(ValueError, match="gemma3_text.*qk_norm"):
    module.init({"params": jax.random.key(0)}, **xf.example_inputs(
        module.config))


@pytest.mark.parametrize("architecture,xfuse", [
    ("dual_tower", True), ("dual_projection", False), ("gated", False),
    ("single_tower", False)])
def test_flop_count_tracks_compiled_step(tmp_path, architecture, xfuse):
  """The estimate follows XLA's count of the gradient step across designs.

  XLA also counts work the estimate leaves out (norms, softmax, the LM
  head), so each design is compared through its ratio to the dual tower's.
  """
  model = hf_models.build_model(hf_models.tiny_config(
      "llama", hidden_size=256, intermediate_size=512))
  lm = llm.from_pretrained(hf_models.save_model(model, tmp_path),
                           dtype="float32", load_tokenizer=False)
  frozen = xf.frozen_from_lm(lm.weights)
  seq_len = sequences.sequence_length(14, 16)
  batch = sequences.layout_both([[5] * 14] * 4, 16, seq_len, 2, 0)
  batch["latents"] = np.zeros((4, 8, 8, 4), np.float32)
  objective_config = objective.ObjectiveConfig(generation_fraction=0.5)

  def compiled_over_estimate(architecture, xfuse):
    config = xf.XFusionConfig(architecture=architecture, xfuse=xfuse,
                              latent_size=(8, 8), patch_size=2)
    module = xf.XFusion(lm.config, config)
    params = nn.meta.unbox(
        xf.init_trainable(module, frozen, jax.random.key(0)))
    step = jax.jit(jax.grad(lambda p: objective.loss_fn(
        module, objective_config, p, frozen, batch, jax.random.key(0))[0]))
    cost = step.lower(params).compile().cost_analysis()
    if isinstance(cost, list):
      cost = cost[0]
    estimate = task.flop_count(module, frozen, seq_len).per_token()
    return cost["flops"] / estimate

  ratio = (compiled_over_estimate(architecture, xfuse) /
           compiled_over_estimate("dual_tower", False))
  assert 0.85 < ratio < 1.15, f"{architecture}, xfuse={xfuse}: {ratio:.3f}"
