"""Parity of the Flax CLIP and SigLIP vision towers with transformers."""

import json

import jax
import numpy as np
import pytest
import torch
import transformers

from xfusion_jax import encoders
from xfusion_jax.encoders import interface

TOLERANCE = 1e-4
IMAGE_SIZE = 32
PATCH_SIZE = 8
GRID = IMAGE_SIZE // PATCH_SIZE


def _vision_fields(**overrides) -> dict:
  fields = dict(
      hidden_size=32,
      intermediate_size=48,
      num_hidden_layers=2,
      num_attention_heads=4,
      image_size=IMAGE_SIZE,
      patch_size=PATCH_SIZE,
  )
  fields.update(overrides)
  return fields


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
  """Draw LayerNorm weights and every bias at random.

  transformers initializes LayerNorm weights to 1 and biases to 0, which
  would hide a swapped or dropped LayerNorm or bias in the conversion.
  """
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in model.named_parameters():
      noise = torch.randn(param.shape, generator=generator)
      if "norm" in name and name.endswith("weight"):
        param.copy_(1.0 + 0.3 * noise)
      elif name.endswith("bias") or name.endswith("class_embedding"):
        param.copy_(0.3 * noise)
  return model.eval()


def _images(seed: int, size: int = IMAGE_SIZE, batch: int = 2) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)


def _pixel_values(images: np.ndarray, mean, std) -> torch.Tensor:
  """The normalized NCHW input transformers' processors would produce."""
  unit = (images + 1.0) / 2.0
  normalized = (unit - np.asarray(mean, np.float32)) / np.asarray(
      std, np.float32)
  return torch.from_numpy(np.ascontiguousarray(normalized.transpose(0, 3, 1,
                                                                    2)))


def _last_hidden_state(model, pixel_values: torch.Tensor) -> np.ndarray:
  with torch.no_grad():
    return model(pixel_values=pixel_values).last_hidden_state.detach().numpy()


def _save(model, folder):
  model.save_pretrained(folder)
  return folder


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_clip_features_match_transformers(tmp_path, hidden_act):
  config = transformers.CLIPVisionConfig(**_vision_fields(
      hidden_act=hidden_act))
  torch.manual_seed(0)
  model = _randomize(
      transformers.CLIPVisionModel(config).to(torch.float32), seed=1)
  encoder = encoders.load_clip_vision(_save(model, tmp_path))
  images = _images(seed=2)

  features = np.asarray(encoder.features(images))

  expected = _last_hidden_state(
      model, _pixel_values(images, interface.CLIP_MEAN, interface.CLIP_STD))
  assert features.shape == (2, GRID * GRID, 32)
  np.testing.assert_allclose(features, expected[:, 1:], atol=TOLERANCE,
                             rtol=0)
  assert encoder.feature_grid == (GRID, GRID)
  assert encoder.feature_dim == 32


@pytest.mark.parametrize("hidden_act", ["gelu_pytorch_tanh", "gelu"])
def test_siglip_features_match_transformers(tmp_path, hidden_act):
  config = transformers.SiglipVisionConfig(**_vision_fields(
      hidden_act=hidden_act))
  torch.manual_seed(0)
  model = _randomize(
      transformers.SiglipVisionModel(config).to(torch.float32), seed=1)
  encoder = encoders.load_siglip_vision(_save(model, tmp_path))
  images = _images(seed=2)

  features = np.asarray(encoder.features(images))

  # Mean and std 0.5 map [0, 1] back to [-1, 1]: the images themselves.
  expected = _last_hidden_state(model, _pixel_values(images, (0.5,) * 3,
                                                     (0.5,) * 3))
  assert features.shape == (2, GRID * GRID, 32)
  np.testing.assert_allclose(features, expected, atol=TOLERANCE, rtol=0)


def test_clip_full_model_folder_loads_vision_tower(tmp_path):
  config = transformers.CLIPConfig(
      vision_config=_vision_fields(),
      text_config=dict(hidden_size=16, intermediate_size=24,
                       num_hidden_layers=1, num_attention_heads=2,
                       vocab_size=64, max_position_embeddings=16),
      projection_dim=8)
  torch.manual_seed(0)
  model = _randomize(transformers.CLIPModel(config).to(torch.float32), seed=3)
  encoder = encoders.load_clip_vision(_save(model, tmp_path))
  images = _images(seed=4)

  features = np.asarray(encoder.features(images))

  expected = _last_hidden_state(
      model.vision_model,
      _pixel_values(images, interface.CLIP_MEAN, interface.CLIP_STD))
  np.testing.assert_allclose(features, expected[:, 1:], atol=TOLERANCE,
                             rtol=0)


def test_siglip_full_model_folder_loads_vision_tower(tmp_path):
  config = transformers.SiglipConfig(
      vision_config=_vision_fields(),
      text_config=dict(hidden_size=16, intermediate_size=24,
                       num_hidden_layers=1, num_attention_heads=2,
                       vocab_size=64, max_position_embeddings=16))
  torch.manual_seed(0)
  model = _randomize(transformers.SiglipModel(config).to(torch.float32),
                     seed=3)
  encoder = encoders.load_siglip_vision(_save(model, tmp_path))
  images = _images(seed=4)

  features = np.asarray(encoder.features(images))

  expected = _last_hidden_state(model.vision_model,
                                _pixel_values(images, (0.5,) * 3, (0.5,) * 3))
  np.testing.assert_allclose(features, expected, atol=TOLERANCE, rtol=0)


@pytest.fixture(name="clip_folder", scope="module")
def fixture_clip_folder(tmp_path_factory):
  torch.manual_seed(0)
  model = transformers.CLIPVisionModel(
      transformers.CLIPVisionConfig(**_vision_fields()))
  return _save(_randomize(model, seed=5), tmp_path_factory.mktemp("clip"))


def test_preprocessor_statistics_override_defaults(clip_folder, tmp_path):
  for path in clip_folder.iterdir():
    (tmp_path / path.name).write_bytes(path.read_bytes())
  (tmp_path / "preprocessor_config.json").write_text(
      json.dumps({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5,
                                                               0.5]}))

  encoder = encoders.load_clip_vision(tmp_path)

  assert encoder.preprocessing.mean == (0.5, 0.5, 0.5)
  assert encoder.preprocessing.std == (0.5, 0.5, 0.5)


def test_gray_images_match_repeated_rgb(clip_folder):
  encoder = encoders.load_clip_vision(clip_folder)
  gray = _images(seed=6)[..., :1]

  np.testing.assert_array_equal(
      np.asarray(encoder.features(gray)),
      np.asarray(encoder.features(np.repeat(gray, 3, axis=-1))))


def test_other_image_sizes_are_resized(clip_folder):
  encoder = encoders.load_clip_vision(clip_folder)

  features = encoder.features(_images(seed=7, size=20, batch=3))

  assert features.shape == (3, GRID * GRID, 32)
  assert np.isfinite(np.asarray(features)).all()


def test_config_mismatch_names_missing_tensors(clip_folder, tmp_path):
  for path in clip_folder.iterdir():
    (tmp_path / path.name).write_bytes(path.read_bytes())
  config = json.loads((tmp_path / "config.json").read_text())
  config["num_hidden_layers"] = 3
  (tmp_path / "config.json").write_text(json.dumps(config))

  with pytest.raises(ValueError, match="missing.*layers_2"):
    encoders.load_clip_vision(tmp_path)


def test_siglip_loader_rejects_clip_folder(clip_folder):
  with pytest.raises(ValueError, match="Expected a SigLIP config"):
    encoders.load_siglip_vision(clip_folder)


def test_images_without_channel_axis_are_rejected(clip_folder):
  encoder = encoders.load_clip_vision(clip_folder)

  with pytest.raises(ValueError, match="Expected images of shape"):
    encoder.features(np.zeros((2, IMAGE_SIZE, IMAGE_SIZE), np.float32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_load_as_float32(tmp_path, dtype):
  torch.manual_seed(0)
  model = _randomize(
      transformers.CLIPVisionModel(
          transformers.CLIPVisionConfig(**_vision_fields())), seed=8)
  model = model.to(dtype)
  encoder = encoders.load_clip_vision(_save(model, tmp_path))
  images = _images(seed=9)

  features = np.asarray(encoder.features(images))

  # The reference runs the same rounded weights in float32.
  expected = _last_hidden_state(
      model.to(torch.float32),
      _pixel_values(images, interface.CLIP_MEAN, interface.CLIP_STD))
  assert jax.tree.leaves(encoder.variables)[0].dtype == np.float32
  np.testing.assert_allclose(features, expected[:, 1:], atol=TOLERANCE,
                             rtol=0)
