"""Greedy replies of the frozen LLM and of querier models, with a KV cache.

Every system reads the prompt the querier task trains on (the context
turns as "NAME: TEXT" lines, then "RESPONDER: ") and writes until a
newline, an EOS token or `max_new_tokens`. A trained model ends its replies
with a newline, so the reply is the text before the first one. The frozen
LLM gets the same prompt and the same cut, so that all systems are scored
on the same terms.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from xfusion_jax import llm
from xfusion_jax.data import length_groups
from xfusion_jax.llm import model as lm_model
from xfusion_jax.llm import sampling
from xfusion_jax.querier import model as querier_model
from xfusion_jax.querier import task as querier_task
from xfusion_jax.train import lm_adapter

# Prompt widths are rounded up to a multiple of this, so a test set
# compiles a few programs instead of one per prompt length.
_WIDTH_STEP = 32


def newline_token_ids(lm: llm.FrozenLM) -> tuple[int, ...]:
  """Return the ids of every token whose text contains a newline."""
  if lm.tokenizer is None:
    return (ord("\n"),)
  texts = lm.tokenizer.batch_decode([[i] for i in range(len(lm.tokenizer))])
  return tuple(i for i, text in enumerate(texts) if "\n" in text)


class _LastTokenStep:
  """Gives a module the `apply` that `sampling.decode_loop` calls.

  `apply(variables, ids, positions, key_valid, cache, cache_index)` returns
  the logits of the last input token only (`[batch, 1, vocab]`), which
  spares the prefill a `[batch, prompt, vocab]` array.
  """

  def __init__(self, module: Any, method: Callable[..., Any]):
    self._module = module
    self._method = method

  def apply(self, variables, *args):
    return self._module.apply(variables, *args, method=self._method)


def _causal_lm_step(module: lm_model.CausalLM, ids, positions, key_valid,
                    cache, cache_index):
  hidden, cache = module.model(ids, positions, key_valid, cache, cache_index)
  return module.project_to_vocab(hidden[:, -1:]), cache


def _querier_step(module: querier_model.QuerierLM, ids, positions, key_valid,
                  cache, cache_index):
  return module.decode(ids, positions, key_valid, cache, cache_index,
                       last_only=True)


def _length_batches(lengths: Sequence[int], batch_size: int
                    ) -> Iterator[tuple[list[int], list[int]]]:
  """Yield `(chosen, padded)` index batches, shortest items first.

  Similar lengths share a batch, which keeps its padding short. `padded`
  is `chosen` with its last index repeated up to `batch_size`, so every
  call on a batch has one shape.
  """
  order = sorted(range(len(lengths)), key=lambda i: lengths[i])
  for start in range(0, len(order), batch_size):
    chosen = order[start:start + batch_size]
    yield chosen, chosen + [chosen[-1]] * (batch_size - len(chosen))


class ReplyGenerator:
  """Greedy replies of one system to MQDialog records.

  Args:
    lm: the frozen LLM, with its tokenizer (or UTF-8 byte tokens).
    module: None for the frozen LLM alone, else a deterministic `QuerierLM`
      (with or without its specific tower).
    params: the module's "params" collection (unused without a module).
    prompt_tokens: prompts keep their last `prompt_tokens` tokens.
    max_new_tokens: the reply budget in tokens.
    batch_size: records per generation call.
  """

  def __init__(self, lm: llm.FrozenLM,
               module: querier_model.QuerierLM | None = None,
               params: Any = None, *, prompt_tokens: int,
               max_new_tokens: int = 64, batch_size: int = 8):
    self._lm = lm
    self._tokenizer = lm_adapter.TextTokenizer(lm)
    self._prompt_tokens = prompt_tokens
    self._max_new_tokens = max_new_tokens
    self._batch_size = batch_size
    self._pad_id = lm.pad_token_id()
    self._stop_ids = tuple(sorted(set(newline_token_ids(lm)) |
                                  set(lm.eos_token_ids())))
    if module is None:
      step = _LastTokenStep(lm.module, _causal_lm_step)
      self._variables = lm.variables
      self._init_cache = lambda batch, length: lm_model.init_cache(
          lm.config, batch, length, lm.module.dtype)
    else:
      step = _LastTokenStep(module, _querier_step)
      self._variables = {**lm.variables, "params": params}
      self._init_cache = module.init_cache
    self._generate = jax.jit(self._make_generate(step))

  def _make_generate(self, step: _LastTokenStep):
    max_new_tokens = self._max_new_tokens

    def generate(variables, input_ids, attention_mask):
      batch, prompt_len = input_ids.shape
      key_valid = jnp.concatenate(
          [attention_mask.astype(bool),
           jnp.ones((batch, max_new_tokens), bool)], axis=1)
      positions = lm_model.positions_from_mask(attention_mask)
      cache = self._init_cache(batch, prompt_len + max_new_tokens)
      logits, cache = step.apply(variables, input_ids, positions, key_valid,
                                 cache, 0)
      return sampling.decode_loop(
          step, variables, logits[:, -1], cache, key_valid, prompt_len,
          positions[:, -1] + 1, jax.random.key(0),
          max_new_tokens=max_new_tokens, temperature=0.0, top_k=0,
          top_p=1.0, eos_ids=self._stop_ids, pad_id=self._pad_id)

    return generate

  def prompt_ids(self, record: dict[str, Any]) -> np.ndarray:
    """Return the record's prompt tokens, cut from the left to the budget."""
    ids = self._tokenizer.encode(querier_task.prompt_text(record))
    return ids[max(0, len(ids) - self._prompt_tokens):]

  def reply_text(self, tokens: Sequence[int]) -> str:
    """Decode generated tokens up to the first stop token and newline."""
    tokens = list(tokens)
    stops = set(self._stop_ids)
    cut = next((i for i, t in enumerate(tokens) if t in stops), len(tokens))
    # The stop token itself may carry text before its newline.
    text = self._tokenizer.decode(np.asarray(tokens[:cut + 1], np.int32))
    if cut < len(tokens) and tokens[cut] in self._lm.eos_token_ids():
      text = self._tokenizer.decode(np.asarray(tokens[:cut], np.int32))
    return text.split("\n", 1)[0].strip()

  def tokens(self, records: Sequence[dict[str, Any]]) -> list[np.ndarray]:
    """Return each record's generated tokens `[max_new_tokens]`, in order.

    After the first stop token (a newline or EOS token) a row contains the
    pad id.
    """
    prompts = [self.prompt_ids(r) for r in records]
    generated: list[np.ndarray] = [np.zeros(0, np.int32)] * len(prompts)
    for chosen, padded in _length_batches([len(p) for p in prompts],
                                          self._batch_size):
      rows = [prompts[i] for i in padded]
      width = -(-max(len(r) for r in rows) // _WIDTH_STEP) * _WIDTH_STEP
      ids = np.full((len(rows), width), self._pad_id, np.int32)
      mask = np.zeros((len(rows), width), np.int32)
      for row, prompt in enumerate(rows):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
      tokens = np.asarray(self._generate(self._variables, jnp.asarray(ids),
                                         jnp.asarray(mask)))
      for row, index in enumerate(chosen):
        generated[index] = tokens[row]
    return generated

  def __call__(self, records: Sequence[dict[str, Any]]) -> list[str]:
    """Return one reply text per record, in order."""
    return [self.reply_text(t) for t in self.tokens(records)]

  @property
  def stop_ids(self) -> tuple[int, ...]:
    return self._stop_ids


def reply_general_weights(lm: llm.FrozenLM, module: querier_model.QuerierLM,
                          params: Any, records: Sequence[dict[str, Any]],
                          seq_len: int, batch_size: int = 8) -> np.ndarray:
  """Return the general tower's merge weight at each reference reply token.

  Every record is encoded as in training (its prompt, then its real reply,
  `seq_len` tokens at most), and the weight is read at the positions whose
  merged state predicts a reply token. The values are in record order,
  one per reply token.
  """
  tokenizer = lm_adapter.TextTokenizer(lm)
  encoded = [querier_task.encode_record(r, tokenizer, seq_len)
             for r in records]
  variables = {**lm.variables, "params": params}

  @jax.jit
  def weights(tokens, valid):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    outputs = module.apply(variables, tokens, positions, valid,
                           method=querier_model.QuerierLM.towers)
    # numpy sums in the array's dtype, and a bfloat16 sum of values near 1
    # stops growing near 256, so callers get float32.
    return outputs.general_weight[..., 0].astype(jnp.float32)

  lengths = [int(e["valid"].sum()) for e in encoded]
  found: list[np.ndarray] = [np.zeros(0, np.float32)] * len(encoded)
  for chosen, padded in _length_batches(lengths, batch_size):
    rows = [encoded[i] for i in padded]
    # One of a few bucket lengths, so that few shapes compile.
    length = length_groups.bucket_length(
        max(lengths[i] for i in padded) - 1, seq_len, 4)
    tokens = np.stack([r["tokens"][:length] for r in rows])
    valid = np.stack([r["valid"][:length] for r in rows])
    batch_weights = np.asarray(weights(jnp.asarray(tokens),
                                       jnp.asarray(valid)))
    for row, index in enumerate(chosen):
      # Position t predicts token t + 1.
      predicts = encoded[index]["response"][1:length + 1]
      found[index] = batch_weights[row][predicts]
  return np.concatenate(found)
