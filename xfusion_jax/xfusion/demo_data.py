"""The embedded default's data: Fashion-MNIST captions as demo-AE latents.

`prepare()` builds what the CPU demo trains on, each part once, in the
asset cache: the captioned dataset, the small autoencoder trained on it
(`configs/autoencoder_demo.py`, about ten minutes on two cores) and the
latent dataset that autoencoder writes. Later calls reuse them.
"""

from __future__ import annotations

import os
import pathlib
import shutil

from absl import logging

from xfusion_jax import assets
from xfusion_jax.autoencoder import interface
from xfusion_jax.autoencoder import train_demo
from xfusion_jax.data import datasets
from xfusion_jax.data import encode_latents

DATASET = "fashion_mnist_captions"


def default_root() -> pathlib.Path:
  return assets.cache_dir() / "demo"


def prepare(root: str | os.PathLike[str] | None = None,
            feature_encoder: str = ""
            ) -> tuple[pathlib.Path, pathlib.Path]:
  """Return (latent dataset folder, autoencoder folder), building the missing.

  The latents live inside the autoencoder's folder, so a retrained
  autoencoder never meets latents of an earlier one.

  Args:
    root: folder of the demo's files; default `default_root()`.
    feature_encoder: also store this encoder's patch features with the
      latents, for the alignment loss ("efficientnet_lite0"; see
      `encode_latents.FEATURE_ENCODERS`). Such a dataset is a separate
      folder beside the one without features. NOTE: this encodes all 70,000
      images at the encoder's input size once; its CPU time was not measured.
  """
  root = pathlib.Path(root or default_root())
  autoencoder_dir = root / "fashion_mnist_autoencoder"
  datasets.prepare(DATASET)
  if not autoencoder_dir.exists():
    logging.info("Training the demo autoencoder into %s (once).",
                 autoencoder_dir)
    result = train_demo.train(train_demo.default_config())
    # Saved beside and renamed, so that an interrupted save is retrained.
    partial = root / "fashion_mnist_autoencoder.partial"
    shutil.rmtree(partial, ignore_errors=True)
    result.autoencoder.save(partial)
    partial.rename(autoencoder_dir)
    logging.info("Demo autoencoder: held-out PSNR %.2f dB.", result.psnr)
  autoencoder = interface.load(autoencoder_dir)
  encoder = None
  if feature_encoder:
    encoder = encode_latents.load_feature_encoder(feature_encoder)
  latents = encode_latents.encode_latents(
      DATASET, autoencoder, output_dir=autoencoder_dir / "latents",
      feature_encoder=encoder, feature_encoder_name=feature_encoder)
  return latents, autoencoder_dir
