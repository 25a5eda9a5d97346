"""Flax modules of the KL autoencoder used by Stable Diffusion (SD-VAE).

The layer layout and parameter names follow diffusers' `AutoencoderKL`
(diffusers 0.42), so that its checkpoints map onto these modules one to one.
Images are NHWC float32 in [-1, 1].
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# diffusers builds the autoencoder's GroupNorm layers with this epsilon.
_NORM_EPSILON = 1e-6


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
  """Architecture and latent scaling of a KL autoencoder.

  Attributes:
    in_channels: image channels.
    out_channels: decoded image channels.
    block_out_channels: channels per resolution level; each level after the
      first halves height and width, so the downsampling factor is
      2 ** (len(block_out_channels) - 1).
    layers_per_block: residual blocks per encoder level; the decoder has one
      more per level.
    latent_channels: channels of the latent.
    norm_num_groups: GroupNorm groups.
    mid_block_add_attention: self-attention in the middle blocks.
    use_quant_conv: 1x1 conv after the encoder.
    use_post_quant_conv: 1x1 conv before the decoder.
    scaling_factor: latents given to the model are (z - shift_factor) *
      scaling_factor, so that they have about unit variance.
    shift_factor: see scaling_factor; 0 for the SD 1.5 family.
  """

  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  mid_block_add_attention: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  scaling_factor: float = 0.18215
  shift_factor: float = 0.0

  @property
  def downsample_factor(self) -> int:
    return 2**(len(self.block_out_channels) - 1)


def _conv(features: int, kernel: int, name: str, stride: int = 1,
          padding="SAME") -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=padding, name=name)


class ResnetBlock(nn.Module):
  """GroupNorm-SiLU-conv twice, plus a 1x1 shortcut when channels change."""

  out_channels: int
  groups: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.GroupNorm(self.groups, epsilon=_NORM_EPSILON, name="norm1")(x)
    h = _conv(self.out_channels, 3, "conv1")(nn.silu(h))
    h = nn.GroupNorm(self.groups, epsilon=_NORM_EPSILON, name="norm2")(h)
    h = _conv(self.out_channels, 3, "conv2")(nn.silu(h))
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, "conv_shortcut")(x)
    return x + h


class AttentionBlock(nn.Module):
  """Single-head self-attention over all pixels, with a residual."""

  groups: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, height, width, channels = x.shape
    h = nn.GroupNorm(self.groups, epsilon=_NORM_EPSILON, name="group_norm")(x)
    h = h.reshape(batch, height * width, channels)
    q = nn.Dense(channels, name="to_q")(h)
    k = nn.Dense(channels, name="to_k")(h)
    v = nn.Dense(channels, name="to_v")(h)
    scores = jnp.einsum("bqc,bkc->bqk", q, k) / jnp.sqrt(channels)
    weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
    h = jnp.einsum("bqk,bkc->bqc", weights.astype(v.dtype), v)
    h = nn.Dense(channels, name="to_out_0")(h)
    return x + h.reshape(batch, height, width, channels)


class MidBlock(nn.Module):
  channels: int
  groups: int
  add_attention: bool

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = ResnetBlock(self.channels, self.groups, name="resnets_0")(x)
    if self.add_attention:
      x = AttentionBlock(self.groups, name="attentions_0")(x)
    return ResnetBlock(self.channels, self.groups, name="resnets_1")(x)


class Encoder(nn.Module):
  """Images [B, H, W, C] -> moments [B, H/f, W/f, 2 * latent_channels]."""

  config: AutoencoderConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    x = _conv(cfg.block_out_channels[0], 3, "conv_in")(x)
    last = len(cfg.block_out_channels) - 1
    for i, channels in enumerate(cfg.block_out_channels):
      for j in range(cfg.layers_per_block):
        x = ResnetBlock(channels, cfg.norm_num_groups,
                        name=f"down_blocks_{i}_resnets_{j}")(x)
      if i != last:
        # diffusers pads only bottom and right before the stride-2 conv.
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        x = _conv(channels, 3, f"down_blocks_{i}_downsamplers_0_conv",
                  stride=2, padding="VALID")(x)
    x = MidBlock(cfg.block_out_channels[-1], cfg.norm_num_groups,
                 cfg.mid_block_add_attention, name="mid_block")(x)
    x = nn.GroupNorm(cfg.norm_num_groups, epsilon=_NORM_EPSILON,
                     name="conv_norm_out")(x)
    return _conv(2 * cfg.latent_channels, 3, "conv_out")(nn.silu(x))


class Decoder(nn.Module):
  """Latents [B, h, w, latent_channels] -> images [B, h*f, w*f, C]."""

  config: AutoencoderConfig

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    cfg = self.config
    channels: Sequence[int] = tuple(reversed(cfg.block_out_channels))
    x = _conv(channels[0], 3, "conv_in")(z)
    x = MidBlock(channels[0], cfg.norm_num_groups,
                 cfg.mid_block_add_attention, name="mid_block")(x)
    last = len(channels) - 1
    for i, out_channels in enumerate(channels):
      for j in range(cfg.layers_per_block + 1):
        x = ResnetBlock(out_channels, cfg.norm_num_groups,
                        name=f"up_blocks_{i}_resnets_{j}")(x)
      if i != last:
        batch, height, width, c = x.shape
        x = jax.image.resize(x, (batch, 2 * height, 2 * width, c), "nearest")
        x = _conv(out_channels, 3, f"up_blocks_{i}_upsamplers_0_conv")(x)
    x = nn.GroupNorm(cfg.norm_num_groups, epsilon=_NORM_EPSILON,
                     name="conv_norm_out")(x)
    return _conv(cfg.out_channels, 3, "conv_out")(nn.silu(x))


class AutoencoderKL(nn.Module):
  """Encoder and decoder of a KL autoencoder; see `AutoencoderConfig`."""

  config: AutoencoderConfig

  def setup(self):
    cfg = self.config
    self.encoder = Encoder(cfg)
    self.decoder = Decoder(cfg)
    self.quant_conv = (
        _conv(2 * cfg.latent_channels, 1, "quant_conv")
        if cfg.use_quant_conv else None)
    self.post_quant_conv = (
        _conv(cfg.latent_channels, 1, "post_quant_conv")
        if cfg.use_post_quant_conv else None)

  def moments(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Posterior mean and log-variance of the unscaled latent z."""
    h = self.encoder(images)
    if self.quant_conv is not None:
      h = self.quant_conv(h)
    mean, logvar = jnp.split(h, 2, axis=-1)
    # diffusers clips the log-variance to this range.
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode_unscaled(self, z: jax.Array) -> jax.Array:
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(self, images: jax.Array, rng: jax.Array | None = None):
    """Reconstruct images; returns (images, mean, logvar) of the posterior."""
    mean, logvar = self.moments(images)
    z = mean
    if rng is not None:
      z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
    return self.decode_unscaled(z), mean, logvar
