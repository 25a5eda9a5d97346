"""X-Fusion's training objective: captioning plus flow matching.

Every example is laid out both as an understanding sample (image, then
caption) and as a generation sample (caption, then noisy image). The step
RNG picks one per row, generation with probability `generation_fraction`.
L = lambda_ar * L_AR (next-token cross-entropy on captions) +
    lambda_dm * L_DM (velocity MSE on generation images) +
    lambda_align * L_align (1 - cosine similarity between the projected
    vision-tower hidden states and a frozen encoder's features of the clean
    image, on generation and understanding images alike; see `alignment`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from xfusion_jax.xfusion import alignment
from xfusion_jax.xfusion import flow
from xfusion_jax.xfusion import model as model_lib

LAYOUT_KEYS = ("tokens", "kinds", "image_ids", "positions", "valid",
               "caption_slots", "targets", "loss_weights")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """Loss weights and sample mixture.

  Attributes:
    lambda_ar: weight of the captioning loss.
    lambda_dm: weight of the flow-matching loss.
    generation_fraction: share of generation samples (2/3 is a 1:2
      understanding:generation mix).
    caption_dropout: probability of hiding a generation sample's caption,
      which trains the unconditional model for classifier-free guidance.
    understanding_noise_cap: understanding images get t ~ U[0, cap]; 0 keeps
      them clean.
    lambda_align: weight of the alignment loss; 0 turns alignment off, and
      then the loss reads neither the projector nor the encoder features.
  """

  lambda_ar: float = 0.2
  lambda_dm: float = 1.0
  generation_fraction: float = 2.0 / 3.0
  caption_dropout: float = 0.1
  understanding_noise_cap: float = 0.0
  lambda_align: float = 0.0


def select_layout(batch: dict[str, Any], is_generation: jax.Array,
                  drop_caption: jax.Array) -> dict[str, jax.Array]:
  """Pick each row's layout from `layout_both` arrays; hide dropped captions."""
  rows = {}
  for key in LAYOUT_KEYS:
    gen, und = batch["gen_" + key], batch["und_" + key]
    pick = is_generation.reshape((-1,) + (1,) * (gen.ndim - 1))
    rows[key] = jnp.where(pick, gen, und)
  hide = (drop_caption & is_generation)[:, None] & rows["caption_slots"]
  rows["valid"] = rows["valid"] & ~hide
  return rows


def alignment_term(module: model_lib.XFusion,
                   projector: alignment.AlignmentProjector | None,
                   trainable: Any, image_hidden: jax.Array | None,
                   batch: dict[str, Any],
                   feature_grid: tuple[int, int] | None = None) -> jax.Array:
  """Return the alignment loss of the image-token hidden states.

  Args:
    module: the X-Fusion module, built with `align_layer`.
    projector: the alignment projector; its params are
      `trainable["align_projector"]`.
    trainable: the "params" collection.
    image_hidden: `XFusionOutput.image_hidden`, one image per row.
    batch: contains "encoder_features" `[batch, patches, d_enc]`.
    feature_grid: (height, width) of the encoder patches, or None if square.
  """
  if image_hidden is None:
    raise ValueError("lambda_align > 0 needs the image hidden states. Build "
                     "XFusion with align_layer set.")
  if projector is None or "align_projector" not in trainable:
    raise ValueError(
        "lambda_align > 0 needs the projector and its params under "
        "trainable['align_projector']. Pass `projector` to loss_fn.")
  if "encoder_features" not in batch:
    raise ValueError(
        "lambda_align > 0 needs batch['encoder_features']. Write the latent "
        "dataset with --feature_encoder.")
  cfg = module.config
  token_grid = (cfg.latent_size[0] // cfg.patch_size,
                cfg.latent_size[1] // cfg.patch_size)
  return alignment.alignment_loss(
      image_hidden, batch["encoder_features"], projector,
      trainable["align_projector"], token_grid=token_grid,
      feature_grid=feature_grid)


def loss_fn(module: model_lib.XFusion, config: ObjectiveConfig,
            trainable: Any, frozen: Any, batch: dict[str, Any],
            rng: jax.Array,
            projector: alignment.AlignmentProjector | None = None,
            feature_grid: tuple[int, int] | None = None
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Return the total loss and its terms for one batch.

  Args:
    module: the X-Fusion module; with lambda_align > 0 built with
      `align_layer`.
    config: loss weights and mixture.
    trainable: the "params" collection.
    frozen: the "frozen" collection.
    batch: `layout_both` arrays plus "latents" `[batch, h, w, c]`, and with
      lambda_align > 0 "encoder_features" `[batch, patches, d_enc]` of the
      clean images.
    rng: randomness of this step (mixture, dropout, times, noise).
    projector: the alignment projector, needed when lambda_align > 0.
    feature_grid: (height, width) of the encoder patches, or None if square.
  """
  x0 = batch["latents"][:, None].astype(jnp.float32)
  n = x0.shape[0]
  mix_rng, drop_rng, time_rng, noise_rng, cap_rng = jax.random.split(rng, 5)
  is_generation = jax.random.bernoulli(mix_rng, config.generation_fraction,
                                       (n,))
  drop_caption = jax.random.bernoulli(drop_rng, config.caption_dropout, (n,))
  rows = select_layout(batch, is_generation, drop_caption)

  t_generation = flow.logit_normal_times(time_rng, (n, 1))
  t_understanding = config.understanding_noise_cap * jax.random.uniform(
      cap_rng, (n, 1))
  t = jnp.where(is_generation[:, None], t_generation, t_understanding)
  noise = jax.random.normal(noise_rng, x0.shape)
  x_t = flow.noisy_latents(x0, noise, t)

  out = module.apply({"frozen": frozen, "params": trainable}, rows["tokens"],
                     rows["kinds"], rows["image_ids"], rows["positions"],
                     rows["valid"], x_t, t)
  targets = jnp.take_along_axis(rows["targets"], out.text_order, axis=1)
  weights = jnp.take_along_axis(rows["loss_weights"], out.text_order, axis=1)
  loss_ar = flow.weighted_cross_entropy(out.text_logits, targets, weights)
  loss_dm = flow.velocity_loss(out.velocity, noise - x0,
                               is_generation[:, None].astype(jnp.float32))
  total = config.lambda_ar * loss_ar + config.lambda_dm * loss_dm
  metrics = {
      "loss_ar": loss_ar,
      "loss_dm": loss_dm,
      "generation_fraction": jnp.mean(is_generation.astype(jnp.float32)),
  }
  # With lambda_align = 0 the alignment term is not even traced, so the step
  # compiles to the same program as before alignment existed.
  if config.lambda_align > 0:
    loss_align = alignment_term(module, projector, trainable,
                                out.image_hidden, batch, feature_grid)
    total = total + config.lambda_align * loss_align
    metrics["loss_align"] = loss_align
  return total, metrics
