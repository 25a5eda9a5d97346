"""Grain input pipeline over the TFDS ArrayRecord datasets.

Order of steps: source -> seeded shuffle (reshuffled each epoch) -> repeat ->
per-process shard -> decode, check, augment and tokenize -> drop bad records
-> optional packing -> batch -> prefetch. Every step is a Grain dataset, so
`iterator.get_state()` and `iterator.set_state()` resume the stream exactly.

A batch is a dict of numpy arrays with a leading per-process batch dim B:
  "image": float32 [B, H, W, C] in [-1, 1], for image datasets;
  "latents": float32 [B, h, w, c], for latent datasets;
  "encoder_features": float32 [B, patches, dim], for latent datasets written
    with a feature encoder;
  "tokens": int32 [B, L], caption ids then EOS, padded with the pad id;
  "token_mask": bool [B, L], True on caption ids and EOS;
  "label": int32 [B], class label or -1.
With packing, the batch holds only text: "tokens" [B, P] with several
captions per row, "token_mask" [B, P], and Grain's "tokens_segment_ids"
(1, 2, ... per caption, 0 on padding) and "tokens_positions" [B, P].
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from absl import logging
import grain
import jax
import numpy as np

from xfusion_jax.data import bad_records
from xfusion_jax.data import datasets
from xfusion_jax.data import decode
from xfusion_jax.data import tokenize


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """Options of one input pipeline.

  Attributes:
    dataset: a dataset name from `datasets.BUILDERS`, or the folder of a
      latent dataset written by `encode_latents`.
    split: "train", "test" or a TFDS split expression.
    data_dir: folder of named datasets; default `datasets.default_data_dir()`.
    batch_size: examples per batch on each process.
    seed: seed of the shuffle and of per-example randomness.
    shuffle: shuffle the records; each epoch gets a new order.
    num_epochs: passes over the data; None repeats forever.
    decode: how records become examples.
    pack_length: when set, pack captions (text only) into rows of this many
      tokens instead of padding each caption.
    max_bad_fraction: stop once more than this fraction of records is bad.
    min_records_for_bad_fraction: records seen before the fraction counts.
    read_threads: threads that read and decode records.
    prefetch_batches: batches prepared ahead of the consumer.
    drop_remainder: drop a last batch smaller than batch_size.
  """

  dataset: str
  split: str = "train"
  data_dir: str | None = None
  batch_size: int = 64
  seed: int = 0
  shuffle: bool = True
  num_epochs: int | None = None
  decode: decode.DecodeConfig = dataclasses.field(
      default_factory=decode.DecodeConfig)
  pack_length: int | None = None
  max_bad_fraction: float = 0.01
  min_records_for_bad_fraction: int = 100
  read_threads: int = 4
  prefetch_batches: int = 2
  drop_remainder: bool = True


def _record_id(record: dict[str, Any], index: int) -> str:
  raw = record.get("id")
  if isinstance(raw, bytes):
    return raw.decode("utf-8", "backslashreplace")
  return str(raw) if raw is not None else f"#{index}"


def make_decode_fn(
    config: PipelineConfig, tokenizer: tokenize.Tokenizer | None,
    counter: bad_records.BadRecordCounter
) -> Callable[[int, dict[str, Any]], dict[str, np.ndarray] | None]:
  """Return fn(index, record) -> example, or None for a skipped record."""
  decode_config = config.decode
  if config.pack_length is not None:
    decode_config = dataclasses.replace(decode_config, pad_tokens=False)

  def decode_fn(index: int, record: dict[str, Any]):
    rng = np.random.default_rng([config.seed, index])
    try:
      example = decode.decode_record(record, rng, tokenizer, decode_config)
    except bad_records.BadRecordError as e:
      counter.add_bad(_record_id(record, index), e)
      return None
    counter.add_good()
    if config.pack_length is not None:
      # Packing is text only: images cannot share a row.
      return {"tokens": example["tokens"]}
    return example

  return decode_fn


def _pack(ds: grain.IterDataset, config: PipelineConfig,
          tokenizer: tokenize.Tokenizer) -> grain.IterDataset:
  length = config.pack_length
  ds = grain.experimental.FirstFitPackIterDataset(
      ds,
      length_struct={"tokens": length},
      num_packing_bins=config.batch_size,
      seed=config.seed,
      shuffle_bins=config.shuffle,
      padding_struct={"tokens": tokenize.pad_id(tokenizer)},
  )

  def add_mask(row):
    row["token_mask"] = row["tokens_segment_ids"] > 0
    return row

  return ds.map(add_mask)


def make_dataset(
    config: PipelineConfig,
    tokenizer: tokenize.Tokenizer | None,
    *,
    source: Any | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    counter: bad_records.BadRecordCounter | None = None,
) -> grain.IterDataset:
  """Build the batched, prefetched dataset of one process.

  Args:
    config: pipeline options.
    tokenizer: a Hugging Face tokenizer (`encode`, `pad_token_id`,
      `eos_token_id`), or None for batches without "tokens" and
      "token_mask".
    source: random-access records; default the TFDS data source of
      `config.dataset` and `config.split`.
    process_index: this process's shard; default `jax.process_index()`.
    process_count: number of shards; default `jax.process_count()`.
    counter: receives the bad-record counts; default a new one.

  Returns:
    An IterDataset of batch dicts (see the module docstring). Each process
    reads every process_count-th record of the shuffled stream, so the
    processes together read each record once per epoch.
  """
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in "
                     f"[0, {process_count}).")
  if source is None:
    source = datasets.data_source(config.dataset, config.split,
                                  config.data_dir)
  if counter is None:
    counter = bad_records.BadRecordCounter(
        max_bad_fraction=config.max_bad_fraction,
        min_records=config.min_records_for_bad_fraction,
        name=f"{config.dataset}/{config.split}")
  logging.info("Input pipeline %s/%s: %d records, process %d of %d.",
               config.dataset, config.split, len(source), process_index,
               process_count)

  ds = grain.MapDataset.source(source)
  if config.shuffle:
    ds = ds.shuffle(seed=config.seed)
  ds = ds.repeat(config.num_epochs)
  ds = ds[process_index::process_count]
  ds = ds.map_with_index(make_decode_fn(config, tokenizer, counter))
  # Batching happens after the bad records are dropped, so it must follow
  # the conversion to an IterDataset: a MapDataset batch would keep gaps.
  ds = ds.to_iter_dataset(
      grain.ReadOptions(num_threads=config.read_threads,
                        prefetch_buffer_size=4 * config.batch_size))
  ds = ds.filter(lambda example: example is not None)
  if config.pack_length is not None:
    if tokenizer is None:
      raise ValueError("Packing needs a tokenizer.")
    ds = _pack(ds, config, tokenizer)
  ds = ds.batch(config.batch_size, drop_remainder=config.drop_remainder)
  return grain.experimental.ThreadPrefetchIterDataset(
      ds, prefetch_buffer_size=config.prefetch_batches)
