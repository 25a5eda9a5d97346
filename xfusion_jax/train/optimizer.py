"""AdamW with linear warm-up, cosine decay and global-norm clipping."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up from 0 to `learning_rate`, then cosine decay.

  The decay ends at `total_steps` at `learning_rate *
  final_learning_rate_fraction`.
  """
  if config.warmup_steps < 0 or config.warmup_steps > config.total_steps:
    raise ValueError(
        f"config.warmup_steps={config.warmup_steps} must be between 0 and "
        f"config.total_steps={config.total_steps}.")
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=config.learning_rate,
      warmup_steps=config.warmup_steps,
      # optax counts the warm-up in decay_steps and needs one decay step.
      decay_steps=max(config.total_steps, config.warmup_steps + 1),
      end_value=config.learning_rate * config.final_learning_rate_fraction)


def _decay_mask(params: Any) -> Any:
  # Norm scales and biases (vectors) are not decayed. `getattr` keeps the mask
  # usable on the placeholder that `optax.tree_map_params` passes to `init`.
  return jax.tree.map(lambda p: getattr(p, "ndim", 0) > 1, params)


def make_optimizer(
    config: ml_collections.ConfigDict
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Return the AdamW transformation (b1 0.9, b2 0.95) and its schedule."""
  schedule = learning_rate_schedule(config)
  adamw = optax.adamw(
      schedule, b1=0.9, b2=0.95, weight_decay=config.weight_decay,
      mask=_decay_mask)
  if config.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(config.grad_clip),
                       adamw), schedule
  return adamw, schedule
