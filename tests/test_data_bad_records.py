"""Bad records are counted, logged once per kind, skipped, and bounded."""

import io

from absl import logging as absl_logging
import numpy as np
from PIL import Image
import pytest
import tokenizers
from tokenizers import models
from tokenizers import pre_tokenizers
import transformers

from xfusion_jax.data import bad_records
from xfusion_jax.data import decode
from xfusion_jax.data import pipeline

Kind = bad_records.BadRecordKind


@pytest.fixture(scope="module")
def tokenizer():
  words = ["<pad>", "<eos>", "<unk>", "a", "cat", "dog"]
  backend = tokenizers.Tokenizer(
      models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
  backend.pre_tokenizer = pre_tokenizers.Whitespace()
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")


def _png(mode: str = "RGB", size=(12, 10)) -> bytes:
  buffer = io.BytesIO()
  color = {"RGB": (200, 10, 10), "L": 128, "RGBA": (0, 0, 255, 0),
           "LA": (10, 255), "I": 5}[mode]
  Image.new(mode, size, color).save(buffer, format="PNG")
  return buffer.getvalue()


def _record(i: int, image_bytes: bytes, caption: bytes) -> dict:
  return {"id": f"rec{i}".encode(), "image_bytes": image_bytes,
          "caption": caption, "label": i}


GOOD_PNG = _png()
BAD_CASES = {
    Kind.CORRUPT_IMAGE: (b"\x89PNG\r\n\x1a\n garbage", b"a cat"),
    Kind.WRONG_CHANNELS: (_png("L"), b"a cat"),
    Kind.EMPTY_CAPTION: (GOOD_PNG, b"  \n"),
    Kind.INVALID_UTF8: (GOOD_PNG, b"a \xff\xfe cat"),
    Kind.CAPTION_TOO_LONG: (GOOD_PNG, b"a cat " * 10),
}


def _source_with_bad(num_good: int, bad_every: int) -> tuple[list, dict]:
  """Good records, with one bad record of each kind in turn."""
  records, expected = [], {kind: 0 for kind in BAD_CASES}
  kinds = list(BAD_CASES)
  for i in range(num_good):
    records.append(_record(len(records), GOOD_PNG, b"a dog"))
    if i % bad_every == bad_every - 1:
      kind = kinds[(i // bad_every) % len(kinds)]
      records.append(_record(len(records), *BAD_CASES[kind]))
      expected[kind] += 1
  return records, expected


def _config(**overrides) -> pipeline.PipelineConfig:
  defaults = dict(
      dataset="bad_records_test", batch_size=5, num_epochs=1, shuffle=False,
      read_threads=2,
      decode=decode.DecodeConfig(image_size=8, image_channels=3,
                                 max_caption_tokens=6))
  defaults.update(overrides)
  return pipeline.PipelineConfig(**defaults)


@pytest.mark.parametrize("kind", list(BAD_CASES))
def test_each_kind_is_detected(kind, tokenizer):
  image_bytes, caption = BAD_CASES[kind]
  record = _record(0, image_bytes, caption)
  config = _config().decode

  with pytest.raises(bad_records.BadRecordError) as error:
    decode.decode_record(record, np.random.default_rng(0), tokenizer, config)

  assert error.value.kind == kind


def test_truncated_image_is_corrupt(tokenizer):
  buffer = io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(
      0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, format="JPEG")
  truncated = buffer.getvalue()[:len(buffer.getvalue()) // 2]

  with pytest.raises(bad_records.BadRecordError) as error:
    decode.decode_record(_record(0, truncated, b"a cat"),
                         np.random.default_rng(0), tokenizer,
                         _config().decode)

  assert error.value.kind == Kind.CORRUPT_IMAGE


def test_grayscale_with_alpha_is_not_rgb(tokenizer):
  with pytest.raises(bad_records.BadRecordError) as error:
    decode.decode_record(_record(0, _png("LA"), b"a cat"),
                         np.random.default_rng(0), tokenizer,
                         _config().decode)

  assert error.value.kind == Kind.WRONG_CHANNELS


def test_stored_tensor_with_wrong_channels(tokenizer):
  record = {"id": b"t", "image": np.zeros((8, 8, 4), np.uint8),
            "caption": b"a cat", "label": 0}

  with pytest.raises(bad_records.BadRecordError) as error:
    decode.decode_record(record, np.random.default_rng(0), tokenizer,
                         _config().decode)

  assert error.value.kind == Kind.WRONG_CHANNELS


def test_convertible_modes_are_accepted(tokenizer):
  config = _config().decode
  for mode in ("RGB", "RGBA"):
    example = decode.decode_record(_record(0, _png(mode), b"a cat"),
                                   np.random.default_rng(0), tokenizer, config)
    assert example["image"].shape == (8, 8, 3), mode
  # A transparent image is composited on white.
  np.testing.assert_allclose(
      decode.decode_record(_record(0, _png("RGBA"), b"a cat"),
                           np.random.default_rng(0), tokenizer,
                           config)["image"], 1.0)


def test_pipeline_skips_and_counts_bad_records(tokenizer):
  records, expected = _source_with_bad(num_good=200, bad_every=20)
  counter = bad_records.BadRecordCounter(max_bad_fraction=0.1,
                                         name="bad_records_test")
  logged = []
  original_warning = absl_logging.warning

  def capture(message, *args):
    logged.append(message % args)
    original_warning(message, *args)

  absl_logging.warning = capture
  try:
    batches = list(pipeline.make_dataset(_config(), tokenizer, source=records,
                                         process_index=0, process_count=1,
                                         counter=counter))
  finally:
    absl_logging.warning = original_warning

  labels = np.concatenate([b["label"] for b in batches])
  good_labels = [r["label"] for r in records if r["caption"] == b"a dog"
                 and r["image_bytes"] == GOOD_PNG]
  assert labels.tolist() == good_labels
  assert counter.bad == expected
  assert counter.seen == len(records)
  assert len(logged) == len(BAD_CASES)
  assert any("rec20" in line and "corrupt_image" in line for line in logged)


def test_threshold_error_fires(tokenizer):
  records, _ = _source_with_bad(num_good=200, bad_every=4)

  dataset = pipeline.make_dataset(
      _config(max_bad_fraction=0.1, min_records_for_bad_fraction=50),
      tokenizer, source=records, process_index=0, process_count=1)

  with pytest.raises(bad_records.TooManyBadRecordsError,
                     match="more than the allowed 10.0%"):
    list(dataset)


def test_counter_rejects_invalid_fraction():
  with pytest.raises(ValueError, match="max_bad_fraction"):
    bad_records.BadRecordCounter(max_bad_fraction=1.5)
