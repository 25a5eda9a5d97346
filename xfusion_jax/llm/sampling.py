"""Token sampling and the jitted prefill + KV-cache decode loop."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from xfusion_jax.llm import model as model_lib


def sample_tokens(logits: jax.Array, rng: jax.Array, temperature: float,
                  top_k: int, top_p: float) -> jax.Array:
  """Pick one token per row of `logits` `[batch, vocab]`.

  Temperature 0 means greedy decoding. top_k = 0 and top_p = 1 disable those
  filters. top-p keeps the smallest set of most likely tokens whose
  probabilities sum to at least top_p (always at least one token).
  """
  logits = logits.astype(jnp.float32)
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k > 0:
    kth_largest = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # The smallest logit still inside the nucleus is the cut-off.
    kept = jnp.where(mass_before < top_p, sorted_logits, jnp.inf)
    cutoff = jnp.min(kept, axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def next_tokens(logits: jax.Array, rng: jax.Array, done: jax.Array, *,
                temperature: float, top_k: int, top_p: float,
                eos_ids: tuple[int, ...], pad_id: int
                ) -> tuple[jax.Array, jax.Array]:
  """Sample the next token of each row. Rows already `done` get `pad_id`.

  Returns:
    The `[batch]` tokens and the new `done`: True once a row emitted one of
    `eos_ids`.
  """
  token = sample_tokens(logits, rng, temperature, top_k, top_p)
  token = jnp.where(done, pad_id, token)
  eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
  return token, done | jnp.isin(token, eos)


def decode_loop(module: model_lib.CausalLM, variables, first_logits, cache,
                key_valid, start_slot, next_positions, rng, *,
                max_new_tokens: int, temperature: float, top_k: int,
                top_p: float, eos_ids: tuple[int, ...], pad_id: int):
  """Sample up to `max_new_tokens` tokens after a prefilled KV cache.

  Args:
    module: the LLM module that runs one decode step.
    variables: its variables.
    first_logits: `[batch, vocab]` logits for the first new token.
    cache: KVCache holding the prefix in slots `[0, start_slot)`.
    key_valid: `[batch, cache_len]`, False at padding slots of the prefix.
    start_slot: cache slot of the first new token.
    next_positions: `[batch]` RoPE position of the first new token.
    rng: sampling randomness.
    max_new_tokens: the token budget.
    temperature: 0 for greedy decoding.
    top_k: 0 disables the filter.
    top_p: 1 disables the filter.
    eos_ids: tokens that end a row.
    pad_id: token written after a row's EOS.

  Returns:
    `[batch, max_new_tokens]` int32 tokens, `pad_id` after each row's EOS.
  """
  batch = first_logits.shape[0]

  def step_fn(state):
    step, last_logits, cache, rng, tokens, done, next_pos = state
    rng, step_rng = jax.random.split(rng)
    token, done = next_tokens(last_logits, step_rng, done,
                              temperature=temperature, top_k=top_k,
                              top_p=top_p, eos_ids=eos_ids, pad_id=pad_id)
    tokens = tokens.at[:, step].set(token)
    logits, cache = module.apply(variables, token[:, None], next_pos[:, None],
                                 key_valid, cache, start_slot + step)
    return (step + 1, logits[:, -1], cache, rng, tokens, done, next_pos + 1)

  def keep_going(state):
    step, done = state[0], state[5]
    return (step < max_new_tokens) & ~jnp.all(done)

  state = (jnp.int32(0), first_logits, cache, rng,
           jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
           jnp.zeros((batch,), bool), next_positions)
  return jax.lax.while_loop(keep_going, step_fn, state)[4]


def make_generate_fn(module: model_lib.CausalLM, max_new_tokens: int,
                     temperature: float, top_k: int, top_p: float,
                     eos_ids: tuple[int, ...], pad_id: int) -> Callable[..., Any]:
  """Build `generate(variables, input_ids, attention_mask, rng)`.

  The returned function (jit it) prefills the left-padded prompts into a KV
  cache of length `prompt_len + max_new_tokens`, then runs `decode_loop`
  until every row has emitted an EOS id or the budget is spent.
  """

  def generate(variables, input_ids, attention_mask, rng):
    batch, prompt_len = input_ids.shape
    total = prompt_len + max_new_tokens
    key_valid = jnp.concatenate(
        [attention_mask.astype(bool),
         jnp.ones((batch, max_new_tokens), bool)], axis=1)
    positions = model_lib.positions_from_mask(attention_mask)
    cache = model_lib.init_cache(module.config, batch, total, module.dtype,
                                 per_layer=not module.scan_layers)
    logits, cache = module.apply(variables, input_ids, positions, key_valid,
                                 cache, 0)
    return decode_loop(
        module, variables, logits[:, -1], cache, key_valid, prompt_len,
        positions[:, -1] + 1, rng, max_new_tokens=max_new_tokens,
        temperature=temperature, top_k=top_k, top_p=top_p, eos_ids=eos_ids,
        pad_id=pad_id)

  return generate
