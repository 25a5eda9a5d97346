"""Latent datasets of real images through small random autoencoders."""

from __future__ import annotations

import pathlib

import jax

from xfusion_jax.autoencoder import interface
from xfusion_jax.autoencoder import modules
from xfusion_jax.data import datasets
from xfusion_jax.data import encode_latents


def random_autoencoder(folder: pathlib.Path, levels: int, image_size: int,
                       in_channels: int = 3) -> interface.ImageAutoencoder:
  """A random KL autoencoder with 2**(levels - 1) downsampling, saved."""
  config = modules.AutoencoderConfig(
      in_channels=in_channels, out_channels=in_channels,
      block_out_channels=(8,) * levels, layers_per_block=1, norm_num_groups=4,
      latent_channels=4, scaling_factor=1.0)
  autoencoder = interface.ImageAutoencoder(
      config, interface.init_params(config, jax.random.key(0), image_size))
  autoencoder.save(folder)
  return autoencoder


def emoji_latents(data_dir: pathlib.Path, **encode_kwargs):
  """Emoji latents (8x downsampling); returns (dataset folder, AE folder)."""
  datasets.prepare("emoji_captions", data_dir)
  autoencoder = random_autoencoder(data_dir / "autoencoder", 4, 64)
  folder = encode_latents.encode_latents("emoji_captions", autoencoder,
                                         data_dir=data_dir, batch_size=200,
                                         **encode_kwargs)
  return folder, data_dir / "autoencoder"
