"""TFDS builder for Fashion-MNIST with captions made from the class names.

The images come from the Debian package `dataset-fashion-mnist`, fetched and
hash-checked by `xfusion_jax.assets`. Features are raw tensors and text, so
the builder writes ArrayRecord files without TensorFlow installed.
"""

from __future__ import annotations

import gzip
import pathlib
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from xfusion_jax import assets

IMAGE_SHAPE = (28, 28, 1)

# Class names in label order, written as a caption would name them.
CLASS_NAMES = (
    "t-shirt",
    "pair of trousers",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)

# "{a}" is the indefinite article that fits the class name.
CAPTION_TEMPLATES = (
    "a photo of {a} {name}",
    "{a} {name}",
    "a picture of {a} {name}",
    "a black and white photo of {a} {name}",
    "a small image of {a} {name}",
    "{name}",
)

_SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_PACKAGE_DIR = "usr/share/datasets/fashion-mnist"

# Seed of the per-split template choice, so that rebuilding gives the same
# captions.
_TEMPLATE_SEED = 20200523


def caption_for(label: int, template_index: int) -> str:
  name = CLASS_NAMES[label]
  article = "an" if name[0] in "aeiou" else "a"
  return CAPTION_TEMPLATES[template_index].format(a=article, name=name)


def read_idx(path: pathlib.Path) -> np.ndarray:
  """Read a gzipped IDX file (the MNIST format) into a uint8 array."""
  with gzip.open(path, "rb") as f:
    data = f.read()
  magic = int.from_bytes(data[0:4], "big")
  if magic >> 8 != 0x08:
    raise ValueError(f"{path} is not an unsigned-byte IDX file (magic "
                     f"{magic:#x}).")
  ndim = magic & 0xFF
  shape = tuple(
      int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  offset = 4 + 4 * ndim
  return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def default_source() -> pathlib.Path:
  """Fetch the pinned Debian package and return its data folder."""
  return assets.fetch(assets.FASHION_MNIST_DEB) / _PACKAGE_DIR


class FashionMnistCaptions(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST, 60k train and 10k test 28x28 grayscale, with captions."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}

  def __init__(self, *, source: str | None = None, **kwargs):
    """Args: source: folder with the four IDX .gz files; default: the package."""
    self._source = source
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            "Fashion-MNIST (MIT license) from the Debian package "
            "dataset-fashion-mnist, captioned from the class name through "
            f"{len(CAPTION_TEMPLATES)} templates."),
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "image": tfds.features.Tensor(shape=IMAGE_SHAPE, dtype=np.uint8),
            "caption": tfds.features.Text(),
            "label": tfds.features.Scalar(dtype=np.int64),
        }),
        homepage="https://github.com/zalandoresearch/fashion-mnist",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The data comes from a pinned package, not a URL.
    source = pathlib.Path(self._source) if self._source else default_source()
    return {
        split: self._generate_examples(source, split)
        for split in _SPLIT_FILES
    }

  def _generate_examples(self, source: pathlib.Path,
                         split: str) -> Iterator[tuple[str, dict]]:
    image_file, label_file = _SPLIT_FILES[split]
    images = read_idx(source / image_file)
    labels = read_idx(source / label_file)
    if len(images) != len(labels):
      raise ValueError(f"{split}: {len(images)} images but {len(labels)} "
                       "labels.")
    rng = np.random.default_rng([_TEMPLATE_SEED, len(images)])
    templates = rng.integers(len(CAPTION_TEMPLATES), size=len(images))
    for i, (image, label) in enumerate(zip(images, labels)):
      record_id = f"{split}/{i:05d}"
      yield record_id, {
          "id": record_id,
          "image": image[:, :, None],
          "caption": caption_for(int(label), int(templates[i])),
          "label": int(label),
      }
