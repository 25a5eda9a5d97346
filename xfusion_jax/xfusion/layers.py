"""X-Fusion's per-layer blocks: a frozen text block beside a trainable one.

Inside the stack the sequence is permuted so that every row has its text
tokens first and its image tokens last (`[batch, text_len + image_len]`).
So each tower works on a static slice instead of gathering tokens. RoPE
positions and the attention mask travel with the tokens, so attention is
unchanged by the permutation.

Architectures (`XFusionConfig.architecture`):
- "dual_tower": text tokens take the frozen block's output, image tokens the
  vision block's. Each block computes queries for its own tokens only, and
  keys/values for all tokens with its own weights. With `xfuse`, image
  tokens also pass the frozen block and their output is
  alpha * vision + beta * text with learnable per-layer scalars.
- "dual_projection": one joint attention; each token's Q/K/V/O, MLP and
  norms come from its modality's weights.
- "gated": every token passes the frozen block, then a trainable copy whose
  change is added through a per-layer gate initialized to 0.
- "single_tower": the LLM's own blocks, trainable, for both modalities.
"""

from __future__ import annotations

import dataclasses
from typing import Any
import flax.linen as nn
import jax
import jax.numpy as jnp

from xfusion_jax.llm import model as lm_model
from xfusion_jax.llm import rope as rope_lib
from xfusion_jax.llm.config import LMConfig

TRAINABLE = "params"
ARCHITECTURES = ("dual_tower", "dual_projection", "gated", "single_tower")


@dataclasses.dataclass(frozen=True)
class LayerInputs:
  """Per-sequence tensors that every layer uses.

  Attributes:
    cos: RoPE cos table `[batch, seq, head_dim]`, permuted like the tokens.
    sin: RoPE sin table, likewise.
    mask: boolean `[batch, 1, seq, seq]` attention mask, permuted likewise.
  """

  cos: jax.Array
  sin: jax.Array
  mask: jax.Array


class Block(nn.Module):
  """The four sub-modules of one LLM layer, in one variable collection.

  The names match the HF Llama layer, so a trainable copy exports in Llama
  state-dict layout.
  """

  config: LMConfig
  collection: str
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    cfg = self.config
    common = dict(collection=self.collection, param_dtype=self.param_dtype)
    self.input_layernorm = lm_model.RMSNorm(cfg.rms_norm_eps, **common)
    self.self_attn = lm_model.Attention(cfg, dtype=self.dtype, **common)
    self.post_attention_layernorm = lm_model.RMSNorm(cfg.rms_norm_eps,
                                                     **common)
    self.mlp = lm_model.MLP(cfg, dtype=self.dtype, **common)

  def queries(self, normed, cos, sin):
    return rope_lib.apply_rotary(self.self_attn.q_proj(normed), cos, sin)

  def keys_values(self, normed, cos, sin):
    keys = rope_lib.apply_rotary(self.self_attn.k_proj(normed), cos, sin)
    return keys, self.self_attn.v_proj(normed)

  def normed_keys_values(self, x, cos, sin):
    return self.keys_values(self.input_layernorm(x), cos, sin)

  def attention_output(self, attended):
    return self.self_attn.o_proj(attended)

  def feed_forward(self, x):
    """Residual MLP half of the layer, on batch-sharded residual streams."""
    x = lm_model.constrain_residual(x)
    return lm_model.constrain_residual(
        x + self.mlp(self.post_attention_layernorm(x)))

  def __call__(self, x, inputs: LayerInputs):
    """Apply the whole layer to every token ("gated" and "single_tower")."""
    normed = self.input_layernorm(x)
    keys, values = self.keys_values(normed, inputs.cos, inputs.sin)
    queries = self.queries(normed, inputs.cos, inputs.sin)
    attended = lm_model.attend(queries, keys, values, inputs.mask,
                               self.config.attention_scale)
    return self.feed_forward(x + self.attention_output(attended))


def _split(array, text_len, axis=1):
  return (jax.lax.slice_in_dim(array, 0, text_len, axis=axis),
          jax.lax.slice_in_dim(array, text_len, array.shape[axis], axis=axis))


class FusionLayer(nn.Module):
  """One layer of the X-Fusion stack, in the configured architecture.

  Attributes:
    config: the LLM config.
    architecture: one of ARCHITECTURES.
    xfuse: "dual_tower" only: fuse both towers' outputs at image tokens.
    return_text_kv: also return the text block's keys and values of every
      token (`[batch, seq, kv_heads, head_dim]` each), which seed the KV
      cache of text decoding after an image prefix.
    return_image_hidden: also return the layer's output at the image tokens
      (`[batch, image_len, embed]`), which the alignment loss reads. Off by
      default, because under `nn.scan` it stacks one copy per layer.
    dtype: compute dtype.
    frozen_dtype: storage dtype of the frozen LLM weights.
    param_dtype: storage dtype of trainable weights.
  """

  config: LMConfig
  architecture: str = "dual_tower"
  xfuse: bool = False
  return_text_kv: bool = False
  return_image_hidden: bool = False
  dtype: Any = jnp.float32
  frozen_dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    if self.architecture not in ARCHITECTURES:
      raise ValueError(f"Unknown architecture {self.architecture!r}; choose "
                       f"one of {', '.join(ARCHITECTURES)}.")
    if self.xfuse and self.architecture != "dual_tower":
      raise ValueError("xfuse applies to the dual_tower architecture only, "
                       f"not {self.architecture!r}.")
    if self.architecture == "single_tower":
      self.text = Block(self.config, TRAINABLE, self.dtype, self.param_dtype)
    else:
      self.text = Block(self.config, lm_model.FROZEN, self.dtype,
                        self.frozen_dtype)
      self.vision = Block(self.config, TRAINABLE, self.dtype, self.param_dtype)
    if self.architecture == "gated":
      self.gate = self.param("gate", nn.initializers.zeros, (), jnp.float32)
    if self.xfuse:
      self.xfuse_alpha = self.param("xfuse_alpha", nn.initializers.ones, (),
                                    jnp.float32)
      self.xfuse_beta = self.param("xfuse_beta", nn.initializers.zeros, (),
                                   jnp.float32)

  def __call__(self, x, cos, sin, mask_text, mask_image):
    """Apply the layer to `x` `[batch, text_len + image_len, embed]`.

    `mask_text` and `mask_image` are the attention-mask rows of the text and
    image queries (`[batch, 1, rows, seq]`); their row counts give the split.

    Returns:
      The new `x`, and the per-layer outputs that `nn.scan` stacks: the text
      keys and values (None unless `return_text_kv`), and with
      `return_image_hidden` a pair of them and the image-token output.
    """
    text_len = mask_text.shape[2]
    inputs = LayerInputs(cos, sin,
                         jnp.concatenate([mask_text, mask_image], axis=2))
    text_kv = None
    if self.return_text_kv:
      text_kv = self.text.normed_keys_values(x, cos, sin)
    if text_len == x.shape[1] and self.architecture != "gated":
      # Text only: the text block alone, exactly as in the frozen LLM.
      x = self.text(x, inputs)
    elif self.architecture == "dual_tower":
      x = self._dual_tower(x, inputs, text_len)
    elif self.architecture == "dual_projection":
      x = self._dual_projection(x, inputs, text_len)
    elif self.architecture == "gated":
      base = self.text(x, inputs)
      x = base + self.gate.astype(x.dtype) * (self.vision(x, inputs) - x)
    else:
      x = self.text(x, inputs)
    x = lm_model.constrain_residual(x)
    if self.return_image_hidden:
      return x, (text_kv, x[:, text_len:])
    return x, text_kv

  def _dual_tower(self, x, inputs: LayerInputs, text_len: int):
    text, vision = self.text, self.vision
    scale = self.config.attention_scale
    cos_text, cos_image = _split(inputs.cos, text_len)
    sin_text, sin_image = _split(inputs.sin, text_len)
    mask_text, mask_image = _split(inputs.mask, text_len, axis=2)
    x_text, x_image = _split(x, text_len)

    # Keys and values of every token, once with each tower's weights.
    normed_by_text = text.input_layernorm(x)
    normed_by_vision = vision.input_layernorm(x)
    keys_t, values_t = text.keys_values(normed_by_text, inputs.cos, inputs.sin)
    keys_v, values_v = vision.keys_values(normed_by_vision, inputs.cos,
                                          inputs.sin)

    # Queries, MLP and norms only for each tower's own tokens.
    q_text = text.queries(_split(normed_by_text, text_len)[0], cos_text,
                          sin_text)
    out_text = text.attention_output(
        lm_model.attend(q_text, keys_t, values_t, mask_text, scale))
    out_text = text.feed_forward(x_text + out_text)

    q_image = vision.queries(_split(normed_by_vision, text_len)[1],
                             cos_image, sin_image)
    out_image = vision.attention_output(
        lm_model.attend(q_image, keys_v, values_v, mask_image, scale))
    out_image = vision.feed_forward(x_image + out_image)

    if self.xfuse:
      q_by_text = text.queries(_split(normed_by_text, text_len)[1],
                               cos_image, sin_image)
      image_by_text = text.attention_output(
          lm_model.attend(q_by_text, keys_t, values_t, mask_image, scale))
      image_by_text = text.feed_forward(x_image + image_by_text)
      out_image = (self.xfuse_alpha.astype(x.dtype) * out_image +
                   self.xfuse_beta.astype(x.dtype) * image_by_text)
    return jnp.concatenate([out_text, out_image], axis=1)

  def _dual_projection(self, x, inputs: LayerInputs, text_len: int):
    text, vision = self.text, self.vision
    cos_text, cos_image = _split(inputs.cos, text_len)
    sin_text, sin_image = _split(inputs.sin, text_len)
    x_text, x_image = _split(x, text_len)
    normed_text = text.input_layernorm(x_text)
    normed_image = vision.input_layernorm(x_image)
    queries = jnp.concatenate([
        text.queries(normed_text, cos_text, sin_text),
        vision.queries(normed_image, cos_image, sin_image)], axis=1)
    keys_t, values_t = text.keys_values(normed_text, cos_text, sin_text)
    keys_v, values_v = vision.keys_values(normed_image, cos_image, sin_image)
    keys = jnp.concatenate([keys_t, keys_v], axis=1)
    values = jnp.concatenate([values_t, values_v], axis=1)
    attended = lm_model.attend(queries, keys, values, inputs.mask,
                               self.config.attention_scale)
    attended_text, attended_image = _split(attended, text_len)
    out_text = text.feed_forward(x_text + text.attention_output(attended_text))
    out_image = vision.feed_forward(
        x_image + vision.attention_output(attended_image))
    return jnp.concatenate([out_text, out_image], axis=1)
