"""Parity of the Flax KL autoencoder with diffusers' PyTorch AutoencoderKL."""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from xfusion_jax import autoencoder

TOLERANCE = 1e-4


def _tiny_diffusers_model(seed: int, **overrides) -> AutoencoderKL:
  config = dict(
      in_channels=3,
      out_channels=3,
      down_block_types=("DownEncoderBlock2D",) * 3,
      up_block_types=("UpDecoderBlock2D",) * 3,
      block_out_channels=(8, 16, 16),
      layers_per_block=2,
      latent_channels=4,
      norm_num_groups=4,
      sample_size=16,
      scaling_factor=0.3,
  )
  config.update(overrides)
  torch.manual_seed(seed)
  model = AutoencoderKL(**config).eval()
  # Random norm scales and biases, so that a swapped or untransposed
  # parameter changes the output.
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "norm" in name:
        param.copy_(torch.randn_like(param) * 0.3 + (1.0 if
                                                      name.endswith("weight")
                                                      else 0.0))
  return model


@pytest.fixture(scope="module", params=[{}, {"shift_factor": 0.1,
                                             "use_quant_conv": False}])
def model_pair(request, tmp_path_factory):
  model = _tiny_diffusers_model(seed=0, **request.param)
  folder = tmp_path_factory.mktemp("vae")
  model.save_pretrained(folder, safe_serialization=True)
  return model, autoencoder.load(folder)


def _images(seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return rng.uniform(-1, 1, size=(2, 16, 16, 3)).astype(np.float32)


def _to_torch(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _from_torch(x: torch.Tensor) -> np.ndarray:
  return x.detach().numpy().transpose(0, 2, 3, 1)


def test_config_read_from_folder(model_pair):
  torch_model, flax_model = model_pair
  assert flax_model.config.scaling_factor == pytest.approx(0.3)
  assert flax_model.config.downsample_factor == 4
  assert flax_model.config.use_quant_conv == torch_model.config.use_quant_conv


def test_encoder_moments_match_diffusers(model_pair):
  torch_model, flax_model = model_pair
  images = _images(1)
  with torch.no_grad():
    posterior = torch_model.encode(_to_torch(images)).latent_dist
  scale = torch_model.config.scaling_factor
  shift = torch_model.config.shift_factor or 0.0
  expected_mean = (_from_torch(posterior.mean) - shift) * scale
  expected_logvar = _from_torch(posterior.logvar) + 2 * np.log(scale)

  mean, logvar = flax_model.moments(images)

  assert mean.shape == (2, 4, 4, 4)
  np.testing.assert_allclose(np.asarray(mean), expected_mean, atol=TOLERANCE,
                             rtol=0)
  np.testing.assert_allclose(np.asarray(logvar), expected_logvar,
                             atol=TOLERANCE, rtol=0)


def test_decoder_matches_diffusers(model_pair):
  torch_model, flax_model = model_pair
  latents = np.random.default_rng(2).normal(size=(2, 4, 4, 4)).astype(
      np.float32)
  scale = torch_model.config.scaling_factor
  shift = torch_model.config.shift_factor or 0.0
  with torch.no_grad():
    expected = _from_torch(
        torch_model.decode(_to_torch(latents / scale + shift)).sample)

  images = flax_model.decode(latents)

  assert images.shape == (2, 16, 16, 3)
  np.testing.assert_allclose(np.asarray(images), expected, atol=TOLERANCE,
                             rtol=0)


def test_mismatched_checkpoint_is_rejected(tmp_path):
  model = _tiny_diffusers_model(seed=0)
  model.save_pretrained(tmp_path, safe_serialization=True)
  config_path = tmp_path / "config.json"
  config_path.write_text(config_path.read_text().replace(
      '"layers_per_block": 2', '"layers_per_block": 1'))

  with pytest.raises(ValueError, match="does not match the config"):
    autoencoder.load(tmp_path)
