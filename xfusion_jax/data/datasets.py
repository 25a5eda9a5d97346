"""Names, locations and readers of the xfusion_jax TFDS datasets."""

from __future__ import annotations

import os
import pathlib
from typing import Any

import tensorflow_datasets as tfds

from xfusion_jax import assets
from xfusion_jax.data import emoji
from xfusion_jax.data import fashion_mnist
from xfusion_jax.data import image_folder

BUILDERS: dict[str, type[tfds.core.GeneratorBasedBuilder]] = {
    "fashion_mnist_captions": fashion_mnist.FashionMnistCaptions,
    "emoji_captions": emoji.EmojiCaptions,
    "image_caption_folder": image_folder.ImageCaptionFolder,
}


def default_data_dir() -> pathlib.Path:
  """`$XFUSION_JAX_DATA`, else `tensorflow_datasets/` in the asset cache."""
  env = os.environ.get("XFUSION_JAX_DATA")
  if env:
    return pathlib.Path(env)
  return assets.cache_dir() / "tensorflow_datasets"


def get_builder(name: str,
                data_dir: str | os.PathLike[str] | None = None,
                **kwargs: Any) -> tfds.core.GeneratorBasedBuilder:
  """Return the builder of dataset `name`; kwargs go to its constructor."""
  if name not in BUILDERS:
    raise ValueError(f"Unknown dataset {name!r}; expected one of "
                     f"{sorted(BUILDERS)}.")
  data_dir = str(data_dir or default_data_dir())
  return BUILDERS[name](data_dir=data_dir, file_format="array_record",
                        **kwargs)


def prepare(name: str,
            data_dir: str | os.PathLike[str] | None = None,
            source: str | None = None) -> tfds.core.GeneratorBasedBuilder:
  """Build dataset `name` as ArrayRecord files; a no-op when already built."""
  kwargs = {"source": source} if source else {}
  builder = get_builder(name, data_dir, **kwargs)
  builder.download_and_prepare()
  return builder


def is_prepared(name: str,
                data_dir: str | os.PathLike[str] | None = None) -> bool:
  return get_builder(name, data_dir).is_prepared()


def data_source(name_or_path: str | os.PathLike[str],
                split: str,
                data_dir: str | os.PathLike[str] | None = None):
  """Return a random-access source of one split of a prepared dataset.

  Args:
    name_or_path: a name in `BUILDERS`, or the version folder of a dataset
      written elsewhere (as `encode_latents` writes).
    split: "train" or "test", or any TFDS split expression.
    data_dir: where named datasets live; default `default_data_dir()`.
  """
  if str(name_or_path) in BUILDERS:
    builder = get_builder(str(name_or_path), data_dir)
    if not builder.is_prepared():
      raise FileNotFoundError(
          f"Dataset {name_or_path} is not prepared in {builder.data_dir}. "
          f"Run `python -m xfusion_jax.data.prepare --dataset={name_or_path}"
          f" --data_dir={data_dir or default_data_dir()}`.")
  else:
    builder = tfds.builder_from_directory(str(name_or_path))
  return builder.as_data_source(split=split)
