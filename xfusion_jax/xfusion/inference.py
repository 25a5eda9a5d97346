"""Image generation and captioning with a trained X-Fusion model."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xfusion_jax.llm import model as lm_model
from xfusion_jax.llm import sampling
from xfusion_jax.xfusion import flow
from xfusion_jax.xfusion import model as model_lib
from xfusion_jax.xfusion import sequences


def _variables(frozen, params):
  return {"frozen": frozen, "params": params}


def generate_latents(module: model_lib.XFusion, frozen: Any, params: Any,
                     captions: Sequence[Sequence[int]], *, cfg_scale: float,
                     steps: int, rng: jax.Array, pad_id: int = 0) -> jax.Array:
  """Sample one latent image per caption with classifier-free guidance.

  The conditional rows see the caption; the unconditional rows have the
  caption slots masked out, as caption dropout trained them.

  Returns:
    `[len(captions), h, w, c]` latents at t = 0.
  """
  cfg = module.config
  longest = max(len(c) for c in captions)
  seq_len = sequences.sequence_length(longest, cfg.tokens_per_image)
  n = len(captions)
  rows = sequences.layout_batch(captions, np.ones(n, bool),
                                cfg.tokens_per_image, seq_len, eos_id=pad_id,
                                pad_id=pad_id)
  uncond_valid = rows["valid"] & ~rows["caption_slots"]
  doubled = {k: np.concatenate([v, v]) for k, v in rows.items()}
  doubled["valid"] = np.concatenate([rows["valid"], uncond_valid])
  h, w = cfg.latent_size
  noise = jax.random.normal(rng, (n, 1, h, w, cfg.latent_channels))
  inputs = {k: doubled[k]
            for k in ("tokens", "kinds", "image_ids", "positions", "valid")}
  return _sample_jit(module, _variables(frozen, params), inputs, noise,
                     cfg_scale=float(cfg_scale), steps=int(steps))[:, 0]


# Weights and rows are arguments, not closed-over constants, which XLA would
# try to constant-fold, and one compilation serves every call of a shape.
@functools.partial(jax.jit, static_argnums=0,
                   static_argnames=("cfg_scale", "steps"))
def _sample_jit(module, variables, rows, noise, *, cfg_scale, steps):

  def velocity_fn(x, t):
    out = module.apply(variables, rows["tokens"], rows["kinds"],
                       rows["image_ids"], rows["positions"], rows["valid"],
                       jnp.concatenate([x, x]), jnp.concatenate([t, t]))
    cond, uncond = jnp.split(out.velocity, 2)
    return flow.guided(cond, uncond, cfg_scale)

  return flow.euler_sample(velocity_fn, noise, steps)


# Architectures whose text tokens after an image meet only weights that the
# plain LLM can run: their captions decode from a KV cache.
CACHED_CAPTIONING = ("dual_tower", "single_tower")


def caption_latents(module: model_lib.XFusion, frozen: Any, params: Any,
                    latents: jax.Array, *, max_new_tokens: int,
                    eos_ids: tuple[int, ...], pad_id: int,
                    temperature: float = 0.0, top_k: int = 0,
                    top_p: float = 1.0,
                    rng: jax.Array | None = None) -> np.ndarray:
  """Caption clean latents `[batch, h, w, c]`.

  In the `CACHED_CAPTIONING` architectures, text tokens after the image
  prefix `[BOI] image [EOI]` attend only through the text blocks. So the
  prefix runs once through the whole model, its text-block keys and values
  seed a KV cache, and decoding continues on the plain LLM. "gated" and
  "dual_projection" apply image weights to text tokens as well; there
  every new token reruns the whole model on the sequence so far.

  Returns:
    `[batch, max_new_tokens]` token ids, `pad_id` after each row's EOS.
  """
  if max_new_tokens < 1:
    raise ValueError(
        f"Invalid max_new_tokens={max_new_tokens}; pass at least 1.")
  rng = jax.random.key(0) if rng is None else rng
  return np.asarray(_caption_jit(
      module, _variables(frozen, params), latents, rng,
      max_new_tokens=int(max_new_tokens),
      eos_ids=tuple(int(i) for i in np.ravel(eos_ids)), pad_id=int(pad_id),
      temperature=float(temperature), top_k=int(top_k), top_p=float(top_p)))


# One compilation per module, settings and batch shape, reused by every
# batch of an evaluation.
@functools.partial(jax.jit, static_argnums=0, static_argnames=(
    "max_new_tokens", "eos_ids", "pad_id", "temperature", "top_k", "top_p"))
def _caption_jit(module, variables, latents, rng, **settings):
  decode = (_caption_with_cache
            if module.config.architecture in CACHED_CAPTIONING
            else _caption_by_recompute)
  return decode(module, variables, latents, rng, **settings)


def _understanding_rows(config: model_lib.XFusionConfig, n: int,
                        caption_slots: int, pad_id: int):
  """Lay out `n` rows of `[BOI] image [EOI]` and `caption_slots` text slots."""
  seq_len = config.tokens_per_image + 2 + caption_slots
  # layout_batch adds an EOS slot after the caption, which is cut off.
  rows = sequences.layout_batch([[pad_id] * caption_slots] * n,
                                np.zeros(n, bool), config.tokens_per_image,
                                seq_len + 1, eos_id=pad_id, pad_id=pad_id)
  return {k: v[:, :seq_len] for k, v in rows.items()}


def _caption_with_cache(module, variables, latents, rng, *, max_new_tokens,
                        eos_ids, pad_id, temperature, top_k, top_p):
  cfg = module.config
  n = latents.shape[0]
  rows = _understanding_rows(cfg, n, 0, pad_id)
  prefix_len = rows["tokens"].shape[1]
  out = module.clone(return_text_kv=True).apply(
      variables, rows["tokens"], rows["kinds"], rows["image_ids"],
      rows["positions"], rows["valid"], latents[:, None].astype(jnp.float32),
      jnp.zeros((n, 1)))
  keys, values = out.text_kv
  pad = [(0, 0), (0, 0), (0, max_new_tokens), (0, 0), (0, 0)]
  cache = lm_model.KVCache(jnp.pad(keys, pad).astype(cfg.dtype),
                           jnp.pad(values, pad).astype(cfg.dtype))
  key_valid = jnp.ones((n, prefix_len + max_new_tokens), bool)
  # The text decoder: the frozen LLM, with single_tower's trained text
  # blocks in place of the frozen ones.
  weights = model_lib.lm_from_frozen(variables["frozen"])
  if cfg.architecture == "single_tower":
    weights["model"]["layers"] = jax.tree.map(
        lambda p: p.astype(module.frozen_dtype),
        variables["params"]["layers"]["text"])
  # In text-first order the EOI slot is the last text row.
  return sampling.decode_loop(
      model_lib.frozen_decoder(module), {lm_model.FROZEN: weights},
      out.text_logits[:, -1], cache, key_valid, prefix_len,
      jnp.full((n,), prefix_len, jnp.int32), rng,
      max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
      top_p=top_p, eos_ids=eos_ids, pad_id=pad_id)


def _caption_by_recompute(module, variables, latents, rng, *, max_new_tokens,
                          eos_ids, pad_id, temperature, top_k, top_p):
  n = latents.shape[0]
  # The last token is sampled but never fed back, so it needs no slot.
  rows = _understanding_rows(module.config, n, max_new_tokens - 1, pad_id)
  eoi_slot = module.config.tokens_per_image + 1
  latents = latents[:, None].astype(jnp.float32)
  t = jnp.zeros((n, 1))

  def step_fn(state):
    step, slots, tokens, done, rng = state
    # Causal attention keeps the placeholder slots after the current one
    # out of its logits.
    out = module.apply(variables, slots, rows["kinds"], rows["image_ids"],
                       rows["positions"], rows["valid"], latents, t)
    text_row = jnp.argmax(out.text_order == eoi_slot + step, axis=1)
    logits = jnp.take_along_axis(out.text_logits, text_row[:, None, None],
                                 axis=1)[:, 0]
    rng, step_rng = jax.random.split(rng)
    token, done = sampling.next_tokens(
        logits, step_rng, done, temperature=temperature, top_k=top_k,
        top_p=top_p, eos_ids=eos_ids, pad_id=pad_id)
    tokens = tokens.at[:, step].set(token)
    slots = slots.at[:, eoi_slot + 1 + step].set(token, mode="drop")
    return step + 1, slots, tokens, done, rng

  def keep_going(state):
    return (state[0] < max_new_tokens) & ~jnp.all(state[3])

  state = (jnp.int32(0), jnp.asarray(rows["tokens"]),
           jnp.full((n, max_new_tokens), pad_id, jnp.int32),
           jnp.zeros((n,), bool), rng)
  return jax.lax.while_loop(keep_going, step_fn, state)[2]
