"""The X-Fusion model: a frozen LLM with a trainable vision tower.

A sequence mixes text tokens and images; each image enters as
`[BOI] patch tokens [EOI]`. Patch tokens come from autoencoder latents
through a trainable linear patchify plus a timestep embedding. Their outputs
map back to latent patches through a trainable linear unpatchify, which gives
the flow-matching velocity. BOI and EOI are new trainable embeddings; the LLM's
vocabulary and embedding table stay frozen. Attention is causal over the
sequence and bidirectional among the patch tokens of one image; RoPE
positions run over all tokens in order.

Token kinds in a batch (`kinds`, `[batch, seq]`): TEXT, BOI, EOI, IMAGE.
Every row of a batch has the same number of IMAGE slots, so the stack can
permute each row to text-first, image-last order with static shapes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from xfusion_jax.llm import model as lm_model
from xfusion_jax.llm import rope as rope_lib
from xfusion_jax.llm.config import LMConfig
from xfusion_jax.xfusion import layers

TEXT, BOI, EOI, IMAGE = 0, 1, 2, 3
TRAINABLE = layers.TRAINABLE


@dataclasses.dataclass(frozen=True)
class XFusionConfig:
  """Settings of the vision side.

  Attributes:
    architecture: one of `layers.ARCHITECTURES`.
    xfuse: fuse both towers at image tokens ("dual_tower" only).
    latent_channels: channels of the autoencoder latents.
    latent_size: (height, width) of one image's latents.
    patch_size: side of the square latent patch per image token.
    timestep_features: width of the sinusoidal timestep features.
    dtype: compute dtype.
    param_dtype: storage dtype of trainable weights.
    remat_policy: "none" or a name in `lm_model.REMAT_POLICIES`.
    scan_unroll: layers per iteration of the layer scan. Setting it to the
      layer count unrolls the stack, so that XLA's cost analysis, which
      counts a loop body once, counts every layer (see `xfusion_jax.aot`).
  """

  architecture: str = "dual_tower"
  xfuse: bool = False
  latent_channels: int = 4
  latent_size: tuple[int, int] = (8, 8)
  patch_size: int = 2
  timestep_features: int = 256
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat_policy: str = "none"
  scan_unroll: int = 1

  @property
  def tokens_per_image(self) -> int:
    h, w = self.latent_size
    if h % self.patch_size or w % self.patch_size:
      raise ValueError(f"latent_size {self.latent_size} is not divisible by "
                       f"patch_size {self.patch_size}.")
    return (h // self.patch_size) * (w // self.patch_size)

  @property
  def patch_dim(self) -> int:
    return self.patch_size * self.patch_size * self.latent_channels


class XFusionOutput(NamedTuple):
  """Model outputs, in the permuted text-first order.

  Attributes:
    text_logits: `[batch, text_len, vocab]` at the text-side slots.
    text_order: `[batch, text_len]` original slot of each text-side row, to
      gather targets.
    velocity: `[batch, images, h, w, channels]` predicted flow velocity, or
      None without images.
    text_kv: with `return_text_kv`, the text blocks' keys and values of every
      token in permuted order, `[layers, batch, seq, kv_heads, head_dim]`.
    image_hidden: with `align_layer`, the hidden states at the image tokens
      after that layer, `[batch, images * tokens_per_image, embed]`, each
      image's tokens in row-major order of its token grid.
  """

  text_logits: jax.Array
  text_order: jax.Array
  velocity: jax.Array | None
  text_kv: tuple[jax.Array, jax.Array] | None = None
  image_hidden: jax.Array | None = None


def patchify(latents: jax.Array, patch: int) -> jax.Array:
  """`[batch, images, h, w, c]` -> `[batch, images * (h/p) * (w/p), p*p*c]`."""
  b, n, h, w, c = latents.shape
  x = latents.reshape(b, n, h // patch, patch, w // patch, patch, c)
  x = x.transpose(0, 1, 2, 4, 3, 5, 6)
  return x.reshape(b, n * (h // patch) * (w // patch), patch * patch * c)


def unpatchify(tokens: jax.Array, images: int, latent_size: tuple[int, int],
               patch: int) -> jax.Array:
  """Inverse of `patchify`."""
  b = tokens.shape[0]
  h, w = latent_size
  c = tokens.shape[-1] // (patch * patch)
  x = tokens.reshape(b, images, h // patch, w // patch, patch, patch, c)
  x = x.transpose(0, 1, 2, 4, 3, 5, 6)
  return x.reshape(b, images, h, w, c)


def timestep_features(t: jax.Array, dim: int) -> jax.Array:
  """Sinusoidal features of flow times t in [0, 1], `[..., dim]`."""
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) /
                  half)
  angles = (t.astype(jnp.float32) * 1000.0)[..., None] * freqs
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def fusion_mask(kinds: jax.Array, image_ids: jax.Array,
                valid: jax.Array) -> jax.Array:
  """Boolean attention mask `[batch, 1, seq, seq]` in original slot order.

  A query attends to every valid earlier key and to every key of its own
  image.

  Args:
    kinds: `[batch, seq]` token kinds.
    image_ids: `[batch, seq]` 1-based image index at IMAGE slots, 0 elsewhere.
    valid: `[batch, seq]` False at padding and dropped tokens.
  """
  del kinds
  seq = valid.shape[1]
  causal = jnp.tril(jnp.ones((seq, seq), bool))[None]
  same_image = ((image_ids[:, :, None] == image_ids[:, None, :]) &
                (image_ids[:, :, None] > 0))
  allowed = (causal | same_image) & valid[:, None, :].astype(bool)
  return allowed[:, None]


def text_first_order(kinds: jax.Array) -> jax.Array:
  """Per-row permutation putting non-IMAGE slots first, order kept."""
  return jnp.argsort((kinds == IMAGE).astype(jnp.int32), axis=1, stable=True)


def _take_rows(array, order):
  """Gather `array[b, order[b]]` along axis 1."""
  index = order.reshape(order.shape + (1,) * (array.ndim - 2))
  return jnp.take_along_axis(array, index, axis=1)


class XFusion(nn.Module):
  """The frozen LLM with X-Fusion's vision side.

  Variables: "frozen" contains the LLM (`embed_tokens`, `layers/text/...`,
  `norm`, `lm_head`), "params" the trainable parts.

  Attributes:
    lm_config: the frozen LLM's config.
    config: the vision side's settings.
    frozen_dtype: storage dtype of the frozen LLM weights.
    return_text_kv: fill `XFusionOutput.text_kv`.
    align_layer: fill `XFusionOutput.image_hidden` with the image-token
      hidden states after this layer, counted from 1; None leaves it empty.
  """

  lm_config: LMConfig
  config: XFusionConfig
  frozen_dtype: Any = jnp.float32
  return_text_kv: bool = False
  align_layer: int | None = None

  def setup(self):
    cfg, lm_cfg = self.config, self.lm_config
    num_layers = lm_cfg.num_hidden_layers
    if self.align_layer is not None and not 1 <= self.align_layer <= num_layers:
      raise ValueError(
          f"align_layer {self.align_layer} is outside the stack. Pass a "
          f"layer from 1 to {num_layers}.")
    unsupported = [name for name, used in (
        ("qk_norm", lm_cfg.qk_norm), ("sandwich_norms", lm_cfg.sandwich_norms),
        ("embed_scale", lm_cfg.embed_scale is not None),
        ("norm_unit_offset", lm_cfg.norm_unit_offset),
        ("sliding_window", lm_cfg.uses_sliding_window)) if used]
    if unsupported:
      raise ValueError(
          f"X-Fusion's fusion layers implement the Llama block; this "
          f"{lm_cfg.model_type} checkpoint also uses {', '.join(unsupported)}. "
          "Pick a Llama, Mistral (without sliding window) or Qwen2 model.")
    d = lm_cfg.hidden_size
    frozen = dict(collection=lm_model.FROZEN, param_dtype=self.frozen_dtype)
    self.embed_tokens = lm_model.make_weight(
        self, "embed_tokens", (lm_cfg.padded_vocab_size, d), ("vocab", "embed"),
        self.frozen_dtype, collection=lm_model.FROZEN)
    self.norm = lm_model.RMSNorm(lm_cfg.rms_norm_eps, **frozen)
    if not lm_cfg.tie_word_embeddings:
      self.lm_head = lm_model.Projection(
          (d, lm_cfg.padded_vocab_size), ("embed", "vocab"), "bsd,dv->bsv",
          dtype=cfg.dtype, **frozen)
    self.vision_norm = lm_model.RMSNorm(
        lm_cfg.rms_norm_eps, collection=TRAINABLE, param_dtype=cfg.param_dtype)
    dense = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    self.patch_in = nn.Dense(
        d, kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("patch", "embed")), **dense)
    # Zero-initialized output head: the initial velocity prediction is 0,
    # so early updates do not push noise through the stack.
    self.patch_out = nn.Dense(
        cfg.patch_dim, kernel_init=nn.with_logical_partitioning(
            nn.initializers.zeros, ("embed", "patch")), **dense)
    self.time_mlp_in = nn.Dense(
        d, kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("time", "embed")), **dense)
    self.time_mlp_out = nn.Dense(
        d, kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("embed", "embed_out")), **dense)
    special_init = nn.with_logical_partitioning(
        nn.initializers.normal(0.02), ("special", "embed"))
    self.special_embeddings = self.param("special_embeddings", special_init,
                                         (2, d), cfg.param_dtype)

    self.layers = self._layer_stack()

  def _layer_stack(self):
    cfg = self.config
    layer_cls = layers.FusionLayer
    if cfg.remat_policy != "none":
      layer_cls = nn.remat(layer_cls,
                           policy=lm_model.REMAT_POLICIES[cfg.remat_policy],
                           prevent_cse=False)
    return nn.scan(
        layer_cls,
        variable_axes={lm_model.FROZEN: 0, TRAINABLE: 0},
        split_rngs={TRAINABLE: True},
        in_axes=(nn.broadcast,) * 4,
        length=self.lm_config.num_hidden_layers,
        unroll=cfg.scan_unroll,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(self.lm_config, architecture=cfg.architecture,
      xfuse=cfg.xfuse, return_text_kv=self.return_text_kv,
      return_image_hidden=self.align_layer is not None, dtype=cfg.dtype,
      frozen_dtype=self.frozen_dtype, param_dtype=cfg.param_dtype,
      name="layers")

  def embed_images(self, latents: jax.Array, t: jax.Array) -> jax.Array:
    """Image tokens `[batch, images * tokens_per_image, embed]`."""
    cfg = self.config
    tokens = self.patch_in(patchify(latents, cfg.patch_size).astype(cfg.dtype))
    time = timestep_features(t, cfg.timestep_features).astype(cfg.dtype)
    time = self.time_mlp_out(nn.silu(self.time_mlp_in(time)))
    per_image = jnp.repeat(time, cfg.tokens_per_image, axis=1)
    return tokens + per_image

  def embed_text(self, tokens: jax.Array, kinds: jax.Array) -> jax.Array:
    """Embeddings of non-image slots: frozen table, BOI and EOI."""
    dtype = self.config.dtype
    x = jnp.take(self.embed_tokens, tokens, axis=0).astype(dtype)
    special = self.special_embeddings.astype(dtype)
    x = jnp.where((kinds == BOI)[..., None], special[0], x)
    return jnp.where((kinds == EOI)[..., None], special[1], x)

  def text_logits(self, hidden: jax.Array) -> jax.Array:
    return lm_model.vocab_logits(
        self.lm_config, self.norm(hidden), self.config.dtype, self.embed_tokens,
        None if self.lm_config.tie_word_embeddings else self.lm_head)

  def __call__(self, tokens, kinds, image_ids, positions, valid,
               latents=None, t=None) -> XFusionOutput:
    """Run the model on a batch.

    Args:
      tokens: `[batch, seq]` token ids (ignored at BOI, EOI, IMAGE slots).
      kinds: `[batch, seq]` TEXT, BOI, EOI or IMAGE.
      image_ids: `[batch, seq]` 1-based image index at IMAGE slots, else 0.
      positions: `[batch, seq]` RoPE positions.
      valid: `[batch, seq]` False at padding and dropped tokens.
      latents: `[batch, images, h, w, c]` (noisy) latents, or None.
      t: `[batch, images]` flow times of the latents, or None.
    """
    cfg = self.config
    if latents is None and self._text_only_is_frozen_lm():
      return self._frozen_lm_forward(tokens, kinds, positions, valid)
    order = text_first_order(kinds)
    image_slots = 0 if latents is None else (
        latents.shape[1] * cfg.tokens_per_image)
    text_len = tokens.shape[1] - image_slots
    text_order = order[:, :text_len]

    x = self.embed_text(_take_rows(tokens, text_order),
                        _take_rows(kinds, text_order))
    if latents is not None:
      x = jnp.concatenate([x, self.embed_images(latents, t)], axis=1)
    x = lm_model.constrain_residual(x)
    mask = fusion_mask(kinds, image_ids, valid)[:, 0]
    mask = _take_rows(mask, order)
    mask = jnp.take_along_axis(mask, order[:, None, :], axis=2)[:, None]
    inv_freq = rope_lib.inverse_frequencies(self.lm_config.rope,
                                            self.lm_config.head_dim)
    cos, sin = rope_lib.rotary_tables(_take_rows(positions, order), inv_freq)

    x, per_layer = self.layers(x, cos, sin, mask[:, :, :text_len],
                               mask[:, :, text_len:])
    image_hidden = None
    if self.align_layer is None:
      text_kv = per_layer
    else:
      # The scan stacks every layer's image-token output, and only one is
      # kept.
      text_kv, stacked_image_hidden = per_layer
      image_hidden = stacked_image_hidden[self.align_layer - 1]

    logits = self.text_logits(x[:, :text_len])
    velocity = None
    if latents is not None:
      out = self.patch_out(self.vision_norm(x[:, text_len:]))
      velocity = unpatchify(out.astype(jnp.float32), latents.shape[1],
                            cfg.latent_size, cfg.patch_size)
    return XFusionOutput(logits, text_order, velocity, text_kv, image_hidden)


  def _text_only_is_frozen_lm(self) -> bool:
    """Return whether text-only input runs exactly the frozen LLM.

    In "dual_tower" and "dual_projection" text tokens only ever meet frozen
    weights. Without images they form the frozen LLM's own computation,
    which `_frozen_lm_forward` then runs through the LLM's code, so that XLA
    compiles the same program and the logits match bit for bit. Running the
    fusion layers instead gives the same values in exact arithmetic but
    differently rounded float32 sums (1e-5 on a 30-layer model).
    """
    return (self.config.architecture in ("dual_tower", "dual_projection") and
            not self.return_text_kv and self.align_layer is None and
            not self.is_initializing())

  def _frozen_lm_forward(self, tokens, kinds, positions, valid):
    lm = frozen_decoder(self)
    frozen = lm_from_frozen(self.variables[lm_model.FROZEN])
    # BOI and EOI may appear without an image (a prompt that ends in BOI).
    embeddings = self.embed_text(tokens, kinds)
    logits, _ = lm.apply({lm_model.FROZEN: frozen}, tokens, positions,
                         valid.astype(bool), embeddings=embeddings)
    order = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return XFusionOutput(logits, order, None)


def frozen_decoder(module: XFusion) -> lm_model.CausalLM:
  """Return the plain LLM that runs `module`'s frozen weights.

  The module is detached (parent=None), so it can be applied as a pure
  function of the weights that `lm_from_frozen` rearranges, also from
  inside `module`.
  """
  return lm_model.CausalLM(module.lm_config, dtype=module.config.dtype,
                           param_dtype=module.frozen_dtype, parent=None)


def frozen_from_lm(weights: dict[str, Any]) -> dict[str, Any]:
  """Rearrange `FrozenLM.weights` into the X-Fusion "frozen" tree (no copy)."""
  stack = weights["model"]
  frozen = {"embed_tokens": stack["embed_tokens"], "norm": stack["norm"],
            "layers": {"text": stack["layers"]}}
  if "lm_head" in weights:
    frozen["lm_head"] = weights["lm_head"]
  return frozen


def lm_from_frozen(frozen: dict[str, Any]) -> dict[str, Any]:
  """Inverse of `frozen_from_lm`."""
  weights = {"model": {"embed_tokens": frozen["embed_tokens"],
                       "norm": frozen["norm"],
                       "layers": frozen["layers"]["text"]}}
  if "lm_head" in frozen:
    weights["lm_head"] = frozen["lm_head"]
  return weights


def example_inputs(config: XFusionConfig, caption_len: int = 4):
  """Build a one-row batch with one image, for `init` and shape inference."""
  seq = caption_len + config.tokens_per_image + 2
  kinds = jnp.full((1, seq), TEXT, jnp.int32)
  kinds = kinds.at[0, caption_len].set(BOI).at[0, -1].set(EOI)
  kinds = kinds.at[0, caption_len + 1:-1].set(IMAGE)
  image_ids = (kinds == IMAGE).astype(jnp.int32)
  h, w = config.latent_size
  return dict(
      tokens=jnp.zeros((1, seq), jnp.int32), kinds=kinds, image_ids=image_ids,
      positions=jnp.arange(seq)[None], valid=jnp.ones((1, seq), bool),
      latents=jnp.zeros((1, 1, h, w, config.latent_channels), jnp.float32),
      t=jnp.zeros((1, 1), jnp.float32))


def init_trainable(module: XFusion, frozen: dict[str, Any],
                   rng: jax.Array) -> dict[str, Any]:
  """Create the trainable parameters, boxed with logical axis names.

  Vision blocks (and, for "single_tower", the text blocks) start as copies of
  the frozen LLM layers and the vision final norm as a copy of the LLM's;
  the new heads use their initializers.
  """
  boxed = module.init({TRAINABLE: rng}, **example_inputs(module.config))
  boxed = boxed[TRAINABLE]
  param_dtype = module.config.param_dtype

  def copy_of(box, source):
    # A real copy: with equal dtypes asarray would return the frozen buffer
    # itself, and a step that donates the params would then free it.
    return box.replace_boxed(jnp.array(source, param_dtype, copy=True))

  def copy_tree(boxes, sources):
    return jax.tree.map(copy_of, boxes, sources,
                        is_leaf=lambda x: isinstance(x, nn.Partitioned))

  boxed = dict(boxed)
  layer_params = dict(boxed["layers"])
  frozen_layers = frozen["layers"]["text"]
  for tower in ("vision", "text"):
    if tower in layer_params:
      layer_params[tower] = copy_tree(layer_params[tower], frozen_layers)
  boxed["layers"] = layer_params
  boxed["vision_norm"] = copy_tree(boxed["vision_norm"], frozen["norm"])
  return boxed
