"""Pre-LayerNorm vision transformer shared by the CLIP and SigLIP imports.

Module and parameter names follow transformers' `CLIPVisionModel` and
`SiglipVisionModel` (transformers 5.25), so that a checkpoint maps onto the
Flax tree by renaming alone: `encoder.layers.N.*` becomes `layers_N/*`,
`weight` becomes `kernel`, `scale` or `embedding`, and `pre_layrnorm` keeps
the transformers spelling.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import re
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xfusion_jax.encoders import interface
from xfusion_jax.llm import checkpoint


def _quick_gelu(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(1.702 * x)


# transformers' `hidden_act` names and their functions. gelu_new, gelu_fast
# and gelu_pytorch_tanh all compute the tanh approximation of GELU.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "quick_gelu": _quick_gelu,
}


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Architecture of a CLIP- or SigLIP-style vision transformer.

  Attributes:
    hidden_size: width of the residual stream.
    intermediate_size: width of the MLP.
    num_hidden_layers: transformer layers.
    num_attention_heads: attention heads, a divisor of hidden_size.
    image_size: side of the square input image in pixels.
    patch_size: side of a square patch, a divisor of image_size.
    layer_norm_eps: epsilon of every LayerNorm.
    hidden_act: a key of `ACTIVATIONS`.
    class_token: prepend a learned class token (CLIP) to the patches.
    pre_layernorm: apply LayerNorm to the embeddings (CLIP).
    post_layernorm: apply LayerNorm to the last hidden state (SigLIP).
    patch_bias: the patch-embedding convolution has a bias (SigLIP).
  """

  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  image_size: int
  patch_size: int
  layer_norm_eps: float
  hidden_act: str
  class_token: bool
  pre_layernorm: bool
  post_layernorm: bool
  patch_bias: bool

  def __post_init__(self):
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(
          f"Unsupported hidden_act {self.hidden_act!r}. Supported: "
          f"{sorted(ACTIVATIONS)}.")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
          f"hidden_size {self.hidden_size} is not a multiple of "
          f"num_attention_heads {self.num_attention_heads}.")
    if self.image_size % self.patch_size:
      raise ValueError(
          f"image_size {self.image_size} is not a multiple of patch_size "
          f"{self.patch_size}.")

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size


def config_from_vision_config(hf_config: Any, *, class_token: bool,
                              pre_layernorm: bool, post_layernorm: bool,
                              patch_bias: bool) -> ViTConfig:
  """Map a transformers CLIP/SigLIP vision config plus the family's layout."""
  if hf_config.num_channels != 3:
    raise ValueError(f"Unsupported num_channels {hf_config.num_channels}. "
                     "The encoder interface feeds RGB images (3 channels).")
  return ViTConfig(
      hidden_size=hf_config.hidden_size,
      intermediate_size=hf_config.intermediate_size,
      num_hidden_layers=hf_config.num_hidden_layers,
      num_attention_heads=hf_config.num_attention_heads,
      image_size=hf_config.image_size,
      patch_size=hf_config.patch_size,
      layer_norm_eps=hf_config.layer_norm_eps,
      hidden_act=hf_config.hidden_act,
      class_token=class_token,
      pre_layernorm=pre_layernorm,
      post_layernorm=post_layernorm,
      patch_bias=patch_bias,
  )


class Embeddings(nn.Module):
  """Patch embedding, optional class token and learned positions."""

  config: ViTConfig

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    config = self.config
    patches = nn.Conv(
        config.hidden_size, (config.patch_size, config.patch_size),
        strides=(config.patch_size, config.patch_size), padding="VALID",
        use_bias=config.patch_bias, name="patch_embedding")(pixels)
    batch = patches.shape[0]
    tokens = patches.reshape(batch, -1, config.hidden_size)
    if config.class_token:
      class_embedding = self.param("class_embedding",
                                   nn.initializers.normal(0.02),
                                   (config.hidden_size,))
      class_tokens = jnp.broadcast_to(class_embedding,
                                      (batch, 1, config.hidden_size))
      tokens = jnp.concatenate([class_tokens, tokens], axis=1)
    positions = nn.Embed(tokens.shape[1], config.hidden_size,
                         name="position_embedding")
    return tokens + positions.embedding[None]


class SelfAttention(nn.Module):
  """Bidirectional multi-head self-attention with biased projections."""

  config: ViTConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    config = self.config
    heads = config.num_attention_heads
    head_dim = config.hidden_size // heads

    def project(name: str) -> jax.Array:
      y = nn.Dense(config.hidden_size, name=name)(x)
      return y.reshape(*y.shape[:-1], heads, head_dim)

    q = project("q_proj")
    k = project("k_proj")
    v = project("v_proj")
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * head_dim**-0.5
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    out = out.reshape(*out.shape[:-2], config.hidden_size)
    return nn.Dense(config.hidden_size, name="out_proj")(out)


class MLP(nn.Module):
  config: ViTConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Dense(self.config.intermediate_size, name="fc1")(x)
    x = ACTIVATIONS[self.config.hidden_act](x)
    return nn.Dense(self.config.hidden_size, name="fc2")(x)


class EncoderLayer(nn.Module):
  config: ViTConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    eps = self.config.layer_norm_eps
    x = x + SelfAttention(self.config, name="self_attn")(
        nn.LayerNorm(eps, name="layer_norm1")(x))
    return x + MLP(self.config, name="mlp")(
        nn.LayerNorm(eps, name="layer_norm2")(x))


class VisionTransformer(nn.Module):
  """The vision tower up to its last hidden state (no pooling head)."""

  config: ViTConfig

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    """Return the last hidden state [batch, tokens, hidden_size].

    Args:
      pixels: normalized float32 [batch, image_size, image_size, channels].
    """
    config = self.config
    x = Embeddings(config, name="embeddings")(pixels)
    if config.pre_layernorm:
      x = nn.LayerNorm(config.layer_norm_eps, name="pre_layrnorm")(x)
    for i in range(config.num_hidden_layers):
      x = EncoderLayer(config, name=f"layers_{i}")(x)
    if config.post_layernorm:
      x = nn.LayerNorm(config.layer_norm_eps, name="post_layernorm")(x)
    return x


def flax_leaf(name: str, value: np.ndarray) -> tuple[tuple[str, ...],
                                                       np.ndarray]:
  """Map one transformers tensor to its Flax path and layout.

  Args:
    name: tensor name without any `vision_model.` prefix, e.g.
      "encoder.layers.3.self_attn.q_proj.weight".
    value: the tensor as float32.

  Returns:
    (path in the params tree, array in Flax layout).
  """
  path = re.sub(r"^encoder\.layers\.(\d+)\.", r"layers_\1.", name).split(".")
  *module, leaf = path
  if leaf != "weight":
    return tuple(path), value
  if module[-1] == "position_embedding":
    return tuple(module) + ("embedding",), value
  if value.ndim == 1:
    return tuple(module) + ("scale",), value
  if value.ndim == 2:
    return tuple(module) + ("kernel",), value.T
  if value.ndim == 4:
    # Conv2d [out, in, kh, kw] -> Flax Conv [kh, kw, in, out].
    return tuple(module) + ("kernel",), value.transpose(2, 3, 1, 0)
  raise ValueError(f"Tensor {name} has unexpected rank {value.ndim}.")


def read_vision_tensors(folder: os.PathLike[str] | str,
                        ignored: re.Pattern[str]) -> dict[str, np.ndarray]:
  """Read the vision-tower tensors of a transformers folder as float32.

  Accepts a vision model saved by transformers 5 (names such as
  "embeddings.*"), one saved by transformers 4, or a full CLIP/SigLIP model.
  The last two put the tower under "vision_model.", and when that prefix is
  present every tensor outside it (text tower, projections) is skipped.

  Args:
    folder: folder with model.safetensors or a sharded safetensors index.
    ignored: names (after the prefix is removed) that the Flax tower does not
      use, such as a pooling head.
  """
  tensors = {}
  with checkpoint.CheckpointReader(folder) as reader:
    names = list(reader.files)
    prefix = "vision_model."
    if any(name.startswith(prefix) for name in names):
      names = [name for name in names if name.startswith(prefix)]
    for name in names:
      short = name.removeprefix(prefix)
      if ignored.fullmatch(short):
        continue
      tensors[short] = np.asarray(reader.tensor(name)[:], np.float32)
  return tensors


def convert_tensors(tensors: dict[str, np.ndarray], config: ViTConfig,
                    folder: os.PathLike[str] | str) -> Any:
  """Convert vision-tower tensors to Flax params and check them.

  Raises:
    ValueError: naming the missing, unexpected or misshapen tensors when the
      checkpoint does not match `config`.
  """
  flat = dict(flax_leaf(name, value) for name, value in tensors.items())
  pixels = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3),
                                jnp.float32)
  expected = flax.traverse_util.flatten_dict(
      jax.eval_shape(VisionTransformer(config).init, jax.random.key(0),
                     pixels)["params"])
  missing = sorted("/".join(p) for p in expected.keys() - flat.keys())
  unexpected = sorted("/".join(p) for p in flat.keys() - expected.keys())
  if missing or unexpected:
    raise ValueError(
        f"The weights in {folder} do not match its config.json: missing "
        f"{missing[:10]}, unexpected {unexpected[:10]} (Flax paths).")
  for path, shape_dtype in expected.items():
    if flat[path].shape != shape_dtype.shape:
      raise ValueError(
          f"{'/'.join(path)} in {folder} has shape {flat[path].shape}, "
          f"expected {shape_dtype.shape} from its config.json.")
  return flax.traverse_util.unflatten_dict(
      {path: jnp.asarray(value) for path, value in flat.items()})


class VisionTransformerEncoder(interface.ImageEncoder):
  """Patch tokens of a vision transformer's last hidden state.

  The class token, where the model has one, is dropped, so every returned
  token is one patch of the `grid_size` x `grid_size` grid.
  """

  def __init__(self, config: ViTConfig, params: Any,
               preprocessing: interface.Preprocessing):
    grid = (config.grid_size, config.grid_size)
    super().__init__(preprocessing, grid, config.hidden_size, params)
    self.config = config
    self.module = VisionTransformer(config)

  def features_from_pixels(self, variables: Any,
                           pixels: jax.Array) -> jax.Array:
    hidden = self.module.apply({"params": variables}, pixels)
    if self.config.class_token:
      hidden = hidden[:, 1:]
    return hidden


def read_statistics(
    folder: os.PathLike[str] | str, default_mean: tuple[float, ...],
    default_std: tuple[float, ...]
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
  """Return (image_mean, image_std) of preprocessor_config.json or defaults."""
  path = pathlib.Path(folder) / "preprocessor_config.json"
  if not path.exists():
    return tuple(default_mean), tuple(default_std)
  raw = json.loads(path.read_text(encoding="utf-8"))
  statistics = []
  for key, default in (("image_mean", default_mean), ("image_std",
                                                      default_std)):
    value = raw.get(key, default)
    if isinstance(value, (int, float)):
      value = [value] * 3
    if len(value) != 3:
      raise ValueError(f"{key} in {path} has {len(value)} entries, but an RGB "
                       "encoder needs 3.")
    statistics.append(tuple(float(v) for v in value))
  return statistics[0], statistics[1]
