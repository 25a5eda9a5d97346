r"""Pre-encode a dataset's images into autoencoder latents.

  python -m xfusion_jax.data.encode_latents \
      --dataset=fashion_mnist_captions --autoencoder=/tmp/ae_demo

Writes, for every split, the posterior mean and log-variance of the scaled
latent (what `ImageAutoencoder.moments` returns) with the caption, label and
id, as a new ArrayRecord dataset `image_latents/<dataset>`. Training then
samples latents in the input pipeline and never runs the encoder. Bad records
are skipped and counted as in the input pipeline.

With `--feature_encoder=efficientnet_lite0` (or `clip` / `siglip` with
`--feature_encoder_dir`), every record also stores that frozen encoder's
patch features of the clean image, `encoder_features` [patches, dim] in
float16, for the alignment loss. Such a dataset goes to
`image_latents/<dataset>_<encoder>`, and `metadata.json` in its version
folder names the encoder and its patch grid.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Iterator

from absl import app
from absl import flags
from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from xfusion_jax import autoencoder as autoencoder_lib
from xfusion_jax import encoders
from xfusion_jax import hostenv
from xfusion_jax.data import bad_records
from xfusion_jax.data import datasets
from xfusion_jax.data import decode
from xfusion_jax.data import tokenize

FEATURE_ENCODERS = ("efficientnet_lite0", "clip", "siglip")
# Written by tfds.core.MetadataDict into the dataset's version folder.
_METADATA_FILE = "metadata.json"
# Serialization overhead of one record beyond its tensors and text: an
# estimate that covers the feature keys and tf.train.Example framing.
_RECORD_OVERHEAD_BYTES = 1024


class ImageLatents(tfds.core.GeneratorBasedBuilder):
  """Latent posteriors of another dataset's images, with its captions."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}

  def __init__(self,
               *,
               source_dataset: str,
               autoencoder: autoencoder_lib.ImageAutoencoder | None = None,
               image_size: int | None = None,
               source_data_dir: str | None = None,
               batch_size: int = 256,
               max_bad_fraction: float = 0.01,
               feature_encoder: encoders.ImageEncoder | None = None,
               feature_encoder_name: str = "",
               **kwargs):
    if (feature_encoder is None) != (not feature_encoder_name):
      raise ValueError(
          "Pass feature_encoder and feature_encoder_name together, got "
          f"feature_encoder={feature_encoder!r} and "
          f"feature_encoder_name={feature_encoder_name!r}.")
    self._feature_encoder = feature_encoder
    self._feature_encoder_name = feature_encoder_name
    self._source_dataset = source_dataset
    self._autoencoder = autoencoder
    self._image_size = image_size
    self._source_data_dir = source_data_dir
    self._batch_size = batch_size
    self._max_bad_fraction = max_bad_fraction
    # Datasets with and without features get separate folders, so that the
    # reuse of a written dataset never returns one without the features.
    name = source_dataset
    if feature_encoder_name:
      name = f"{source_dataset}_{feature_encoder_name}"
    super().__init__(config=tfds.core.BuilderConfig(name=name), **kwargs)

  def largest_split_bytes(self) -> int:
    """Estimate the serialized size of the largest split, in bytes."""
    ae = self._autoencoder
    side = self._image_size // ae.config.downsample_factor
    record = 2 * 4 * side * side * ae.config.latent_channels
    if self._feature_encoder is not None:
      grid_height, grid_width = self._feature_encoder.feature_grid
      record += 2 * grid_height * grid_width * self._feature_encoder.feature_dim
    splits = datasets.get_builder(self._source_dataset,
                                  self._source_data_dir).info.splits
    largest = max(split.num_examples for split in splits.values())
    return largest * (record + _RECORD_OVERHEAD_BYTES)

  def _info(self) -> tfds.core.DatasetInfo:
    ae = self._autoencoder
    if ae is None or self._image_size is None:
      raise ValueError("Writing latents needs the autoencoder and image_size.")
    side = self._image_size // ae.config.downsample_factor
    shape = (side, side, ae.config.latent_channels)
    features = {
        "id": tfds.features.Text(),
        "latent_mean": tfds.features.Tensor(shape=shape, dtype=np.float32),
        "latent_logvar": tfds.features.Tensor(shape=shape, dtype=np.float32),
        "caption": tfds.features.Text(),
        "label": tfds.features.Scalar(dtype=np.int64),
    }
    metadata = None
    encoder = self._feature_encoder
    if encoder is not None:
      grid_height, grid_width = encoder.feature_grid
      # float16 halves the storage, and the cosine loss does not need more
      # precision. Without BYTES encoding tfds would store every value as a
      # float32 in a float_list, doubling the size and the write time.
      features["encoder_features"] = tfds.features.Tensor(
          shape=(grid_height * grid_width, encoder.feature_dim),
          dtype=np.float16, encoding=tfds.features.Encoding.BYTES)
      metadata = tfds.core.MetadataDict(
          feature_encoder=self._feature_encoder_name,
          feature_grid=[grid_height, grid_width])
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            f"Scaled latent posteriors of {self._source_dataset} images "
            f"({self._image_size}x{self._image_size}) under a KL "
            f"autoencoder with scaling_factor {ae.config.scaling_factor:.6g} "
            f"and shift_factor {ae.config.shift_factor:.6g}."),
        features=tfds.features.FeaturesDict(features),
        metadata=metadata,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    builder = datasets.get_builder(self._source_dataset,
                                   self._source_data_dir)
    return {
        split: self._generate_examples(split)
        for split in builder.info.splits
    }

  def _generate_examples(self, split: str) -> Iterator[tuple[str, dict]]:
    source = datasets.data_source(self._source_dataset, split,
                                  self._source_data_dir)
    counter = bad_records.BadRecordCounter(
        max_bad_fraction=self._max_bad_fraction,
        name=f"{self._source_dataset}/{split}")
    pending = []
    for index in range(len(source)):
      item = _checked_record(source[index], index, self._decode_config(),
                             counter)
      if item is not None:
        pending.append(item)
      if len(pending) == self._batch_size:
        yield from self._encode(pending)
        pending = []
    if pending:
      yield from self._encode(pending)
    logging.info("%s/%s: %d records, bad: %s", self._source_dataset, split,
                 counter.seen, counter.summary())

  def _decode_config(self) -> decode.DecodeConfig:
    return decode.DecodeConfig(
        image_size=self._image_size,
        image_channels=self._autoencoder.config.in_channels)

  def _encode(self, items: list[dict[str, Any]]):
    images = np.stack([item.pop("image") for item in items])
    mean, logvar = self._autoencoder.moments(images)
    mean, logvar = np.asarray(mean), np.asarray(logvar)
    extra = [{} for _ in items]
    if self._feature_encoder is not None:
      features = np.asarray(self._feature_encoder.features(images))
      extra = [{"encoder_features": f.astype(np.float16)} for f in features]
    for i, item in enumerate(items):
      yield item["id"], dict(item, latent_mean=mean[i],
                             latent_logvar=logvar[i], **extra[i])


def _checked_record(record: dict[str, Any], index: int,
                    config: decode.DecodeConfig,
                    counter: bad_records.BadRecordCounter) -> dict | None:
  record_id = record["id"].decode("utf-8", "backslashreplace")
  try:
    caption = tokenize.decode_caption(record["caption"])
    if "image_bytes" in record:
      pixels = decode.decode_image_bytes(record["image_bytes"], config)
    else:
      pixels = decode.check_image_tensor(np.asarray(record["image"]), config)
  except bad_records.BadRecordError as e:
    counter.add_bad(record_id or f"#{index}", e)
    return None
  counter.add_good()
  return {
      "id": record_id,
      "image": pixels.astype(np.float32) / 127.5 - 1.0,
      "caption": caption,
      "label": int(record.get("label", -1)),
  }


def stored_image_size(dataset: str, data_dir: str | None) -> int | None:
  features = datasets.get_builder(dataset, data_dir).info.features
  if "image" in features:
    return int(features["image"].shape[0])
  return None


def load_feature_encoder(
    name: str,
    folder: str | os.PathLike[str] | None = None) -> encoders.ImageEncoder:
  """Load a frozen image encoder by name.

  Args:
    name: one of FEATURE_ENCODERS.
    folder: transformers folder of a "clip" or "siglip" encoder.
  """
  if name == "efficientnet_lite0":
    return encoders.load_efficientnet_lite0()
  if name in ("clip", "siglip"):
    if not folder:
      raise ValueError(f"The {name} feature encoder is read from a local "
                       "transformers folder. Pass --feature_encoder_dir.")
    if name == "clip":
      return encoders.load_clip_vision(folder)
    return encoders.load_siglip_vision(folder)
  raise ValueError(f"Unknown feature encoder {name!r}; choose one of "
                   f"{', '.join(FEATURE_ENCODERS)}.")


def feature_metadata(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
  """Return the encoder name and patch grid stored with a latent dataset.

  Returns:
    {"feature_encoder": name, "feature_grid": [height, width]}, or None for
    a dataset written without a feature encoder.
  """
  path = pathlib.Path(folder) / _METADATA_FILE
  if not path.is_file():
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def encode_latents(dataset: str,
                   autoencoder: autoencoder_lib.ImageAutoencoder,
                   *,
                   data_dir: str | os.PathLike[str] | None = None,
                   output_dir: str | os.PathLike[str] | None = None,
                   image_size: int | None = None,
                   batch_size: int = 256,
                   feature_encoder: encoders.ImageEncoder | None = None,
                   feature_encoder_name: str = "") -> pathlib.Path:
  """Write the latent dataset of `dataset`; return its version folder.

  Pass the returned folder as `PipelineConfig.dataset` to train on latents.
  A second call with the same output folder and feature encoder name reuses
  the written dataset.

  Args:
    dataset: a name in `datasets.BUILDERS`.
    autoencoder: encodes the images to latents.
    data_dir: folder of the prepared source dataset.
    output_dir: folder the latent dataset goes to; default data_dir.
    image_size: side of the square images fed to the autoencoder, in pixels;
      default the stored size.
    batch_size: images per encoder call.
    feature_encoder: also store this encoder's patch features of every
      image as "encoder_features".
    feature_encoder_name: name of `feature_encoder`, stored in the metadata
      and the dataset name. Required with `feature_encoder`.
  """
  data_dir = str(data_dir or datasets.default_data_dir())
  image_size = image_size or stored_image_size(dataset, data_dir)
  if image_size is None:
    raise ValueError(f"{dataset} stores encoded images of any size; pass "
                     "--image_size.")
  builder = ImageLatents(
      source_dataset=dataset, autoencoder=autoencoder, image_size=image_size,
      source_data_dir=data_dir, batch_size=batch_size,
      feature_encoder=feature_encoder,
      feature_encoder_name=feature_encoder_name,
      data_dir=str(output_dir or data_dir), file_format="array_record")
  datasets.build(builder, builder.largest_split_bytes())
  return pathlib.Path(builder.data_dir)


def _define_flags() -> None:
  # Defined only when run as a program, so that importing `encode_latents`
  # next to another command's module cannot redefine a flag such as
  # --data_dir.
  flags.DEFINE_enum("dataset", None, sorted(datasets.BUILDERS),
                    "Prepared dataset whose images are encoded.")
  flags.DEFINE_string(
      "autoencoder", None,
      "Folder of an autoencoder saved by xfusion_jax (train_demo) or of a "
      "diffusers AutoencoderKL (config.json + safetensors).")
  flags.DEFINE_string("data_dir", None, "Folder of the prepared datasets.")
  flags.DEFINE_string(
      "output_dir", None,
      "Folder the latent dataset goes to; default data_dir.")
  flags.DEFINE_integer(
      "image_size", None,
      "Side of the square images fed to the encoder, in pixels; default the "
      "stored size. Required for datasets of encoded image files.")
  flags.DEFINE_integer("batch_size", 256, "Images per encoder call.")
  flags.DEFINE_enum(
      "feature_encoder", None, FEATURE_ENCODERS,
      "Also store this frozen encoder's patch features of every image, for "
      "the alignment loss. Default: no features.")
  flags.DEFINE_string(
      "feature_encoder_dir", None,
      "transformers folder of the clip or siglip feature encoder.")
  flags.mark_flags_as_required(["dataset", "autoencoder"])


def main(argv):
  del argv
  options = flags.FLAGS
  feature_encoder = None
  if options.feature_encoder:
    feature_encoder = load_feature_encoder(options.feature_encoder,
                                           options.feature_encoder_dir)
  folder = encode_latents(
      options.dataset, autoencoder_lib.load(options.autoencoder),
      data_dir=options.data_dir, output_dir=options.output_dir,
      image_size=options.image_size, batch_size=options.batch_size,
      feature_encoder=feature_encoder,
      feature_encoder_name=options.feature_encoder or "")
  print(f"Latents written to {folder}")


if __name__ == "__main__":
  hostenv.restart_with_hugepage_malloc()
  _define_flags()
  app.run(main)
