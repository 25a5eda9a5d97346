"""A decoder-only LLM in Flax linen, driven by a Hugging Face config.

The weights are declared in a configurable variable collection: "frozen" for
the pretrained LLM, so that an optimizer over "params" never receives them, and
"params" for trainable copies of the same blocks. Each weight carries logical
axis names; `xfusion_jax.sharding` maps them onto a device mesh, so the same
code runs unchanged under any mesh shape.

Layers run under `nn.scan` with weights stacked on a leading "layers" axis,
which keeps compile time flat in depth. The KV cache is an explicit input and
output (`[layers, batch, max_len, kv_heads, head_dim]` for keys and values),
so decoding steps are pure functions that jit and donate cleanly.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xfusion_jax.llm import rope as rope_lib
from xfusion_jax.llm.config import LMConfig, SLIDING_ATTENTION

FROZEN = "frozen"

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims":
        jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}

Dtype = Any


class KVCache(NamedTuple):
  """Keys and values of every layer.

  Either one array per field, `[layers, batch, max_len, kv_heads, head_dim]`,
  or (for `scan_layers=False` only) a tuple of per-layer
  `[batch, max_len, kv_heads, head_dim]` arrays.
  """

  keys: Any
  values: Any


def init_cache(config: LMConfig, batch: int, max_len: int, dtype: Dtype,
               per_layer: bool = False) -> KVCache:
  """Return a zero-filled cache, per layer (see `KVCache`) if `per_layer`.

  XLA's CPU backend updates a stacked cache inside an unrolled layer loop by
  copying the whole stack once per layer, which took 13% of a SmolLM2 decode
  step. Separate per-layer buffers are updated in place.
  """
  shape = (batch, max_len, config.num_key_value_heads, config.head_dim)
  if per_layer:
    layers = range(config.num_hidden_layers)
    return KVCache(tuple(jnp.zeros(shape, dtype) for _ in layers),
                   tuple(jnp.zeros(shape, dtype) for _ in layers))
  shape = (config.num_hidden_layers, *shape)
  return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def make_weight(module: nn.Module, name: str, shape: tuple[int, ...],
                axes: tuple[str | None, ...], dtype: Dtype,
                collection: str | None = None) -> jax.Array:
  """Declare a weight with logical axis names.

  The collection defaults to `module.collection`. Frozen weights always come
  from a checkpoint and trainable copies from the frozen ones, so the zeros
  initializer only serves shape inference.
  """
  init = nn.with_logical_partitioning(lambda: jnp.zeros(shape, dtype), axes)
  collection = collection or module.collection
  return module.variable(collection, name, init).value


class RMSNorm(nn.Module):
  """RMS normalization as transformers computes it.

  Attributes:
    eps: added to the mean square.
    collection: variable collection of the scale.
    param_dtype: dtype the scale is stored in.
    unit_offset: multiply by (1 + scale) in float32, then cast, as
      transformers' Gemma3RMSNorm does. Without it the normalized input is
      cast first and multiplied by scale, as in LlamaRMSNorm.
  """

  eps: float
  collection: str = FROZEN
  param_dtype: Dtype = jnp.float32
  unit_offset: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = make_weight(self, "scale", (x.shape[-1],), ("norm",),
                        self.param_dtype)
    x32 = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    normed32 = x32 * jax.lax.rsqrt(variance + self.eps)
    if self.unit_offset:
      return (normed32 * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)
    return scale.astype(x.dtype) * normed32.astype(x.dtype)


_MERGE_TOKEN_AXES = contextvars.ContextVar("merge_token_axes", default=None)


@contextlib.contextmanager
def merge_token_axes(enabled: bool) -> Iterator[None]:
  """Set whether `token_einsum` merges batch and sequence while tracing.

  Outside such a block it merges when JAX's default backend is the CPU. A
  program traced here but compiled for another platform, such as a TPU step
  compiled ahead of time on a CPU host, is traced inside
  `merge_token_axes(False)`.

  Args:
    enabled: merge the two axes.
  """
  token = _MERGE_TOKEN_AXES.set(enabled)
  try:
    yield
  finally:
    _MERGE_TOKEN_AXES.reset(token)


def token_einsum(equation: str, x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Return `einsum(equation, x, kernel)`, merging batch and sequence on CPU.

  For an `equation` of the form "bs...,...->bs..." whose kernel has no "b"
  or "s" axis, the product runs over one token axis of `batch * seq` rows,
  so the kernel's gradient contracts a single axis. With two axes, XLA's CPU
  backend fused the transpose that the gradient product needs with the
  layer scan's slicing of saved activations. In a SmolLM2-sized layer that
  fusion took 19 ms, more than any matrix product of the layer. Compiled
  ahead of time for a TPU v4, the merge raised the estimated HBM traffic of
  the Llama-3.2-1B X-Fusion step by 21%, so other platforms keep the two
  axes (see `merge_token_axes`).
  """
  inputs, output = equation.split("->")
  x_spec, kernel_spec = inputs.split(",")
  merge = _MERGE_TOKEN_AXES.get()
  if merge is None:
    merge = jax.default_backend() == "cpu"
  if not (merge and x_spec.startswith("bs") and output.startswith("bs") and
          "b" not in kernel_spec and "s" not in kernel_spec):
    return jnp.einsum(equation, x, kernel)
  token = next(c for c in "tnmpqz" if c not in equation)
  flat = jnp.einsum(f"{token}{x_spec[2:]},{kernel_spec}->{token}{output[2:]}",
                    x.reshape(-1, *x.shape[2:]), kernel)
  return flat.reshape(*x.shape[:2], *flat.shape[1:])


class Projection(nn.Module):
  """A linear map `einsum(equation, x, kernel) + bias` with named axes."""

  kernel_shape: tuple[int, ...]
  kernel_axes: tuple[str | None, ...]
  equation: str
  bias_shape: tuple[int, ...] | None = None
  bias_axes: tuple[str | None, ...] = ()
  collection: str = FROZEN
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = make_weight(self, "kernel", self.kernel_shape, self.kernel_axes,
                         self.param_dtype)
    y = token_einsum(self.equation, x.astype(self.dtype),
                     kernel.astype(self.dtype))
    if self.bias_shape is not None:
      bias = make_weight(self, "bias", self.bias_shape, self.bias_axes,
                         self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class Attention(nn.Module):
  """Grouped-query self-attention with RoPE and an optional KV cache."""

  config: LMConfig
  collection: str = FROZEN
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _projection(self, name: str, kernel_shape, kernel_axes, equation,
                  bias_shape=None, bias_axes=()) -> Projection:
    return Projection(
        kernel_shape=kernel_shape,
        kernel_axes=kernel_axes,
        equation=equation,
        bias_shape=bias_shape,
        bias_axes=bias_axes,
        collection=self.collection,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=name)

  def setup(self):
    cfg = self.config
    d, h, kv, hd = (cfg.hidden_size, cfg.num_attention_heads,
                    cfg.num_key_value_heads, cfg.head_dim)
    qkv_bias = (lambda heads: (heads, hd)) if cfg.qkv_bias else (lambda _: None)
    self.q_proj = self._projection("q_proj", (d, h, hd),
                                   ("embed", "q_heads", "head_dim"),
                                   "bsd,dhk->bshk", qkv_bias(h),
                                   ("q_heads", "head_dim"))
    self.k_proj = self._projection("k_proj", (d, kv, hd),
                                   ("embed", "kv_heads", "head_dim"),
                                   "bsd,dhk->bshk", qkv_bias(kv),
                                   ("kv_heads", "head_dim"))
    self.v_proj = self._projection("v_proj", (d, kv, hd),
                                   ("embed", "kv_heads", "head_dim"),
                                   "bsd,dhk->bshk", qkv_bias(kv),
                                   ("kv_heads", "head_dim"))
    self.o_proj = self._projection("o_proj", (h, hd, d),
                                   ("q_heads", "head_dim", "embed"),
                                   "bshk,hkd->bsd",
                                   (d,) if cfg.o_bias else None, ("embed",))
    if cfg.qk_norm:
      norm = dict(eps=cfg.rms_norm_eps, collection=self.collection,
                  param_dtype=self.param_dtype,
                  unit_offset=cfg.norm_unit_offset)
      self.q_norm = RMSNorm(**norm, name="q_norm")
      self.k_norm = RMSNorm(**norm, name="k_norm")

  def project_qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array):
    """Return RoPE-rotated queries, keys and values of `x` `[batch, seq, embed]`."""
    q, k = self.q_proj(x), self.k_proj(x)
    if self.config.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q = rope_lib.apply_rotary(q, cos, sin)
    k = rope_lib.apply_rotary(k, cos, sin)
    return q, k, self.v_proj(x)

  def __call__(self, x, cos, sin, mask, cache=None, cache_index=None):
    q, k, v = self.project_qkv(x, cos, sin)
    if cache is not None:
      start = (0, cache_index, 0, 0)
      k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype),
                                       start)
      v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype),
                                       start)
      cache = (k, v)
    out = attend(q, k.astype(self.dtype), v.astype(self.dtype), mask,
                 self.config.attention_scale)
    return self.o_proj(out), cache


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
           scale: float) -> jax.Array:
  """Softmax attention with grouped KV heads.

  Args:
    q: `[batch, q_len, heads, head_dim]`.
    k: `[batch, kv_len, kv_heads, head_dim]`; heads must be a multiple.
    v: like `k`.
    mask: boolean, broadcastable to `[batch, heads, q_len, kv_len]`.
    scale: multiplier of the query-key logits.
  """
  # XLA's implementation computes the logits and the softmax in float32 and
  # runs on every backend; the cuDNN one does not accept arbitrary masks.
  return jax.nn.dot_product_attention(
      q, k, v, mask=mask, scale=scale, implementation="xla")


ACTIVATIONS = {
    "silu": jax.nn.silu,
    # PyTorch's gelu(approximate="tanh") is the same tanh formula.
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


class MLP(nn.Module):
  """Gated MLP: `down(act(gate(x)) * up(x))`."""

  config: LMConfig
  collection: str = FROZEN
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    d, f = cfg.hidden_size, cfg.intermediate_size
    common = dict(collection=self.collection, dtype=self.dtype,
                  param_dtype=self.param_dtype)
    bias_in = (f,) if cfg.mlp_bias else None
    bias_out = (d,) if cfg.mlp_bias else None
    gate = Projection((d, f), ("embed", "mlp"), "bsd,df->bsf", bias_in,
                      ("mlp",), name="gate_proj", **common)(x)
    up = Projection((d, f), ("embed", "mlp"), "bsd,df->bsf", bias_in,
                    ("mlp",), name="up_proj", **common)(x)
    hidden = ACTIVATIONS[cfg.hidden_act](gate) * up
    return Projection((f, d), ("mlp", "embed"), "bsf,fd->bsd", bias_out,
                      ("embed",), name="down_proj", **common)(hidden)


def constrain_residual(x: jax.Array) -> jax.Array:
  """Shard a residual stream `[batch, seq, embed]` by the logical axis rules.

  Without it XLA may keep the layout of the embedding-table gather (embed
  split over "fsdp", batch replicated), so every device computes the whole
  batch. Outside `nn.logical_axis_rules` it is a no-op.
  """
  return nn.with_logical_constraint(
      x, ("activation_batch", "activation_length", "activation_embed"))


class DecoderLayer(nn.Module):
  """Pre-norm transformer block: attention and MLP, each with a residual.

  With `config.sandwich_norms` (Gemma 3) the attention and MLP outputs are
  normalized too before they are added to the residual stream.
  """

  config: LMConfig
  collection: str = FROZEN
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, cos, sin, mask_full, mask_sliding, cache_index,
               is_sliding, cache, sliding_rope=None):
    """Run the block; `sliding_rope` is the `(cos, sin)` of sliding layers.

    `sliding_rope` is None unless `config.sliding_rope` is set; `is_sliding`
    then picks it over `(cos, sin)`, as it picks the sliding mask.
    """
    cfg = self.config
    common = dict(collection=self.collection, param_dtype=self.param_dtype)

    def norm(name):
      return RMSNorm(cfg.rms_norm_eps, name=name,
                     unit_offset=cfg.norm_unit_offset, **common)

    mask = mask_full
    if mask_sliding is not None:
      mask = jnp.where(is_sliding, mask_sliding, mask_full)
    if sliding_rope is not None:
      cos = jnp.where(is_sliding, sliding_rope[0], cos)
      sin = jnp.where(is_sliding, sliding_rope[1], sin)
    normed = norm("input_layernorm")(x)
    attn_out, cache = Attention(
        cfg, dtype=self.dtype, name="self_attn", **common)(
            normed, cos, sin, mask, cache, cache_index)
    if cfg.sandwich_norms:
      attn_out = norm("post_attention_layernorm")(attn_out)
    x = constrain_residual(x + attn_out)
    # Llama names its MLP input norm post_attention_layernorm; Gemma uses
    # that name for the attention output norm above.
    mlp_norm = ("pre_feedforward_layernorm" if cfg.sandwich_norms else
                "post_attention_layernorm")
    mlp_out = MLP(cfg, dtype=self.dtype, name="mlp", **common)(
        norm(mlp_norm)(x))
    if cfg.sandwich_norms:
      mlp_out = norm("post_feedforward_layernorm")(mlp_out)
    x = constrain_residual(x + mlp_out)
    return x, cache


def attention_masks(config: LMConfig, key_valid: jax.Array, q_len: int,
                    cache_index: jax.Array | int):
  """Build the boolean attention masks, `[batch, 1, q_len, kv_len]`.

  Queries and keys are compared by their slot in the sequence (or KV cache),
  not by RoPE position, so left padding needs no special case.

  Args:
    config: the model config (for the sliding window).
    key_valid: `[batch, kv_len]`, False at padding slots.
    q_len: number of query tokens, which occupy slots
      `cache_index .. cache_index + q_len - 1`.
    cache_index: slot of the first query token.

  Returns:
    `(full, sliding)`; `sliding` is None when no layer uses a window.
  """
  q_slots = cache_index + jnp.arange(q_len)[:, None]
  k_slots = jnp.arange(key_valid.shape[1])[None, :]
  causal = k_slots <= q_slots
  full = causal[None, None] & key_valid[:, None, None, :].astype(bool)
  sliding = None
  if config.uses_sliding_window:
    in_window = (q_slots - k_slots) < config.sliding_window
    sliding = full & in_window[None, None]
  return full, sliding


class DecoderStack(nn.Module):
  """Embeddings, the scanned layers and the final norm."""

  config: LMConfig
  collection: str = FROZEN
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat_policy: str = "none"
  scan_layers: bool = True

  def setup(self):
    cfg = self.config
    self.embed_tokens = make_weight(self, "embed_tokens",
                                    (cfg.padded_vocab_size, cfg.hidden_size),
                                    ("vocab", "embed"), self.param_dtype)
    layer_cls = DecoderLayer
    # The last argument, the sliding layers' RoPE tables, is None unless the
    # config gives sliding layers their own RoPE.
    in_axes = (nn.broadcast,) * 5 + (0, 0, nn.broadcast)
    if self.remat_policy != "none":
      if self.remat_policy not in REMAT_POLICIES:
        raise ValueError(
            f"Unknown remat_policy {self.remat_policy!r}; choose one of "
            f"none, {', '.join(REMAT_POLICIES)}.")
      layer_cls = nn.remat(
          DecoderLayer, policy=REMAT_POLICIES[self.remat_policy],
          prevent_cse=False)
    if not self.scan_layers:
      self.layer_list = [
          layer_cls(cfg, collection=self.collection, dtype=self.dtype,
                    param_dtype=self.param_dtype, name=f"layer_{i}")
          for i in range(cfg.num_hidden_layers)]
    else:
      self.layers = nn.scan(
          layer_cls,
          variable_axes={self.collection: 0},
          split_rngs={},
          in_axes=in_axes,
          length=cfg.num_hidden_layers,
          metadata_params={nn.PARTITION_NAME: "layers"},
      )(cfg, collection=self.collection, dtype=self.dtype,
        param_dtype=self.param_dtype, name="layers")
    self.norm = RMSNorm(cfg.rms_norm_eps, collection=self.collection,
                        param_dtype=self.param_dtype,
                        unit_offset=cfg.norm_unit_offset, name="norm")
    self.inv_freq = rope_lib.inverse_frequencies(cfg.rope, cfg.head_dim)
    self.sliding_inv_freq = None
    if cfg.sliding_rope is not None:
      self.sliding_inv_freq = rope_lib.inverse_frequencies(
          cfg.sliding_rope, cfg.head_dim)
    self.is_sliding = np.array(
        [t == SLIDING_ATTENTION for t in cfg.layer_types], dtype=bool)

  def _embed(self, input_ids):
    x = jnp.take(self.embed_tokens, input_ids, axis=0).astype(self.dtype)
    if self.config.embed_scale is not None:
      # Gemma rounds the multiplier to the compute dtype (sqrt(640) is 25.25
      # in bfloat16), as transformers does with its weight dtype.
      x = x * jnp.asarray(self.config.embed_scale, self.dtype)
    return x

  def __call__(self, input_ids, positions, key_valid, cache=None,
               cache_index=0, embeddings=None):
    """Run the stack; return final hidden states and the updated cache.

    Args:
      input_ids: `[batch, seq]` token ids.
      positions: `[batch, seq]` RoPE positions.
      key_valid: `[batch, kv_len]`; kv_len is the cache length when decoding.
      cache: a KVCache or None.
      cache_index: slot of the first token of `input_ids` in the cache.
      embeddings: `[batch, seq, embed]` input embeddings that replace the
        table lookup of `input_ids` (already scaled where the model scales
        its embeddings), or None.
    """
    if embeddings is not None:
      x = embeddings.astype(self.dtype)
    else:
      x = self._embed(input_ids)
    x = constrain_residual(x)
    cos, sin = rope_lib.rotary_tables(positions, self.inv_freq)
    sliding_rope = None
    if self.sliding_inv_freq is not None:
      sliding_rope = rope_lib.rotary_tables(positions, self.sliding_inv_freq)
    mask_full, mask_sliding = attention_masks(self.config, key_valid,
                                              input_ids.shape[1], cache_index)
    if mask_sliding is not None and self.is_sliding.all():
      mask_full, mask_sliding = mask_sliding, None
    layer_cache = None if cache is None else (cache.keys, cache.values)
    if (self.scan_layers and cache is not None
        and isinstance(cache.keys, (tuple, list))):
      raise ValueError("A per-layer KV cache (init_cache(per_layer=True)) "
                       "needs scan_layers=False; build the cache without "
                       "per_layer for a scanned model.")
    if self.scan_layers:
      x, layer_cache = self.layers(x, cos, sin, mask_full, mask_sliding,
                                   cache_index, jnp.asarray(self.is_sliding),
                                   layer_cache, sliding_rope)
    else:
      x, layer_cache = self._run_layer_list(x, cos, sin, mask_full,
                                            mask_sliding, cache_index,
                                            layer_cache, sliding_rope)
    new_cache = None if cache is None else KVCache(*layer_cache)
    return self.norm(x), new_cache

  def _run_layer_list(self, x, cos, sin, mask_full, mask_sliding, cache_index,
                      layer_cache, sliding_rope):
    keys, values = layer_cache if layer_cache is not None else (None, None)
    new_keys, new_values = [], []
    for i, layer in enumerate(self.layer_list):
      cache = None if keys is None else (keys[i], values[i])
      x, cache = layer(x, cos, sin, mask_full, mask_sliding, cache_index,
                       bool(self.is_sliding[i]), cache, sliding_rope)
      if cache is not None:
        new_keys.append(cache[0])
        new_values.append(cache[1])
    if keys is None:
      return x, None
    if isinstance(keys, (tuple, list)):
      return x, (tuple(new_keys), tuple(new_values))
    # One stack at the end instead of writing each layer into the stacked
    # cache, which XLA's CPU backend does by copying the stack every time.
    return x, (jnp.stack(new_keys), jnp.stack(new_values))


def vocab_logits(config: LMConfig, hidden: jax.Array, dtype: Dtype,
                 embed_table: jax.Array, lm_head=None) -> jax.Array:
  """Apply the LM head (or the tied embedding table) and any softcapping.

  Args:
    config: the model config.
    hidden: final hidden states `[batch, seq, embed]`.
    dtype: compute dtype.
    embed_table: `[padded_vocab, embed]`, used when the embeddings are tied.
    lm_head: the untied head module, or None.

  Returns:
    Logits `[batch, seq, padded_vocab]`. The `config.vocab_padding` last
    columns hold the dtype's minimum, so softmax gives them probability 0
    and argmax never picks them.
  """
  if lm_head is None:
    logits = jnp.einsum("bsd,vd->bsv", hidden.astype(dtype),
                        embed_table.astype(dtype))
  else:
    logits = lm_head(hidden)
  cap = config.final_logit_softcapping
  if cap is not None:
    logits = jnp.tanh(logits / cap) * cap
  return mask_vocab_padding(config, logits)


def mask_vocab_padding(config: LMConfig, logits: jax.Array) -> jax.Array:
  """Set the padded vocabulary columns of `logits` `[..., padded_vocab]`.

  The minimum rather than -inf keeps `0 * log_softmax` finite in soft-label
  losses, and exp(minimum - max) is exactly 0 in float32 and bfloat16.
  The mask is applied after softcapping, which would map -inf to -cap.
  """
  if not config.vocab_padding:
    return logits
  is_real = jnp.arange(logits.shape[-1]) < config.vocab_size
  return jnp.where(is_real, logits, jnp.finfo(logits.dtype).min)


class CausalLM(nn.Module):
  """A Hugging Face `*ForCausalLM` model: the decoder stack and the LM head.

  Attributes:
    config: the parsed HF config.
    collection: variable collection of the weights ("frozen" by default).
    dtype: compute dtype of activations.
    param_dtype: dtype the weights are stored in.
    remat_policy: "none", or a name in REMAT_POLICIES for training.
    scan_layers: run the layers under `nn.scan` with stacked weights (the
      "layers" variable); False runs a Python loop over separate per-layer
      weights (`layer_0` ...), see `unstack_layers`.
    untie_head: with tied embeddings, read the LM head from its own
      `lm_head` kernel `[embed, vocab]` (the transposed embedding table, see
      `decoding_weights`) instead of the table itself.
  """

  config: LMConfig
  collection: str = FROZEN
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat_policy: str = "none"
  scan_layers: bool = True
  untie_head: bool = False

  def setup(self):
    cfg = self.config
    self.model = DecoderStack(
        cfg, collection=self.collection, dtype=self.dtype,
        param_dtype=self.param_dtype, remat_policy=self.remat_policy,
        scan_layers=self.scan_layers, name="model")
    if self._separate_head:
      self.lm_head = Projection(
          (cfg.hidden_size, cfg.padded_vocab_size), ("embed", "vocab"),
          "bsd,dv->bsv", collection=self.collection, dtype=self.dtype,
          param_dtype=self.param_dtype, name="lm_head")

  @property
  def _separate_head(self) -> bool:
    return self.untie_head or not self.config.tie_word_embeddings

  def project_to_vocab(self, hidden: jax.Array) -> jax.Array:
    """Map final hidden states `[batch, seq, embed]` to logits `[..., vocab]`."""
    return vocab_logits(self.config, hidden, self.dtype,
                        self.model.embed_tokens,
                        self.lm_head if self._separate_head else None)

  def __call__(self, input_ids, positions, key_valid, cache=None,
               cache_index=0, embeddings=None):
    """Return `(logits [batch, seq, vocab], updated cache)`.

    `embeddings`, if given, replace the table lookup of `input_ids`; see
    `DecoderStack`.
    """
    hidden, cache = self.model(input_ids, positions, key_valid, cache,
                               cache_index, embeddings)
    return self.project_to_vocab(hidden), cache


def decoding_weights(config: LMConfig,
                     weights: dict[str, Any]) -> dict[str, Any]:
  """Return the weights for `CausalLM(scan_layers=False, untie_head=True)`.

  The layers are split as in `unstack_layers`. A tied model also gets an
  `lm_head` kernel, the transposed embedding table. In a matrix-vector
  product XLA's CPU backend read a `[embed, vocab]` matrix about 1.5 times
  faster than the `[vocab, embed]` table, and the head is a fifth of the
  weights that every decode step reads. Both copies take memory.
  """
  weights = unstack_layers(weights)
  if config.tie_word_embeddings:
    weights = dict(weights, lm_head={
        "kernel": jnp.asarray(weights["model"]["embed_tokens"]).T.copy()})
  return weights


def unstack_layers(weights: dict[str, Any]) -> dict[str, Any]:
  """Split stacked layer weights into the per-layer trees of `scan_layers=False`.

  XLA:CPU copies each layer's slice of the stacked weights before its
  matrix products, which doubles the memory traffic of a decode step. With
  separate arrays per layer there is no copy. The split arrays are new
  buffers, so the weights take twice the memory while both copies are kept.
  """
  model = dict(weights["model"])
  stacked = model.pop("layers")
  count = jax.tree.leaves(stacked)[0].shape[0]
  for i in range(count):
    model[f"layer_{i}"] = jax.tree.map(lambda w, i=i: w[i], stacked)
  return dict(weights, model=model)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
  """RoPE positions of a left-padded batch: 0 at each row's first real token."""
  return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(
      jnp.int32)
