"""Names, locations and readers of the xfusion_jax TFDS datasets."""

from __future__ import annotations

import importlib.util
import os
import pathlib
from typing import Any

import tensorflow_datasets as tfds
from tensorflow_datasets.core import shuffle as tfds_shuffle

from xfusion_jax import assets
from xfusion_jax.data import emoji
from xfusion_jax.data import fashion_mnist
from xfusion_jax.data import image_folder

# Share of the available memory that tfds's shuffle buffer may use when
# TensorFlow is not installed.
SHUFFLE_MEMORY_SHARE = 0.6

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
  build(builder)
  return builder


def _available_memory_bytes() -> int:
  """Return MemAvailable of /proc/meminfo, or the free memory elsewhere."""
  try:
    with open("/proc/meminfo", encoding="ascii") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def build(builder: tfds.core.DatasetBuilder,
          estimated_bytes: int | None = None) -> None:
  """Write `builder`'s dataset unless it is already written.

  Above a fixed buffer size (1 GB in tfds 4.9.10) tfds spills the records
  it shuffles to disk through `tf.io.gfile`, which needs TensorFlow.
  xfusion_jax does not install TensorFlow, so without it the buffer may
  grow to SHUFFLE_MEMORY_SHARE of the available memory.

  Args:
    builder: the dataset to write.
    estimated_bytes: serialized size of the largest split, if known, so that
      a split too large for memory is rejected before any work.

  Raises:
    MemoryError: without TensorFlow, when a split exceeds that buffer.
  """
  if builder.is_prepared():
    return
  if importlib.util.find_spec("tensorflow") is not None:
    builder.download_and_prepare()
    return
  available = _available_memory_bytes()
  limit = int(SHUFFLE_MEMORY_SHARE * available)
  name = builder.name
  if builder.builder_config is not None:
    name = f"{name}/{builder.builder_config.name}"
  advice = ("Install TensorFlow (pip install tensorflow-cpu) so that tfds "
            "spills the split to disk, or run on a machine with more memory.")
  if estimated_bytes is not None and estimated_bytes > limit:
    raise MemoryError(
        f"Dataset {name} needs about {estimated_bytes / 2**30:.1f} GiB of "
        f"memory to write its largest split, but only {limit / 2**30:.1f} "
        f"GiB of the {available / 2**30:.1f} GiB available may be used. "
        f"{advice}")
  # NOTE: this sets a module constant of tfds, which its later versions may
  # rename. The shuffler reads it on every record, so the change applies.
  default = tfds_shuffle.MAX_MEM_BUFFER_SIZE
  tfds_shuffle.MAX_MEM_BUFFER_SIZE = max(default, limit)
  try:
    builder.download_and_prepare()
  except ModuleNotFoundError as e:
    if e.name != "tensorflow":
      raise
    raise MemoryError(
        f"A split of dataset {name} exceeds {limit / 2**30:.1f} GiB, the "
        f"memory that tfds may use to shuffle it without TensorFlow. "
        f"{advice}") from e
  finally:
    tfds_shuffle.MAX_MEM_BUFFER_SIZE = default


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
