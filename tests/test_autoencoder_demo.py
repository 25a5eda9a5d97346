"""The demo KL autoencoder trains to a PSNR floor and saves and reloads."""

import importlib.util
import pathlib

import jax
import numpy as np
import pytest

from xfusion_jax import autoencoder
from xfusion_jax.autoencoder import train_demo

# Floor for 150 steps of batch 32. NOTE: 17.0 dB was measured after 200
# steps on a 2-core CPU; the margin at 150 steps is an estimate.
PSNR_FLOOR_DB = 15.0


def _demo_config(data_dir):
  path = pathlib.Path(__file__).parent.parent / "configs/autoencoder_demo.py"
  spec = importlib.util.spec_from_file_location("autoencoder_demo", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data_dir = str(data_dir)
  config.num_steps = 150
  config.warmup_steps = 20
  config.log_every = 50
  config.eval_examples = 1000
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  config = _demo_config(tmp_path_factory.mktemp("tfds"))
  return config, train_demo.train(config)


def _test_images(config) -> np.ndarray:
  batches = train_demo._images(config, "test", 1, False, 500)  # pylint: disable=protected-access
  return np.concatenate([next(batches), next(batches)])


def test_demo_autoencoder_reaches_psnr_floor(trained):
  config, result = trained
  images = _test_images(config)
  mean_image = np.mean(images, axis=0, keepdims=True)
  baseline_mse = np.mean(((images - mean_image) / 2.0)**2)
  baseline_db = 10 * np.log10(1.0 / baseline_mse)

  assert result.psnr >= PSNR_FLOOR_DB
  assert result.psnr >= baseline_db + 3.0


def test_latents_have_unit_scale(trained):
  config, result = trained
  latents = np.asarray(result.autoencoder.encode(_test_images(config)))

  assert latents.shape == (1000, 7, 7, 4)
  assert 0.8 < np.std(latents) < 1.25


def test_save_and_load_round_trip(trained, tmp_path):
  config, result = trained
  images = _test_images(config)[:8]
  result.autoencoder.save(tmp_path / "ae")

  loaded = autoencoder.load(tmp_path / "ae")

  assert loaded.config == result.autoencoder.config
  np.testing.assert_array_equal(np.asarray(loaded.encode(images)),
                                np.asarray(result.autoencoder.encode(images)))
  latents = result.autoencoder.encode(images, jax.random.key(1))
  np.testing.assert_array_equal(np.asarray(loaded.decode(latents)),
                                np.asarray(result.autoencoder.decode(latents)))
