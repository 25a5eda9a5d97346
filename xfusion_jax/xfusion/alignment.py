"""Feature alignment of the vision tower with a frozen image encoder.

Representation alignment in the style of REPA: the vision tower's hidden
states at the image tokens after one layer are pulled toward a frozen
pretrained encoder's patch features of the clean image. A trainable
projection maps the hidden states to the encoder's width, the encoder
features are resampled to the image-token grid, and the loss is
1 - cosine similarity, averaged over tokens. The total loss adds it with
weight lambda_align.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

# Norms below this are clamped in the cosine, so that an all-zero vector gives
# similarity 0 and a finite gradient instead of NaN.
_NORM_EPSILON = 1e-6


def default_alignment_layer(num_layers: int) -> int:
  """Return the layer whose output is aligned, counted from 1.

  Layer 8, or half the depth (at least 1) for towers with fewer than 16
  layers.
  """
  if num_layers < 1:
    raise ValueError(f"num_layers must be at least 1, got {num_layers}.")
  return min(8, max(1, num_layers // 2))


class AlignmentProjector(nn.Module):
  """Trainable map from the vision tower's width to the encoder's width.

  Attributes:
    encoder_dim: width of the encoder features.
    mlp_hidden_dim: the hidden width of a 2-layer MLP with SiLU between the
      layers, or None for one linear layer.
  """

  encoder_dim: int
  mlp_hidden_dim: int | None = None

  @nn.compact
  def __call__(self, hidden: jax.Array) -> jax.Array:
    # The loss is computed in float32 even when the tower runs in bfloat16.
    x = hidden.astype(jnp.float32)
    if self.mlp_hidden_dim is not None:
      x = nn.Dense(self.mlp_hidden_dim, name="fc1")(x)
      x = nn.silu(x)
      return nn.Dense(self.encoder_dim, name="fc2")(x)
    return nn.Dense(self.encoder_dim, name="linear")(x)


PROJECTORS = ("linear", "mlp")


def make_projector(kind: str, model_dim: int,
                   encoder_dim: int) -> AlignmentProjector:
  """Build a projector from the vision tower's width to the encoder's.

  Args:
    kind: "linear", or "mlp" for a 2-layer MLP whose hidden width is the
      larger of `model_dim` and `encoder_dim`.
    model_dim: width of the vision tower's hidden states.
    encoder_dim: width of the encoder features.
  """
  if kind == "linear":
    return AlignmentProjector(encoder_dim)
  if kind == "mlp":
    return AlignmentProjector(encoder_dim, max(model_dim, encoder_dim))
  raise ValueError(f"Unknown alignment projector {kind!r}; choose one of "
                   f"{', '.join(PROJECTORS)}.")


def grid_shape(num_tokens: int,
               grid: tuple[int, int] | None = None) -> tuple[int, int]:
  """Return the (height, width) grid of `num_tokens` tokens in row-major order.

  Args:
    num_tokens: tokens of one image.
    grid: the grid, checked against num_tokens, or None for a square grid.
  """
  if grid is None:
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
      raise ValueError(
          f"{num_tokens} tokens do not form a square grid. Pass the "
          "(height, width) grid explicitly.")
    return side, side
  height, width = grid
  if height * width != num_tokens:
    raise ValueError(
        f"Grid {height}x{width} has {height * width} cells but there are "
        f"{num_tokens} tokens.")
  return height, width


def resample_features(features: jax.Array, source_grid: tuple[int, int],
                      target_grid: tuple[int, int]) -> jax.Array:
  """Resample patch features to another grid, bilinearly.

  Args:
    features: [batch, source_height * source_width, dim], row-major.
    source_grid: (height, width) of `features`.
    target_grid: (height, width) of the result.

  Returns:
    [batch, target_height * target_width, dim]. Shrinking antialiases
    (`jax.image.resize` widens the triangle kernel by the scale factor).
  """
  if tuple(source_grid) == tuple(target_grid):
    return features
  batch, _, dim = features.shape
  grid = features.reshape(batch, *source_grid, dim)
  resized = jax.image.resize(grid, (batch, *target_grid, dim), "bilinear")
  return resized.reshape(batch, -1, dim)


def _normalize(x: jax.Array) -> jax.Array:
  squared_norm = jnp.sum(x * x, axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(squared_norm, _NORM_EPSILON**2))


def alignment_loss(hidden: jax.Array,
                   encoder_features: jax.Array,
                   projector: AlignmentProjector,
                   projector_params,
                   *,
                   token_grid: tuple[int, int] | None = None,
                   feature_grid: tuple[int, int] | None = None,
                   sample_weights: jax.Array | None = None) -> jax.Array:
  """Mean of 1 - cos(projected hidden state, resampled encoder feature).

  Args:
    hidden: [batch, tokens, d_model] vision-tower hidden states at the image
      tokens, in row-major order of `token_grid`.
    encoder_features: [batch, patches, d_enc] frozen encoder features of the
      clean images, in row-major order of `feature_grid`. No gradient flows
      into them.
    projector: maps d_model to d_enc.
    projector_params: the projector's params.
    token_grid: (height, width) of the image tokens, or None if square.
    feature_grid: (height, width) of the encoder patches, or None if square.
    sample_weights: optional non-negative [batch] weights, such as 1 for rows
      with an image and 0 for text-only rows. The loss is the weighted mean
      over rows, and 0 when all weights are 0.

  Returns:
    A float32 scalar in [0, 2].
  """
  if hidden.ndim != 3 or encoder_features.ndim != 3:
    raise ValueError(
        f"Expected hidden [batch, tokens, d_model] and encoder_features "
        f"[batch, patches, d_enc], got shapes {hidden.shape} and "
        f"{encoder_features.shape}.")
  if hidden.shape[0] != encoder_features.shape[0]:
    raise ValueError(
        f"Batch sizes differ: hidden has {hidden.shape[0]} rows, "
        f"encoder_features {encoder_features.shape[0]}.")
  if projector.encoder_dim != encoder_features.shape[-1]:
    raise ValueError(
        f"The projector outputs {projector.encoder_dim} channels but the "
        f"encoder features have {encoder_features.shape[-1]}.")
  token_grid = grid_shape(hidden.shape[1], token_grid)
  feature_grid = grid_shape(encoder_features.shape[1], feature_grid)

  target = jax.lax.stop_gradient(encoder_features.astype(jnp.float32))
  target = resample_features(target, feature_grid, token_grid)
  projected = projector.apply({"params": projector_params}, hidden)
  cosine = jnp.sum(_normalize(projected) * _normalize(target), axis=-1)
  per_row = jnp.mean(1.0 - cosine, axis=-1)
  if sample_weights is None:
    return jnp.mean(per_row)
  weights = sample_weights.astype(jnp.float32)
  # The clamp turns an all-zero weight vector into 0 / tiny = 0, not NaN.
  total = jnp.maximum(jnp.sum(weights), jnp.finfo(jnp.float32).tiny)
  return jnp.sum(weights * per_row) / total
