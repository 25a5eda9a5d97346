"""TFDS builder for a user's own (image, caption) pairs.

Two source layouts are accepted, the ones COCO- and LAION-style exports use:

* a JSONL file whose lines are `{"image": PATH, "caption": TEXT}` (optional
  `"label"`: int, `"split"`: "train" or "test"); relative paths are resolved
  against the JSONL file's folder;
* a folder of image files, each with a caption in a sidecar `<stem>.txt`.

Image files are stored as their encoded bytes and captions as raw bytes, so
that decoding, resizing and the checks for corrupt images and non-UTF-8
captions run in the input pipeline, where bad records are counted and
skipped. Files that are missing at build time are counted and skipped here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from xfusion_jax.data import bad_records

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
# Records without an explicit split go to "test" when the first byte of the
# sha256 of their id is below this value: about 5%, stable when files are
# added.
_TEST_HASH_BELOW = 13


@dataclasses.dataclass(frozen=True)
class Pair:
  record_id: str
  image_path: pathlib.Path
  caption: bytes
  label: int
  split: str


def split_for(record_id: str) -> str:
  digest = hashlib.sha256(record_id.encode("utf-8", "surrogatepass")).digest()
  return "test" if digest[0] < _TEST_HASH_BELOW else "train"


def _caption_bytes(caption: str) -> bytes:
  # JSON may hold lone surrogates ("\ud800"); keeping them makes the bytes
  # invalid UTF-8, which the pipeline then rejects with the record id.
  return caption.encode("utf-8", "surrogatepass")


def read_jsonl(path: pathlib.Path) -> Iterator[Pair]:
  with open(path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        entry = json.loads(line)
        image = pathlib.Path(entry["image"])
        caption = entry.get("caption", "")
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(
            f"{path}:{line_number}: expected a JSON object with \"image\" and "
            f"\"caption\" keys: {e}") from e
      record_id = f"{path.name}:{line_number}"
      split = entry.get("split") or split_for(record_id)
      if split not in ("train", "test"):
        raise ValueError(f"{path}:{line_number}: split must be \"train\" or "
                         f"\"test\", got {split!r}.")
      yield Pair(
          record_id=record_id,
          image_path=image if image.is_absolute() else path.parent / image,
          caption=_caption_bytes(str(caption)),
          label=int(entry.get("label", -1)),
          split=split)


def read_folder(folder: pathlib.Path) -> Iterator[Pair]:
  for image_path in sorted(folder.rglob("*")):
    if image_path.suffix.lower() not in IMAGE_SUFFIXES:
      continue
    record_id = str(image_path.relative_to(folder))
    caption_path = image_path.with_suffix(".txt")
    caption = caption_path.read_bytes() if caption_path.exists() else b""
    yield Pair(
        record_id=record_id,
        image_path=image_path,
        caption=caption.strip(),
        label=-1,
        split=split_for(record_id))


def read_pairs(source: pathlib.Path) -> Iterator[Pair]:
  if source.is_dir():
    return read_folder(source)
  if source.suffix == ".jsonl" and source.is_file():
    return read_jsonl(source)
  raise FileNotFoundError(
      f"--source={source} is neither a folder of images with .txt captions "
      "nor an existing .jsonl file.")


class ImageCaptionFolder(tfds.core.GeneratorBasedBuilder):
  """(image, caption) pairs from a JSONL file or a folder of images."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}

  def __init__(self,
               *,
               source: str | None = None,
               max_bad_fraction: float = 0.01,
               **kwargs):
    """Args: source: JSONL file or folder; required to build, not to read."""
    self._source = source
    self._max_bad_fraction = max_bad_fraction
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            "Image files stored as encoded bytes with raw caption bytes, from "
            "a JSONL file or a folder of images with .txt captions."),
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "image_bytes": tfds.features.Tensor(shape=(), dtype=np.object_),
            "caption": tfds.features.Tensor(shape=(), dtype=np.object_),
            "label": tfds.features.Scalar(dtype=np.int64),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    if not self._source:
      raise ValueError(
          "image_caption_folder needs --source=PATH: a .jsonl file of "
          "{\"image\": ..., \"caption\": ...} lines or a folder of images "
          "with .txt captions.")
    pairs = list(read_pairs(pathlib.Path(self._source)))
    return {
        split: self._generate_examples(pairs, split)
        for split in ("train", "test")
    }

  def _generate_examples(self, pairs: list[Pair], split: str):
    counter = bad_records.BadRecordCounter(
        max_bad_fraction=self._max_bad_fraction,
        name=f"image_caption_folder/{split}")
    for pair in pairs:
      if pair.split != split:
        continue
      try:
        image_bytes = pair.image_path.read_bytes()
      except OSError as e:
        counter.add_bad(pair.record_id, bad_records.BadRecordError(
            bad_records.BadRecordKind.MISSING_FILE, str(e)))
        continue
      counter.add_good()
      yield pair.record_id, {
          "id": pair.record_id,
          "image_bytes": image_bytes,
          "caption": pair.caption,
          "label": pair.label,
      }
