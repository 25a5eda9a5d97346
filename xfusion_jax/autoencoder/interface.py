"""The image-autoencoder interface: encode images to latents and back.

Latents are scaled as the diffusion model expects:
`latents = (z - shift_factor) * scaling_factor`, with z the unscaled latent.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from xfusion_jax.autoencoder import modules

_CONFIG_FILE = "autoencoder_config.json"
_PARAMS_DIR = "params"


class ImageAutoencoder:
  """A frozen KL autoencoder with jitted encode and decode.

  Attributes:
    config: architecture and latent scaling.
    params: Flax parameters of `modules.AutoencoderKL`.
  """

  def __init__(self, config: modules.AutoencoderConfig, params: Any):
    self.config = config
    self.params = params
    self.module = modules.AutoencoderKL(config)

  @functools.cached_property
  def _moments(self):
    return jax.jit(lambda p, x: self.module.apply(
        {"params": p}, x, method=modules.AutoencoderKL.moments))

  @functools.cached_property
  def _decode(self):
    return jax.jit(lambda p, z: self.module.apply(
        {"params": p}, z, method=modules.AutoencoderKL.decode_unscaled))

  def moments(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean and log-variance of the scaled latent's Gaussian posterior.

    Args:
      images: float32 [B, H, W, in_channels] in [-1, 1]; H and W multiples
        of `config.downsample_factor`.

    Returns:
      (mean, logvar), each float32 [B, H/f, W/f, latent_channels].
    """
    mean, logvar = self._moments(self.params, images)
    scale = self.config.scaling_factor
    mean = (mean - self.config.shift_factor) * scale
    return mean, logvar + 2.0 * jnp.log(scale)

  def encode(self, images: jax.Array,
             rng: jax.Array | None = None) -> jax.Array:
    """Scaled latents of `images`: the posterior mean, or a sample if rng."""
    mean, logvar = self.moments(images)
    if rng is None:
      return mean
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)

  def decode(self, latents: jax.Array) -> jax.Array:
    """Images float32 [B, H, W, out_channels], about [-1, 1], from latents."""
    z = latents / self.config.scaling_factor + self.config.shift_factor
    return self._decode(self.params, z)

  def save(self, path: os.PathLike[str] | str) -> None:
    """Write config JSON and Orbax parameters to folder `path`."""
    path = pathlib.Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    (path / _CONFIG_FILE).write_text(
        json.dumps(dataclasses.asdict(self.config), indent=2))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path / _PARAMS_DIR, self.params, force=True)
    checkpointer.wait_until_finished()


def init_params(config: modules.AutoencoderConfig, rng: jax.Array,
                image_size: int) -> Any:
  images = jnp.zeros((1, image_size, image_size, config.in_channels))
  return modules.AutoencoderKL(config).init(rng, images)["params"]


def load_saved(path: os.PathLike[str] | str) -> ImageAutoencoder:
  """Load an autoencoder written by `ImageAutoencoder.save`."""
  path = pathlib.Path(path).absolute()
  raw = json.loads((path / _CONFIG_FILE).read_text())
  raw["block_out_channels"] = tuple(raw["block_out_channels"])
  config = modules.AutoencoderConfig(**raw)
  size = 2 * config.downsample_factor
  abstract = jax.eval_shape(
      lambda: init_params(config, jax.random.key(0), size))
  params = ocp.StandardCheckpointer().restore(path / _PARAMS_DIR, abstract)
  return ImageAutoencoder(config, params)


def load(path: os.PathLike[str] | str) -> ImageAutoencoder:
  """Load a saved xfusion_jax autoencoder or a diffusers AutoencoderKL folder."""
  path = pathlib.Path(path)
  if (path / _CONFIG_FILE).exists():
    return load_saved(path)
  if (path / "config.json").exists():
    from xfusion_jax.autoencoder import diffusers_import  # pylint: disable=g-import-not-at-top
    return diffusers_import.load_diffusers(path)
  raise FileNotFoundError(
      f"{path} contains neither {_CONFIG_FILE} (an autoencoder saved by "
      "xfusion_jax) nor config.json (a diffusers AutoencoderKL folder).")
