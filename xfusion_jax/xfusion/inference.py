"""Image generation and captioning with a trained X-Fusion model."""

from __future__ import annotations

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
  variables = _variables(frozen, params)
  h, w = cfg.latent_size
  noise = jax.random.normal(rng, (n, 1, h, w, cfg.latent_channels))

  def sample(variables, z):

    def velocity_fn(x, t):
      out = module.apply(variables, doubled["tokens"], doubled["kinds"],
                         doubled["image_ids"], doubled["positions"],
                         doubled["valid"], jnp.concatenate([x, x]),
                         jnp.concatenate([t, t]))
      cond, uncond = jnp.split(out.velocity, 2)
      return flow.guided(cond, uncond, cfg_scale)

    return flow.euler_sample(velocity_fn, z, steps)

  # Weights are arguments, not closed-over constants, which XLA would try
  # to constant-fold at compile time.
  return jax.jit(sample)(variables, noise)[:, 0]


def _text_decoder(module: model_lib.XFusion, frozen, params):
  """Build the plain LLM, and its weights, that continues text after the image prefix."""
  cfg = module.config
  weights = model_lib.lm_from_frozen(frozen)
  if cfg.architecture == "single_tower":
    weights["model"]["layers"] = jax.tree.map(
        lambda p: p.astype(module.frozen_dtype), params["layers"]["text"])
  return model_lib.frozen_decoder(module), {lm_model.FROZEN: weights}


def caption_latents(module: model_lib.XFusion, frozen: Any, params: Any,
                    latents: jax.Array, *, max_new_tokens: int,
                    eos_ids: tuple[int, ...], pad_id: int,
                    temperature: float = 0.0, top_k: int = 0,
                    top_p: float = 1.0,
                    rng: jax.Array | None = None) -> np.ndarray:
  """Caption clean latents `[batch, h, w, c]`.

  The image prefix `[BOI] image [EOI]` runs once through the whole model.
  After it, text tokens attend only through the text blocks. So the text
  blocks' keys and values of the prefix seed a KV cache, and decoding
  continues on the plain LLM.

  Returns:
    `[batch, max_new_tokens]` token ids, `pad_id` after each row's EOS.
  """
  cfg = module.config
  if cfg.architecture not in ("dual_tower", "single_tower"):
    # NOTE: "gated" and "dual_projection" mix image weights into text
    # tokens' layers, so the plain-LLM cache does not apply to them.
    raise ValueError(
        f"KV-cache captioning supports dual_tower and single_tower, not "
        f"{cfg.architecture!r}.")
  n = latents.shape[0]
  seq_len = cfg.tokens_per_image + 2
  rows = sequences.layout_batch([[] for _ in range(n)], np.zeros(n, bool),
                                cfg.tokens_per_image, seq_len + 1,
                                eos_id=pad_id, pad_id=pad_id)
  rows = {k: v[:, :seq_len] for k, v in rows.items()}
  prefix_module = module.clone(return_text_kv=True)
  decoder, decoder_variables = _text_decoder(module, frozen, params)
  rng = jax.random.key(0) if rng is None else rng

  def run(variables, decoder_variables, latents, rng):
    out = prefix_module.apply(
        variables, rows["tokens"], rows["kinds"],
        rows["image_ids"], rows["positions"], rows["valid"],
        latents[:, None].astype(jnp.float32), jnp.zeros((n, 1)))
    keys, values = out.text_kv
    total = seq_len + max_new_tokens
    pad = [(0, 0), (0, 0), (0, max_new_tokens), (0, 0), (0, 0)]
    cache = lm_model.KVCache(
        jnp.pad(keys, pad).astype(cfg.dtype),
        jnp.pad(values, pad).astype(cfg.dtype))
    key_valid = jnp.ones((n, total), bool)
    # In text-first order the EOI slot is the last text row.
    first_logits = out.text_logits[:, -1]
    return sampling.decode_loop(
        decoder, decoder_variables, first_logits, cache, key_valid, seq_len,
        jnp.full((n,), seq_len, jnp.int32), rng,
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
        top_p=top_p, eos_ids=tuple(eos_ids), pad_id=pad_id)

  return np.asarray(jax.jit(run)(_variables(frozen, params),
                                 decoder_variables, latents, rng))
