"""Task "lm_adapter": a residual low-rank adapter beside a frozen LLM.

The adapter maps the frozen LLM's final (normalized) hidden states `h` to
`h + up(gelu(down(h)))` before the frozen LM head, and trains with
next-token cross-entropy on windows of a text file. `up` starts at zero, so
before training the model's logits are exactly the frozen LLM's.

Config fields (besides the loop's): `model_dir` (Hugging Face folder),
`text_file` (UTF-8 training text), `seq_len`, `adapter_rank`,
`sample_tokens` (tokens generated per sample, 0 disables).
"""

from __future__ import annotations

import math
import pathlib
from typing import Any

from absl import logging
import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import numpy as np
import optax

from xfusion_jax import llm
from xfusion_jax.train import checkpointing
from xfusion_jax.train.task import Batch, FlopCount, Metrics, PyTree

BYTE_VOCAB_SIZE = 256


class ResidualAdapter(nn.Module):
  """`h + up(gelu(down(h)))` with `up` initialized to zero."""

  rank: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, hidden: jax.Array) -> jax.Array:
    width = hidden.shape[-1]
    down = self.param(
        "down",
        nn.with_logical_partitioning(
            nn.initializers.normal(width**-0.5), ("embed", "mlp")),
        (width, self.rank), jnp.float32)
    up = self.param(
        "up",
        nn.with_logical_partitioning(nn.initializers.zeros, ("mlp", "embed")),
        (self.rank, width), jnp.float32)
    x = hidden.astype(self.dtype)
    inner = jax.nn.gelu(jnp.einsum("bsd,dr->bsr", x, down.astype(self.dtype)))
    delta = jnp.einsum("bsr,rd->bsd", inner, up.astype(self.dtype))
    return hidden + delta.astype(hidden.dtype)


def _final_hidden(module: llm.CausalLM, input_ids, positions, key_valid):
  return module.model(input_ids, positions, key_valid)[0]


def _project_to_vocab(module: llm.CausalLM, hidden):
  return module.project_to_vocab(hidden)


class TextTokenizer:
  """The model folder's tokenizer, or UTF-8 bytes when it has none."""

  def __init__(self, lm: llm.FrozenLM):
    self._tokenizer = lm.tokenizer
    if self._tokenizer is None and lm.config.vocab_size < BYTE_VOCAB_SIZE:
      raise ValueError(
          f"{lm.source_dir} has no tokenizer files and a vocabulary of "
          f"{lm.config.vocab_size} < {BYTE_VOCAB_SIZE}, too small for UTF-8 "
          "byte tokens. Add tokenizer files to the model folder.")

  def encode(self, text: str) -> np.ndarray:
    if self._tokenizer is None:
      return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
    ids = self._tokenizer(text, add_special_tokens=False)["input_ids"]
    return np.asarray(ids, np.int32)

  def decode(self, ids: np.ndarray) -> str:
    if self._tokenizer is None:
      return bytes(np.asarray(ids, np.uint8).tolist()).decode(
          "utf-8", errors="replace")
    return self._tokenizer.decode(list(ids))


def token_windows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
  """Cut tokens into non-overlapping `[n, seq_len + 1]` training windows.

  Consecutive windows share one token: the last target of a window is the
  first input of the next.
  """
  count = (len(tokens) - 1) // seq_len
  return np.stack([tokens[i * seq_len:(i + 1) * seq_len + 1]
                   for i in range(count)]) if count else np.zeros(
                       (0, seq_len + 1), np.int32)


def make_dataset(windows: np.ndarray, batch_size: int, seed: int,
                 process_index: int, process_count: int) -> grain.IterDataset:
  """Shuffled, repeated batches `{"tokens": [batch_size, seq_len + 1]}`.

  `batch_size` is the per-process batch. Global batch `i` is windows
  `[i * G, (i + 1) * G)` of the shuffled stream (G = batch_size *
  process_count), and process `p` reads its `p`-th slice of `batch_size`
  rows. The global batches therefore do not depend on the process count, and
  every process's iterator state after `i` batches is `i`, so a run can
  resume with another process count. The shuffle order changes every epoch
  and depends only on `seed`.
  """
  dataset = grain.MapDataset.source(windows).shuffle(seed=seed).repeat()
  dataset = dataset.map(lambda window: {"tokens": window})
  dataset = dataset.batch(batch_size, drop_remainder=True)
  dataset = dataset[process_index::process_count]
  return dataset.to_iter_dataset(
      grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))


class LMAdapterTask:
  """Trains a `ResidualAdapter` on next-token prediction beside a frozen LLM."""

  # See `make_dataset`: the global batches and the iterator state are the
  # same under any process count.
  process_count_invariant_data = True

  def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh):
    if not config.model_dir:
      raise ValueError("config.model_dir is empty; set it to a Hugging Face "
                       "model folder, e.g. --config.model_dir=PATH.")
    self._config = config
    self.lm = llm.from_pretrained(config.model_dir, dtype=config.dtype,
                                  mesh=mesh)
    self.frozen = self.lm.variables
    self.frozen_source = {
        "path": str(pathlib.Path(config.model_dir).resolve()),
        "weights_sha256": checkpointing.hash_weight_files(config.model_dir),
    }
    self.adapter = ResidualAdapter(config.adapter_rank,
                                   dtype=jnp.dtype(config.dtype))
    self.tokenizer = TextTokenizer(self.lm)
    self.windows = self._read_windows()
    self._sample_fn = None

  def _read_windows(self) -> np.ndarray:
    path = pathlib.Path(self._config.text_file)
    if not path.is_file():
      raise ValueError(f"config.text_file={str(path)!r} is not a file; set "
                       "it to a UTF-8 text file to train on.")
    tokens = self.tokenizer.encode(path.read_text(encoding="utf-8"))
    windows = token_windows(tokens, self._config.seq_len)
    if len(windows) < jax.process_count():
      raise ValueError(
          f"{path} has {len(tokens)} tokens, which give {len(windows)} "
          f"windows of config.seq_len={self._config.seq_len} + 1 tokens; "
          f"{jax.process_count()} processes need at least one each. Use a "
          "longer text or a shorter seq_len.")
    logging.info("Training text %s: %d tokens, %d windows of %d tokens.",
                 path, len(tokens), len(windows), self._config.seq_len + 1)
    return windows

  def init_trainable(self, rng: jax.Array) -> PyTree:
    hidden = jnp.zeros((1, 1, self.lm.config.hidden_size),
                       jnp.dtype(self._config.dtype))
    return self.adapter.init(rng, hidden)["params"]

  def logits(self, trainable: PyTree, frozen: PyTree,
             input_ids: jax.Array) -> jax.Array:
    """Return float32 logits `[batch, seq, vocab]` of unpadded `input_ids`."""
    key_valid = jnp.ones(input_ids.shape, bool)
    positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]),
                                 input_ids.shape)
    hidden = self.lm.module.apply(frozen, input_ids, positions, key_valid,
                                  method=_final_hidden)
    hidden = self.adapter.apply({"params": trainable}, hidden)
    logits = self.lm.module.apply(frozen, hidden, method=_project_to_vocab)
    return logits.astype(jnp.float32)

  def loss_fn(self, trainable: PyTree, frozen: PyTree, batch: Batch,
              rng: jax.Array) -> tuple[jax.Array, Metrics]:
    del rng  # The adapter has no dropout.
    tokens = batch["tokens"]
    logits = self.logits(trainable, frozen, tokens[:, :-1])
    targets = tokens[:, 1:]
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits, targets).mean()
    accuracy = jnp.mean(jnp.argmax(logits, -1) == targets)
    return loss, {"cross_entropy": loss, "accuracy": accuracy}

  def train_data(self, seed: int) -> grain.DatasetIterator:
    per_process = self._config.batch_size // jax.process_count()
    dataset = make_dataset(self.windows, per_process, seed,
                           jax.process_index(), jax.process_count())
    return iter(dataset)

  def tokens_per_batch(self, batch: Batch) -> int:
    tokens = batch["tokens"]
    return int(tokens.shape[0] * (tokens.shape[1] - 1))

  def flop_count(self) -> FlopCount:
    """Adapter 6N; LM head 4N (gradients pass through); decoder layers 2N."""
    cfg = self.lm.config
    weights = self.lm.weights
    head = cfg.vocab_size * cfg.hidden_size
    layers = _count(weights["model"]["layers"])
    width = self.lm.config.num_attention_heads * self.lm.config.head_dim
    # Scores and weighted values, forward only, over the full (not causal)
    # square of the sequence.
    attention = 4 * cfg.num_hidden_layers * self._config.seq_len * width
    return FlopCount(
        trainable_params=2 * cfg.hidden_size * self._config.adapter_rank,
        frozen_backprop_params=head,
        frozen_forward_params=layers,
        attention_flops_per_token=attention)

  def samples(self, trainable: PyTree, step: int,
              workdir: str) -> dict[str, Any]:
    """Greedy continuation of the start of the first training window."""
    del step, workdir
    count = self._config.sample_tokens
    if count < 1:
      return {}
    prompt = self.windows[0][:self._config.seq_len // 2]
    if self._sample_fn is None:
      self._sample_fn = jax.jit(self._greedy_tokens, static_argnums=2)
    new_tokens = self._sample_fn(trainable, jnp.asarray(prompt), count)
    prompt_text = self.tokenizer.decode(prompt)
    continuation = self.tokenizer.decode(np.asarray(new_tokens))
    return {"continuation": f"{prompt_text}[→]{continuation}"}

  def _greedy_tokens(self, trainable: PyTree, prompt: jax.Array,
                     count: int) -> jax.Array:
    # The model is causal, so position i attends only to tokens before it
    # and the zeros after the written tokens do not change its logits.
    length = prompt.shape[0] + count
    buffer = jnp.zeros((1, length), jnp.int32).at[0, :prompt.shape[0]].set(
        prompt)

    def write_next(index, tokens):
      logits = self.logits(trainable, self.frozen, tokens)
      return tokens.at[0, index].set(jnp.argmax(logits[0, index - 1]))

    buffer = jax.lax.fori_loop(prompt.shape[0], length, write_next, buffer)
    return buffer[0, prompt.shape[0]:]


def _count(tree: PyTree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def make_task(config: ml_collections.ConfigDict, mesh: Mesh) -> LMAdapterTask:
  return LMAdapterTask(config, mesh)
