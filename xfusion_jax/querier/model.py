"""The querier-aware responder: two towers over one frozen LLM.

The general tower is the frozen LLM with trainable LoRA adapters on the
attention projections (q, k, v, o) and on the MLP projections (gate, up,
down). The querier-specific tower shares the embeddings, the attention with
its LoRA, the frozen layer norms and the LM head, but every MLP is replaced
by a new trainable low-rank SwiGLU MLP, and it has its own trainable final
norm. The final hidden states of the two towers are averaged, optionally
through a learned per-token gate, before the one LM head.

Both towers run in one forward pass: their residual streams are interleaved
along the batch axis (`[batch * 2, seq, embed]`, row `2 * i` general and row
`2 * i + 1` specific), so the shared attention runs once over both, and a
batch shard on a device contains both towers of its own rows.

The module reads the frozen weights under the same names as
`xfusion_jax.llm.CausalLM` (collection "frozen"), so it is applied to
`{"frozen": lm.weights, "params": trainable}`. Trainable leaves are:

  model/layers/self_attn/{q,k,v,o}_proj/{lora_a,lora_b}
  model/layers/mlp/{gate,up,down}_proj/{lora_a,lora_b}
  model/layers/specific_mlp/{gate,up,down}
  model/specific_norm/scale
  gate/{kernel,bias}                       (only with `gated_merge`)

Every layer leaf has a leading "layers" axis, as the frozen weights do.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xfusion_jax.llm import model as lm_model
from xfusion_jax.llm import rope as rope_lib
from xfusion_jax.llm.config import LMConfig, SLIDING_ATTENTION

FROZEN = lm_model.FROZEN
PARAMS = "params"
Dtype = Any

@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA hyperparameters; the update is `(alpha / rank) * B(A(dropout(x)))`."""

  rank: int = 16
  alpha: float = 8.0
  dropout: float = 0.05

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


class TowerOutputs(NamedTuple):
  """Final hidden states of the towers, each `[batch, seq, embed]`.

  Attributes:
    general: the general tower after the frozen final norm.
    specific: the specific tower after its trainable final norm; None
      without the specific tower.
    specific_last_layer: the specific tower's residual stream after the last
      layer, before any final norm (input of the contrastive head); None
      without the specific tower.
    merged: what the LM head receives.
    general_weight: `[batch, seq, 1]`, the general tower's share of
      `merged` per token: the gate, 0.5 for the plain average, 1 without
      the specific tower.
  """

  general: jax.Array
  specific: jax.Array | None
  specific_last_layer: jax.Array | None
  merged: jax.Array
  general_weight: jax.Array


def _uniform(bound: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def _lora_einsums(equation: str) -> tuple[str, str]:
  """Split a projection's einsum into its LoRA `A` and `B` einsums.

  `"bsd,dhk->bshk"` gives `("bsd,dr->bsr", "bsr,rhk->bshk")`: `A` contracts
  the kernel's input axes and `B` produces its output axes.
  """
  inputs, output = equation.split("->")
  x_axes, kernel_axes = inputs.split(",")
  contracted = "".join(a for a in kernel_axes if a in x_axes)
  produced = "".join(a for a in kernel_axes if a not in x_axes)
  kept = "".join(a for a in x_axes if a not in contracted)
  return (f"{x_axes},{contracted}r->{kept}r",
          f"{kept}r,r{produced}->{output}")


class LoraProjection(nn.Module):
  """A frozen `Projection` plus a trainable low-rank update.

  The frozen kernel and bias are read from the "frozen" collection under the
  same names as `lm_model.Projection`; `lora_a` and `lora_b` live in
  "params". `lora_b` starts at zero, so the initial output is the frozen one.
  """

  kernel_shape: tuple[int, ...]
  kernel_axes: tuple[str | None, ...]
  equation: str
  lora: LoraConfig
  bias_shape: tuple[int, ...] | None = None
  bias_axes: tuple[str | None, ...] = ()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = self._frozen(x)
    a_equation, b_equation = _lora_einsums(self.equation)
    x_axes = self.equation.split(",")[0]
    kernel_in = self.equation.split("->")[0].split(",")[1]
    in_shape = tuple(s for a, s in zip(kernel_in, self.kernel_shape)
                     if a in x_axes)
    in_axes = tuple(n for a, n in zip(kernel_in, self.kernel_axes)
                    if a in x_axes)
    out_shape = tuple(s for a, s in zip(kernel_in, self.kernel_shape)
                      if a not in x_axes)
    out_axes = tuple(n for a, n in zip(kernel_in, self.kernel_axes)
                     if a not in x_axes)
    # A uses PyTorch's default Linear init, as PEFT does: Kaiming uniform
    # with a = sqrt(5), which is U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = float(np.prod(in_shape))**-0.5
    lora_a = self.param(
        "lora_a",
        nn.with_logical_partitioning(_uniform(bound), in_axes + (None,)),
        in_shape + (self.lora.rank,), jnp.float32)
    lora_b = self.param(
        "lora_b",
        nn.with_logical_partitioning(nn.initializers.zeros,
                                     (None,) + out_axes),
        (self.lora.rank,) + out_shape, jnp.float32)
    h = nn.Dropout(self.lora.dropout)(x, deterministic=self.deterministic)
    h = lm_model.token_einsum(a_equation, h.astype(self.dtype),
                              lora_a.astype(self.dtype))
    delta = lm_model.token_einsum(b_equation, h, lora_b.astype(self.dtype))
    return y + (self.lora.scale * delta).astype(y.dtype)

  def _frozen(self, x: jax.Array) -> jax.Array:
    kernel = lm_model.make_weight(self, "kernel", self.kernel_shape,
                                  self.kernel_axes, self.param_dtype, FROZEN)
    y = lm_model.token_einsum(self.equation, x.astype(self.dtype),
                              kernel.astype(self.dtype))
    if self.bias_shape is not None:
      bias = lm_model.make_weight(self, "bias", self.bias_shape,
                                  self.bias_axes, self.param_dtype, FROZEN)
      y = y + bias.astype(self.dtype)
    return y


class LoraAttention(lm_model.Attention):
  """The frozen `Attention` with a `LoraProjection` for q, k, v and o."""

  lora: LoraConfig = LoraConfig()
  deterministic: bool = True

  def _projection(self, name: str, kernel_shape, kernel_axes, equation,
                  bias_shape=None, bias_axes=()) -> LoraProjection:
    return LoraProjection(
        kernel_shape=kernel_shape, kernel_axes=kernel_axes,
        equation=equation, lora=self.lora, bias_shape=bias_shape,
        bias_axes=bias_axes, dtype=self.dtype, param_dtype=self.param_dtype,
        deterministic=self.deterministic, name=name)


class LoraMLP(nn.Module):
  """The frozen gated MLP with a `LoraProjection` for gate, up and down."""

  config: LMConfig
  lora: LoraConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    d, f = cfg.hidden_size, cfg.intermediate_size
    common = dict(lora=self.lora, dtype=self.dtype,
                  param_dtype=self.param_dtype,
                  deterministic=self.deterministic)
    bias_in = (f,) if cfg.mlp_bias else None
    bias_out = (d,) if cfg.mlp_bias else None
    gate = LoraProjection((d, f), ("embed", "mlp"), "bsd,df->bsf",
                          bias_shape=bias_in, bias_axes=("mlp",),
                          name="gate_proj", **common)(x)
    up = LoraProjection((d, f), ("embed", "mlp"), "bsd,df->bsf",
                        bias_shape=bias_in, bias_axes=("mlp",),
                        name="up_proj", **common)(x)
    hidden = lm_model.ACTIVATIONS[cfg.hidden_act](gate) * up
    return LoraProjection((f, d), ("mlp", "embed"), "bsf,fd->bsd",
                          bias_shape=bias_out, bias_axes=("embed",),
                          name="down_proj", **common)(hidden)


class SpecificMLP(nn.Module):
  """The specific tower's MLP: `down(silu(gate(x)) * up(x))` of width `rank`."""

  rank: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]

    def weight(name, shape, axes, fan_in):
      init = nn.initializers.normal(fan_in**-0.5)
      return self.param(name, nn.with_logical_partitioning(init, axes), shape,
                        jnp.float32).astype(self.dtype)

    gate = weight("gate", (d, self.rank), ("embed", "mlp"), d)
    up = weight("up", (d, self.rank), ("embed", "mlp"), d)
    down = weight("down", (self.rank, d), ("mlp", "embed"), self.rank)
    x = x.astype(self.dtype)
    hidden = (jax.nn.silu(lm_model.token_einsum("bsd,dr->bsr", x, gate)) *
              lm_model.token_einsum("bsd,dr->bsr", x, up))
    return lm_model.token_einsum("bsr,rd->bsd", hidden, down)


class TrainableRMSNorm(nn.Module):
  """`RMSNorm` with its scale in "params", initialized to `initial_scale`."""

  eps: float
  unit_offset: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, initial_scale: jax.Array) -> jax.Array:
    scale = self.param(
        "scale",
        nn.with_logical_partitioning(
            lambda _: jnp.asarray(initial_scale, jnp.float32), ("norm",)))
    x32 = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    normed32 = x32 * jax.lax.rsqrt(variance + self.eps)
    if self.unit_offset:
      return (normed32 * (1.0 + scale)).astype(x.dtype)
    return (normed32 * scale).astype(x.dtype)


def split_towers(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Split interleaved rows `[batch * 2, ...]` into (general, specific)."""
  pairs = x.reshape((x.shape[0] // 2, 2) + x.shape[1:])
  return pairs[:, 0], pairs[:, 1]


def join_towers(general: jax.Array, specific: jax.Array) -> jax.Array:
  """Interleave two `[batch, ...]` arrays into `[batch * 2, ...]`."""
  pairs = jnp.stack([general, specific], axis=1)
  return pairs.reshape((-1,) + general.shape[1:])


class QuerierLayer(nn.Module):
  """One decoder block applied to both towers' interleaved residual streams.

  Attention and the layer norms are shared (frozen weights, LoRA on the
  projections). The general rows go through the frozen MLP with LoRA, the
  specific rows through `SpecificMLP`. Without `specific_tower` every row is
  a general row and the block has no `SpecificMLP`.
  """

  config: LMConfig
  lora: LoraConfig
  specific_rank: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  deterministic: bool = True
  specific_tower: bool = True

  @nn.compact
  def __call__(self, x, cos, sin, mask_full, mask_sliding, is_sliding,
               sliding_rope, cache_index=0, cache=None):
    cfg = self.config

    def norm(name):
      return lm_model.RMSNorm(cfg.rms_norm_eps, name=name,
                              param_dtype=self.param_dtype,
                              unit_offset=cfg.norm_unit_offset)

    mask = mask_full
    if mask_sliding is not None:
      mask = jnp.where(is_sliding, mask_sliding, mask_full)
    if sliding_rope is not None:
      cos = jnp.where(is_sliding, sliding_rope[0], cos)
      sin = jnp.where(is_sliding, sliding_rope[1], sin)
    attn_out, cache = LoraAttention(
        cfg, dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora,
        deterministic=self.deterministic, name="self_attn")(
            norm("input_layernorm")(x), cos, sin, mask, cache, cache_index)
    if cfg.sandwich_norms:
      attn_out = norm("post_attention_layernorm")(attn_out)
    x = lm_model.constrain_residual(x + attn_out)

    mlp_norm = ("pre_feedforward_layernorm" if cfg.sandwich_norms else
                "post_attention_layernorm")
    general_mlp = LoraMLP(cfg, self.lora, dtype=self.dtype,
                          param_dtype=self.param_dtype,
                          deterministic=self.deterministic, name="mlp")
    if self.specific_tower:
      general_in, specific_in = split_towers(norm(mlp_norm)(x))
      general_out = general_mlp(general_in)
      specific_out = SpecificMLP(self.specific_rank, dtype=self.dtype,
                                 name="specific_mlp")(specific_in)
      mlp_out = join_towers(general_out,
                            specific_out.astype(general_out.dtype))
    else:
      mlp_out = general_mlp(norm(mlp_norm)(x))
    if cfg.sandwich_norms:
      mlp_out = norm("post_feedforward_layernorm")(mlp_out)
    x = lm_model.constrain_residual(x + mlp_out)
    return x, cache


class QuerierStack(nn.Module):
  """Embeddings, the scanned two-tower layers and both final norms."""

  config: LMConfig
  lora: LoraConfig
  specific_rank: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat_policy: str = "none"
  deterministic: bool = True
  specific_tower: bool = True

  def setup(self):
    cfg = self.config
    self.embed_tokens = lm_model.make_weight(
        self, "embed_tokens", (cfg.padded_vocab_size, cfg.hidden_size),
        ("vocab", "embed"), self.param_dtype, FROZEN)
    layer_cls = QuerierLayer
    if self.remat_policy != "none":
      if self.remat_policy not in lm_model.REMAT_POLICIES:
        raise ValueError(
            f"Unknown remat_policy {self.remat_policy!r}; choose one of "
            f"none, {', '.join(lm_model.REMAT_POLICIES)}.")
      layer_cls = nn.remat(
          QuerierLayer, policy=lm_model.REMAT_POLICIES[self.remat_policy],
          prevent_cse=False)
    self.layers = nn.scan(
        layer_cls,
        variable_axes={FROZEN: 0, PARAMS: 0},
        split_rngs={PARAMS: True, "dropout": True},
        # The cache index is shared by all layers; the cache has a leading
        # layers axis like the weights.
        in_axes=(nn.broadcast,) * 4 + (0, nn.broadcast, nn.broadcast, 0),
        length=cfg.num_hidden_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(cfg, self.lora, self.specific_rank, dtype=self.dtype,
      param_dtype=self.param_dtype, deterministic=self.deterministic,
      specific_tower=self.specific_tower, name="layers")
    self.norm = lm_model.RMSNorm(cfg.rms_norm_eps,
                                 param_dtype=self.param_dtype,
                                 unit_offset=cfg.norm_unit_offset,
                                 name="norm")
    if self.specific_tower:
      self.specific_norm = TrainableRMSNorm(
          cfg.rms_norm_eps, unit_offset=cfg.norm_unit_offset,
          name="specific_norm")
    self.inv_freq = rope_lib.inverse_frequencies(cfg.rope, cfg.head_dim)
    self.sliding_inv_freq = None
    if cfg.sliding_rope is not None:
      self.sliding_inv_freq = rope_lib.inverse_frequencies(
          cfg.sliding_rope, cfg.head_dim)
    self.is_sliding = np.array(
        [t == SLIDING_ATTENTION for t in cfg.layer_types], dtype=bool)

  def __call__(self, input_ids, positions, key_valid, cache=None,
               cache_index=0):
    """Return `(general, specific, specific_last_layer, cache)`.

    The hidden states are `[batch, seq, embed]`; without `specific_tower`
    the two specific entries are None.

    Args:
      input_ids: `[batch, seq]` token ids.
      positions: `[batch, seq]` RoPE positions.
      key_valid: `[batch, kv_len]`, False at padding; kv_len is the cache
        length when decoding, else seq.
      cache: a `KVCache` from `QuerierLM.init_cache`, or None.
      cache_index: slot of the first token of `input_ids` in the cache.
    """
    if self.specific_tower:
      # Each row appears twice: row 2i feeds the general tower, 2i + 1 the
      # specific one.
      input_ids, positions, key_valid = (
          jnp.repeat(a, 2, axis=0) for a in (input_ids, positions, key_valid))
    x = jnp.take(self.embed_tokens, input_ids, axis=0).astype(self.dtype)
    if self.config.embed_scale is not None:
      x = x * jnp.asarray(self.config.embed_scale, self.dtype)
    x = lm_model.constrain_residual(x)
    cos, sin = rope_lib.rotary_tables(positions, self.inv_freq)
    sliding_rope = None
    if self.sliding_inv_freq is not None:
      sliding_rope = rope_lib.rotary_tables(positions, self.sliding_inv_freq)
    mask_full, mask_sliding = lm_model.attention_masks(
        self.config, key_valid, input_ids.shape[1], cache_index)
    if mask_sliding is not None and self.is_sliding.all():
      mask_full, mask_sliding = mask_sliding, None
    layer_cache = None if cache is None else (cache.keys, cache.values)
    x, layer_cache = self.layers(x, cos, sin, mask_full, mask_sliding,
                                 jnp.asarray(self.is_sliding), sliding_rope,
                                 cache_index, layer_cache)
    new_cache = None if cache is None else lm_model.KVCache(*layer_cache)
    if not self.specific_tower:
      return self.norm(x), None, None, new_cache
    general, specific = split_towers(x)
    general_final = self.norm(general)
    frozen_scale = nn.meta.unbox(self.norm.variables[FROZEN]["scale"])
    specific_final = self.specific_norm(specific, frozen_scale)
    return (general_final, specific_final.astype(general_final.dtype),
            specific, new_cache)


class QuerierLM(nn.Module):
  """The two-tower querier-aware responder over a frozen `CausalLM`.

  Attributes:
    config: the frozen LLM's parsed HF config.
    lora: LoRA hyperparameters of the general tower (and shared attention).
    specific_rank: width of every `SpecificMLP`.
    gated_merge: merge the towers with a learned per-token gate
      `g * general + (1 - g) * specific`, `g = sigmoid(w . [general,
      specific] + b)`; w starts at zero and b at `gate_init_bias`, so g
      starts at `sigmoid(gate_init_bias)` (0.5, the plain average, at 0).
    gate_init_bias: initial gate bias; a positive one starts the merge
      close to the general tower, whose first outputs are the frozen
      LLM's, while the specific tower is still untrained.
    dtype: compute dtype of activations.
    param_dtype: dtype the frozen weights are stored in.
    remat_policy: "none", or a name in `lm_model.REMAT_POLICIES`.
    deterministic: disables LoRA dropout (evaluation and tests).
    specific_tower: False gives the plain LoRA fine-tune: the general tower
      alone feeds the LM head, and `specific_rank` and `gated_merge` are
      unused.
  """

  config: LMConfig
  lora: LoraConfig = LoraConfig()
  specific_rank: int = 64
  gated_merge: bool = False
  gate_init_bias: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat_policy: str = "none"
  deterministic: bool = True
  specific_tower: bool = True

  def setup(self):
    cfg = self.config
    self.model = QuerierStack(
        cfg, self.lora, self.specific_rank, dtype=self.dtype,
        param_dtype=self.param_dtype, remat_policy=self.remat_policy,
        deterministic=self.deterministic, specific_tower=self.specific_tower,
        name="model")
    if not cfg.tie_word_embeddings:
      self.lm_head = lm_model.Projection(
          (cfg.hidden_size, cfg.padded_vocab_size), ("embed", "vocab"),
          "bsd,dv->bsv", dtype=self.dtype, param_dtype=self.param_dtype,
          name="lm_head")
    if self.gated_merge and self.specific_tower:
      self.gate = nn.Dense(
          1, kernel_init=nn.with_logical_partitioning(
              nn.initializers.zeros, ("embed", None)),
          bias_init=nn.with_logical_partitioning(
              nn.initializers.constant(self.gate_init_bias), (None,)),
          dtype=jnp.float32, name="gate")

  def project_to_vocab(self, hidden: jax.Array) -> jax.Array:
    """Map final hidden states `[batch, seq, embed]` to logits `[..., vocab]`."""
    return lm_model.vocab_logits(self.config, hidden, self.dtype,
                        self.model.embed_tokens,
                        None if self.config.tie_word_embeddings else
                        self.lm_head)

  def towers(self, input_ids, positions, key_valid) -> TowerOutputs:
    """Run both towers on `[batch, seq]` inputs and merge them."""
    return self._towers(input_ids, positions, key_valid)[0]

  def _towers(self, input_ids, positions, key_valid, cache=None,
              cache_index=0) -> tuple[TowerOutputs, lm_model.KVCache | None]:
    general, specific, last_layer, cache = self.model(
        input_ids, positions, key_valid, cache, cache_index)
    if not self.specific_tower:
      weight = jnp.ones(general.shape[:-1] + (1,), general.dtype)
      merged = general
    elif self.gated_merge:
      both = jnp.concatenate([general, specific], axis=-1).astype(jnp.float32)
      weight = jax.nn.sigmoid(self.gate(both)).astype(general.dtype)
      merged = weight * general + (1 - weight) * specific
    else:
      weight = jnp.full(general.shape[:-1] + (1,), 0.5, general.dtype)
      merged = (general + specific) / 2
    return TowerOutputs(general, specific, last_layer, merged, weight), cache

  def __call__(self, input_ids, positions, key_valid):
    """Return `(logits [batch, seq, vocab], TowerOutputs)`."""
    outputs = self.towers(input_ids, positions, key_valid)
    return self.project_to_vocab(outputs.merged), outputs

  def decode(self, input_ids, positions, key_valid, cache, cache_index,
             last_only: bool = False):
    """Run one prefill or decode step with a KV cache.

    Args:
      input_ids: `[batch, seq]` token ids written to cache slots
        `cache_index .. cache_index + seq - 1`.
      positions: `[batch, seq]` RoPE positions.
      key_valid: `[batch, cache_len]`, False at padding slots.
      cache: from `init_cache` with the same batch.
      cache_index: slot of the first token of `input_ids`.
      last_only: return the logits of the last token only.

    Returns:
      `(logits [batch, seq or 1, vocab], updated cache)`.
    """
    outputs, cache = self._towers(input_ids, positions, key_valid, cache,
                                  cache_index)
    merged = outputs.merged[:, -1:] if last_only else outputs.merged
    return self.project_to_vocab(merged), cache

  def init_cache(self, batch: int, max_len: int) -> lm_model.KVCache:
    """Return an empty cache for `batch` sequences of up to `max_len` tokens.

    With the specific tower the cache has `2 * batch` rows, the interleaved
    rows of both towers, because their attention inputs differ after the
    first layer.
    """
    rows = 2 * batch if self.specific_tower else batch
    return lm_model.init_cache(self.config, rows, max_len, self.dtype)
