"""The frozen image-encoder interface: images in, patch features out.

Every encoder takes NHWC float images in [-1, 1], the range the image
autoencoder uses, and converts them to its own input. It repeats a single
gray channel to RGB, resizes the whole image to its input size and normalizes
with the mean and standard deviation it was trained with. Non-square images
are stretched, not center-cropped as transformers' CLIPImageProcessor does.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

# torchvision's ImageNet statistics, used by EfficientNet-Lite.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# OpenAI CLIP's statistics, the default of transformers' CLIPImageProcessor.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """Input size, statistics and resampling of one encoder.

  Attributes:
    image_size: (height, width) of the encoder's input.
    mean: per-channel mean of images in [0, 1], subtracted.
    std: per-channel standard deviation of images in [0, 1], divided by.
    resize_method: a `jax.image.resize` method. Resizing antialiases when it
      shrinks an image.
  """

  image_size: tuple[int, int]
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  resize_method: str = "bilinear"


def preprocess(images: jax.Array, spec: Preprocessing) -> jax.Array:
  """Convert images in [-1, 1] to the normalized input an encoder expects.

  Args:
    images: float [batch, height, width, channels] in [-1, 1], with 1 (gray)
      or 3 (RGB) channels.
    spec: the encoder's input size and statistics.

  Returns:
    float32 [batch, *spec.image_size, 3].
  """
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(
        f"Expected images of shape [batch, height, width, 1 or 3], got "
        f"{images.shape}.")
  images = jnp.asarray(images, jnp.float32)
  if images.shape[-1] == 1:
    images = jnp.repeat(images, 3, axis=-1)
  target = (images.shape[0], *spec.image_size, 3)
  if images.shape != target:
    images = jax.image.resize(images, target, spec.resize_method)
  unit = (images + 1.0) * 0.5
  mean = jnp.asarray(spec.mean, jnp.float32)
  std = jnp.asarray(spec.std, jnp.float32)
  return (unit - mean) / std


class ImageEncoder(abc.ABC):
  """A frozen pretrained image encoder with jitted patch features.

  Attributes:
    preprocessing: input size and statistics of the encoder.
    feature_grid: (height, width) of the patch grid that `features` returns.
    feature_dim: channels of each patch feature.
    variables: the Flax variables of the encoder.
  """

  def __init__(self, preprocessing: Preprocessing,
               feature_grid: tuple[int, int], feature_dim: int,
               variables: Any):
    self.preprocessing = preprocessing
    self.feature_grid = feature_grid
    self.feature_dim = feature_dim
    self.variables = variables

  @abc.abstractmethod
  def features_from_pixels(self, variables: Any,
                           pixels: jax.Array) -> jax.Array:
    """Compute patch features [batch, patches, dim] of preprocessed pixels.

    Patches are in row-major order of `feature_grid`.
    """

  @functools.cached_property
  def _features(self):

    def run(variables, images):
      pixels = preprocess(images, self.preprocessing)
      return self.features_from_pixels(variables, pixels)

    return jax.jit(run)

  def features(self, images: jax.Array) -> jax.Array:
    """Compute the patch features of images.

    Args:
      images: float [batch, height, width, 1 or 3] in [-1, 1], any size.

    Returns:
      float32 [batch, grid_height * grid_width, feature_dim], patches in
      row-major order of `feature_grid`.
    """
    return self._features(self.variables, images)
