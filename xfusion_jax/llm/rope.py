"""Rotary position embeddings in the rotate-half layout that transformers uses.

Keeping HF's layout (first half of each head paired with the second half)
means q/k projection weights import and export as plain transposes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from xfusion_jax.llm.config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> np.ndarray:
  """Return the per-pair inverse frequencies, `[head_dim // 2]` float32."""
  exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
  inv_freq = (1.0 / (np.float32(rope.theta)**exponents)).astype(np.float32)
  if rope.rope_type == "default":
    return inv_freq
  if rope.rope_type == "linear":
    return (inv_freq / np.float32(rope.factor)).astype(np.float32)
  if rope.rope_type == "llama3":
    return _llama3_frequencies(inv_freq, rope)
  raise ValueError(f"Unsupported rope_type {rope.rope_type!r}.")


def _llama3_frequencies(inv_freq: np.ndarray, rope: RopeConfig) -> np.ndarray:
  """Llama 3.1 frequency table.

  Wavelengths longer than the original context divided by low_freq_factor are
  slowed down by `factor`; shorter than the context divided by
  high_freq_factor are kept; the band in between is interpolated smoothly.
  """
  context = rope.original_max_position_embeddings
  low_freq_wavelen = context / rope.low_freq_factor
  high_freq_wavelen = context / rope.high_freq_factor
  wavelen = (2 * math.pi / inv_freq).astype(np.float32)
  scaled = np.where(wavelen > low_freq_wavelen, inv_freq / rope.factor,
                    inv_freq).astype(np.float32)
  smooth = ((context / wavelen - rope.low_freq_factor) /
            (rope.high_freq_factor - rope.low_freq_factor)).astype(np.float32)
  smoothed = ((1 - smooth) * scaled / rope.factor + smooth * scaled).astype(
      np.float32)
  is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rotary_tables(positions: jax.Array,
                  inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """Return cos and sin tables, each `[batch, seq, head_dim]` float32.

  Args:
    positions: `[batch, seq]` integer positions, one row per sequence, so that
      left-padded rows start counting at their first real token.
    inv_freq: `[head_dim // 2]` from `inverse_frequencies`.
  """
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotate `x` `[batch, seq, heads, head_dim]` by the tables of its positions."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos = cos[:, :, None, :].astype(x.dtype)
  sin = sin[:, :, None, :].astype(x.dtype)
  return x * cos + rotated * sin
