r"""Train the small demo KL autoencoder and report held-out PSNR.

  python -m xfusion_jax.autoencoder.train_demo \
      --config=configs/autoencoder_demo.py --workdir=/tmp/ae_demo

The trained autoencoder is saved in --workdir and loads with
`xfusion_jax.autoencoder.load(workdir)`.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import ml_collections
import numpy as np
import optax

from xfusion_jax import hostenv
from xfusion_jax.autoencoder import interface
from xfusion_jax.autoencoder import modules
from xfusion_jax.data import datasets
from xfusion_jax.data import decode
from xfusion_jax.data import pipeline


@dataclasses.dataclass
class TrainResult:
  autoencoder: interface.ImageAutoencoder
  psnr: float
  steps_per_second: float


def model_config(config: ml_collections.ConfigDict) -> modules.AutoencoderConfig:
  return modules.AutoencoderConfig(
      in_channels=config.image_channels,
      out_channels=config.image_channels,
      block_out_channels=tuple(config.model.block_out_channels),
      layers_per_block=config.model.layers_per_block,
      latent_channels=config.model.latent_channels,
      norm_num_groups=config.model.norm_num_groups,
      mid_block_add_attention=config.model.mid_block_add_attention,
      scaling_factor=config.model.scaling_factor,
  )


def default_config() -> ml_collections.ConfigDict:
  """Settings of the demo autoencoder: 28x28x1 images to 7x7x4 latents."""
  config = ml_collections.ConfigDict()
  config.dataset = "fashion_mnist_captions"
  config.data_dir = ml_collections.FieldReference(None, field_type=str)
  config.image_size = 28
  config.image_channels = 1

  config.model = ml_collections.ConfigDict()
  config.model.block_out_channels = (16, 32, 32)
  config.model.layers_per_block = 1
  config.model.latent_channels = 4
  config.model.norm_num_groups = 8
  config.model.mid_block_add_attention = True
  # Set after training from the latents' standard deviation, so that the
  # diffusion model sees latents of about unit variance.
  config.model.scaling_factor = 1.0

  config.seed = 0
  config.batch_size = 32
  config.num_steps = 1500
  config.learning_rate = 1e-3
  config.warmup_steps = 100
  # Weight of the KL term against the per-pixel MSE; small, as in the SD-VAE,
  # so that latents stay informative.
  config.kl_weight = 1e-6
  config.log_every = 100
  config.eval_examples = 2000
  return config


def _loss_fn(params, module, images, rng, kl_weight):
  recon, mean, logvar = module.apply({"params": params}, images, rng)
  mse = jnp.mean((recon - images)**2)
  kl = 0.5 * jnp.mean(jnp.sum(mean**2 + jnp.exp(logvar) - 1.0 - logvar,
                              axis=(1, 2, 3)))
  return mse + kl_weight * kl, (mse, kl)


def make_train_step(module: modules.AutoencoderKL,
                    optimizer: optax.GradientTransformation, kl_weight: float):
  """Return a jitted (params, opt_state, images, rng) -> (..., metrics)."""

  @jax.jit
  def train_step(params, opt_state, images, rng):
    grads, (mse, kl) = jax.grad(_loss_fn, has_aux=True)(
        params, module, images, rng, kl_weight)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {"mse": mse, "kl": kl}

  return train_step


def psnr(autoencoder: interface.ImageAutoencoder, images: np.ndarray,
         batch_size: int = 250) -> float:
  """PSNR in dB of posterior-mean reconstructions, on the [0, 1] scale.

  Computed from the mean squared error over all pixels of `images`
  (float32 [N, H, W, C] in [-1, 1]), with decoded values clipped to [-1, 1].
  """
  squared_error = 0.0
  for start in range(0, len(images), batch_size):
    batch = images[start:start + batch_size]
    recon = np.clip(np.asarray(autoencoder.decode(autoencoder.encode(batch))),
                    -1.0, 1.0)
    squared_error += float(np.sum(((recon - batch) / 2.0)**2))
  mse = squared_error / images.size
  return float(10.0 * np.log10(1.0 / mse))


def _images(config: ml_collections.ConfigDict, split: str,
            num_epochs: int | None, shuffle: bool, batch_size: int):
  pipeline_config = pipeline.PipelineConfig(
      dataset=config.dataset, split=split, data_dir=config.data_dir,
      batch_size=batch_size, seed=config.seed, shuffle=shuffle,
      num_epochs=num_epochs, drop_remainder=False,
      decode=decode.DecodeConfig(image_size=config.image_size,
                                 image_channels=config.image_channels))
  return (batch["image"] for batch in pipeline.make_dataset(
      pipeline_config, None, process_index=0, process_count=1))


def train(config: ml_collections.ConfigDict) -> TrainResult:
  """Train on the train split; return the autoencoder and test-split PSNR."""
  datasets.prepare(config.dataset, config.data_dir)
  ae_config = model_config(config)
  module = modules.AutoencoderKL(ae_config)
  rng = jax.random.key(config.seed)
  params = interface.init_params(ae_config, rng, config.image_size)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, config.learning_rate, config.warmup_steps, config.num_steps)
  optimizer = optax.adam(schedule)
  opt_state = optimizer.init(params)
  train_step = make_train_step(module, optimizer, config.kl_weight)

  batches = _images(config, "train", None, True, config.batch_size)
  start = time.perf_counter()
  for step, images in zip(range(config.num_steps), batches):
    if step == 1:
      start = time.perf_counter()  # Leave compilation out of the rate.
    params, opt_state, metrics = train_step(params, opt_state, images,
                                            jax.random.fold_in(rng, step))
    if (step + 1) % config.log_every == 0:
      logging.info("step %d: mse %.5f kl %.2f", step + 1,
                   float(metrics["mse"]), float(metrics["kl"]))
  jax.block_until_ready(params)
  steps_per_second = (config.num_steps - 1) / (time.perf_counter() - start)

  test_images = np.concatenate(list(itertools.islice(
      _images(config, "test", 1, False, 500),
      -(-config.eval_examples // 500))))[:config.eval_examples]
  autoencoder = interface.ImageAutoencoder(ae_config, params)
  autoencoder = _with_unit_scale(autoencoder, test_images)
  return TrainResult(autoencoder, psnr(autoencoder, test_images),
                     steps_per_second)


def _with_unit_scale(autoencoder: interface.ImageAutoencoder,
                     images: np.ndarray) -> interface.ImageAutoencoder:
  """Set scaling_factor to 1 / std of the unscaled latent means."""
  unscaled = interface.ImageAutoencoder(
      dataclasses.replace(autoencoder.config, scaling_factor=1.0),
      autoencoder.params)
  std = float(np.std(np.asarray(unscaled.encode(images[:1000]))))
  config = dataclasses.replace(autoencoder.config, scaling_factor=1.0 / std)
  return interface.ImageAutoencoder(config, autoencoder.params)


def _define_flags() -> None:
  # Defined only when run as a program, so that importing `train` next to
  # another command's module cannot redefine --config or --workdir.
  config_flags.DEFINE_config_file(
      "config", None, "Path of an ml_collections config file.")
  flags.DEFINE_string("workdir", None,
                      "Folder the trained autoencoder is saved in.")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv: Any) -> None:
  del argv
  result = train(flags.FLAGS.config)
  result.autoencoder.save(flags.FLAGS.workdir)
  message = (f"Held-out PSNR {result.psnr:.2f} dB after "
             f"{flags.FLAGS.config.num_steps} steps ({result.steps_per_second:.1f}"
             f" steps/s); saved to {flags.FLAGS.workdir}")
  logging.info(message)
  print(message)


if __name__ == "__main__":
  hostenv.restart_with_hugepage_malloc()
  _define_flags()
  app.run(main)
