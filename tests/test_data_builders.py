"""TFDS builders on the real packaged assets and on user folders."""

import collections
import gzip
import importlib.util
import io
import json
import os
import subprocess
import sys
import unicodedata

import numpy as np
from PIL import Image
import pytest
from tensorflow_datasets.core import shuffle as tfds_shuffle

from xfusion_jax.data import datasets
from xfusion_jax.data import fashion_mnist


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def fashion(data_dir):
  datasets.prepare("fashion_mnist_captions", data_dir)
  return {split: datasets.data_source("fashion_mnist_captions", split,
                                      data_dir)
          for split in ("train", "test")}


def test_fashion_mnist_counts(fashion):
  assert len(fashion["train"]) == 60_000
  assert len(fashion["test"]) == 10_000


def test_fashion_mnist_records_match_idx_files(fashion):
  source = fashion_mnist.default_source()
  with gzip.open(source / "t10k-images-idx3-ubyte.gz") as f:
    raw = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
  with gzip.open(source / "t10k-labels-idx1-ubyte.gz") as f:
    labels = np.frombuffer(f.read(), np.uint8, offset=8)

  for index in (0, 17, 9999):
    record = fashion["test"][index]
    position = int(record["id"].decode().split("/")[1])
    assert record["image"].shape == (28, 28, 1)
    assert record["image"].dtype == np.uint8
    np.testing.assert_array_equal(record["image"][..., 0], raw[position])
    assert record["label"] == labels[position]


def test_fashion_mnist_captions_name_the_class(fashion):
  templates = collections.Counter()
  per_class = collections.Counter()
  for index in range(0, 60_000, 97):
    record = fashion["train"][index]
    caption = record["caption"].decode()
    name = fashion_mnist.CLASS_NAMES[record["label"]]
    assert caption.endswith(name), caption
    templates[caption.removesuffix(name)] += 1
    per_class[int(record["label"])] += 1

  assert set(templates) == {
      "a photo of a ", "a photo of an ", "a ", "an ", "a picture of a ",
      "a picture of an ", "a black and white photo of a ",
      "a black and white photo of an ", "a small image of a ",
      "a small image of an ", ""}
  assert sorted(per_class) == list(range(10))


def test_fashion_mnist_test_has_1000_per_class(fashion):
  labels = collections.Counter(
      int(fashion["test"][i]["label"]) for i in range(10_000))
  assert labels == {label: 1000 for label in range(10)}


def test_prepare_again_is_noop(fashion, data_dir):
  del fashion  # Only needs the dataset to exist.
  folder = data_dir / "fashion_mnist_captions" / "1.0.0"
  before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

  datasets.prepare("fashion_mnist_captions", data_dir)

  after = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
  assert after == before


def test_prepare_cli_builds_emoji(data_dir):
  command = [sys.executable, "-m", "xfusion_jax.data.prepare",
             "--dataset=emoji_captions", f"--data_dir={data_dir}"]
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  result = subprocess.run(command, capture_output=True, text=True, env=env,
                          check=False)

  assert result.returncode == 0, result.stderr[-2000:]
  assert "emoji_captions/train: 1224 examples" in result.stdout
  assert "emoji_captions/test: 135 examples" in result.stdout


def test_split_too_large_for_memory(tmp_path, monkeypatch):
  # With a one-byte default buffer and 1 KB of available memory, tfds would
  # spill the emoji splits to disk, which needs TensorFlow.
  monkeypatch.setattr(tfds_shuffle, "MAX_MEM_BUFFER_SIZE", 1)
  monkeypatch.setattr(datasets, "_available_memory_bytes", lambda: 1000)

  if importlib.util.find_spec("tensorflow") is not None:
    datasets.prepare("emoji_captions", tmp_path)
    assert len(datasets.data_source("emoji_captions", "test", tmp_path)) == 135
    return
  with pytest.raises(MemoryError, match="emoji_captions.*Install TensorFlow"):
    datasets.prepare("emoji_captions", tmp_path)
  assert tfds_shuffle.MAX_MEM_BUFFER_SIZE == 1


def test_emoji_records(data_dir):
  datasets.prepare("emoji_captions", data_dir)
  train = datasets.data_source("emoji_captions", "train", data_dir)
  test = datasets.data_source("emoji_captions", "test", data_dir)
  records = [train[i] for i in range(len(train))] + [
      test[i] for i in range(len(test))]
  by_caption = {r["caption"].decode(): r for r in records}

  assert len(records) == 1359
  assert len({r["id"] for r in records}) == 1359
  pizza = by_caption["slice of pizza"]
  assert pizza["id"] == b"U+1F355"
  assert pizza["label"] == 0x1F355
  for caption in ("duck", "umbrella"):
    assert caption in by_caption
  for record in records[::50]:
    image = record["image"]
    assert image.shape == (64, 64, 3)
    assert image.dtype == np.uint8
    # RGB on white: white corners, and a drawn glyph.
    np.testing.assert_array_equal(image[0, 0], [255, 255, 255])
    assert image.min() < 200
    code_point = int(record["id"].decode()[2:], 16)
    assert record["caption"].decode() == unicodedata.name(
        chr(code_point)).lower()


def _png_bytes(color, size=(40, 30), mode="RGB") -> bytes:
  buffer = io.BytesIO()
  Image.new(mode, size, color).save(buffer, format="PNG")
  return buffer.getvalue()


def test_image_folder_from_jsonl(tmp_path):
  images = tmp_path / "images"
  images.mkdir()
  lines = []
  for i in range(30):
    (images / f"{i}.png").write_bytes(_png_bytes((i, 0, 0)))
    lines.append({"image": f"images/{i}.png", "caption": f"red {i}",
                  "split": "test" if i < 5 else "train", "label": i})
  # A missing file is counted and skipped at build time.
  lines.append({"image": "images/missing.png", "caption": "gone"})
  (tmp_path / "pairs.jsonl").write_text(
      "\n".join(json.dumps(line) for line in lines))

  datasets.prepare("image_caption_folder", tmp_path / "tfds",
                   source=str(tmp_path / "pairs.jsonl"))
  train = datasets.data_source("image_caption_folder", "train",
                               tmp_path / "tfds")
  test = datasets.data_source("image_caption_folder", "test",
                              tmp_path / "tfds")

  assert len(train) == 25
  assert len(test) == 5
  record = next(test[i] for i in range(5) if test[i]["label"] == 3)
  assert record["caption"] == b"red 3"
  assert record["image_bytes"] == (images / "3.png").read_bytes()


def test_image_folder_with_sidecar_captions(tmp_path):
  folder = tmp_path / "photos"
  (folder / "sub").mkdir(parents=True)
  for i in range(40):
    path = folder / ("sub" if i % 2 else "") / f"img{i:02d}.png"
    path.write_bytes(_png_bytes((0, i, 0)))
    path.with_suffix(".txt").write_bytes(f"green {i}\n".encode())

  builder = datasets.prepare("image_caption_folder", tmp_path / "tfds",
                             source=str(folder))

  splits = builder.info.splits
  assert splits["train"].num_examples + splits["test"].num_examples == 40
  train = datasets.data_source("image_caption_folder", "train",
                               tmp_path / "tfds")
  captions = {train[i]["id"].decode(): train[i]["caption"]
              for i in range(len(train))}
  for record_id, caption in captions.items():
    number = int(record_id.split("img")[1][:2])
    assert caption == f"green {number}".encode()


def test_image_folder_requires_source(tmp_path):
  with pytest.raises(ValueError, match="needs --source"):
    datasets.prepare("image_caption_folder", tmp_path)
