"""Architecture settings parsed from a Hugging Face `config.json`.

Only the fields that change the computation are kept as typed attributes; the
source dictionary is kept too, so that export can write every field back.
Unknown model or RoPE types raise instead of falling back to defaults, because
a silently wrong RoPE gives plausible but wrong logits.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma3_text")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# hidden_act (hidden_activation in Gemma configs) values the MLP implements.
SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  """Rotary position embedding settings.

  Attributes:
    theta: base of the inverse-frequency geometric series.
    rope_type: "default", "linear" or "llama3".
    factor: position scaling factor ("linear" and "llama3").
    low_freq_factor: "llama3" only.
    high_freq_factor: "llama3" only.
    original_max_position_embeddings: "llama3" only, the context length the
      unscaled model was trained on.
  """

  theta: float = 10000.0
  rope_type: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """Architecture of a decoder-only LLM, in the names transformers uses."""

  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  rms_norm_eps: float
  rope: RopeConfig
  tie_word_embeddings: bool = False
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  hidden_act: str = "silu"
  # One entry per layer: FULL_ATTENTION or SLIDING_ATTENTION.
  layer_types: tuple[str, ...] = ()
  sliding_window: int | None = None
  max_position_embeddings: int = 2048
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int | None = None
  # Gemma 3 settings. Their defaults give the Llama-family computation.
  # RoPE of the sliding-attention layers when it differs from `rope`, which
  # then applies to the full-attention layers only.
  sliding_rope: RopeConfig | None = None
  # RMSNorm multiplies by (1 + weight) instead of weight.
  norm_unit_offset: bool = False
  # RMSNorm over head_dim on queries and keys before RoPE ("q_norm", "k_norm").
  qk_norm: bool = False
  # Extra RMSNorms on the attention and MLP outputs before each residual add
  # ("post_attention_layernorm", "post_feedforward_layernorm"). The MLP input
  # norm is then "pre_feedforward_layernorm".
  sandwich_norms: bool = False
  # Multiplier of the token embeddings (sqrt(hidden_size) in Gemma), applied
  # in the compute dtype.
  embed_scale: float | None = None
  # Attention logits are scaled by query_pre_attn_scalar**-0.5 instead of
  # head_dim**-0.5 when set.
  query_pre_attn_scalar: float | None = None
  # Logits become cap * tanh(logits / cap) when set.
  final_logit_softcapping: float | None = None
  # Rows appended to the embedding table and LM head so that a mesh axis
  # divides the vocabulary (see `padded_vocab_size`). Their logits are masked
  # to the dtype's minimum, and export drops them.
  vocab_padding: int = 0
  # The parsed config.json, written back unchanged (apart from dtype) on export.
  source: dict[str, Any] = dataclasses.field(
      default_factory=dict, compare=False, repr=False)

  @property
  def padded_vocab_size(self) -> int:
    """Rows of the embedding table and columns of the LM head."""
    return self.vocab_size + self.vocab_padding

  @property
  def uses_sliding_window(self) -> bool:
    return SLIDING_ATTENTION in self.layer_types

  @property
  def attention_scale(self) -> float:
    """Multiplier of the query-key logits."""
    return (self.query_pre_attn_scalar or self.head_dim)**-0.5


def _rope_from_dict(params: dict[str, Any], where: str) -> RopeConfig:
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type not in SUPPORTED_ROPE_TYPES:
    raise ValueError(
        f"Unsupported rope_type {rope_type!r} in {where}; supported types are "
        f"{', '.join(SUPPORTED_ROPE_TYPES)}.")
  if "rope_theta" not in params:
    raise ValueError(f"Missing rope_theta in {where}.")
  fields = {"theta": float(params["rope_theta"]), "rope_type": rope_type}
  if rope_type in ("linear", "llama3"):
    fields["factor"] = float(params["factor"])
  if rope_type == "llama3":
    fields["low_freq_factor"] = float(params["low_freq_factor"])
    fields["high_freq_factor"] = float(params["high_freq_factor"])
    fields["original_max_position_embeddings"] = int(
        params["original_max_position_embeddings"])
  return RopeConfig(**fields)


def parse_rope(source: dict[str, Any], where: str) -> RopeConfig:
  """Read RoPE settings from either key layout.

  transformers 4.x writes `rope_theta` plus an optional `rope_scaling` dict;
  transformers 5.x writes a single `rope_parameters` dict holding both.
  """
  classic = None
  if "rope_theta" in source or source.get("rope_scaling"):
    params = dict(source.get("rope_scaling") or {})
    params["rope_theta"] = source.get("rope_theta", 10000.0)
    classic = _rope_from_dict(params, f"{where} (rope_theta/rope_scaling)")
  if source.get("rope_parameters") is None:
    return classic or _rope_from_dict({"rope_theta": 10000.0}, where)
  rope = _rope_from_dict(source["rope_parameters"],
                         f"{where} (rope_parameters)")
  if classic is not None and classic != rope:
    raise ValueError(
        f"{where} has conflicting RoPE settings: rope_parameters gives "
        f"{rope}, rope_theta/rope_scaling give {classic}. Remove one.")
  return rope


def _layer_types(source: dict[str, Any], model_type: str,
                 num_layers: int) -> tuple[str, ...]:
  if source.get("layer_types"):
    layer_types = tuple(source["layer_types"])
  elif model_type == "mistral" and source.get("sliding_window"):
    layer_types = (SLIDING_ATTENTION,) * num_layers
  elif model_type == "gemma3_text":
    # transformers' Gemma3TextConfig default: every `sliding_window_pattern`-th
    # layer (6 unless set) is global, the others slide.
    pattern = int(source.get("sliding_window_pattern", 6))
    layer_types = tuple(
        FULL_ATTENTION if (i + 1) % pattern == 0 else SLIDING_ATTENTION
        for i in range(num_layers))
  elif model_type == "qwen2" and source.get("use_sliding_window"):
    first_sliding = source.get("max_window_layers", num_layers)
    layer_types = tuple(
        SLIDING_ATTENTION if i >= first_sliding else FULL_ATTENTION
        for i in range(num_layers))
  else:
    layer_types = (FULL_ATTENTION,) * num_layers
  unknown = set(layer_types) - {FULL_ATTENTION, SLIDING_ATTENTION}
  if unknown or len(layer_types) != num_layers:
    raise ValueError(
        f"Invalid layer_types {layer_types!r}: expected {num_layers} entries "
        f"of {FULL_ATTENTION!r} or {SLIDING_ATTENTION!r}.")
  return layer_types


def _gemma3_ropes(source: dict[str, Any],
                  where: str) -> tuple[RopeConfig, RopeConfig]:
  """Read the global and the local RoPE of a Gemma 3 config.

  transformers 5.x writes `rope_parameters` with one entry per layer type;
  4.x writes `rope_theta` (global), `rope_local_base_freq` (local) and
  `rope_scaling` (global only). Missing values take Gemma3TextConfig's
  defaults, 1e6 global and 1e4 local, as transformers 5.25 does.
  """
  params = source.get("rope_parameters") or {}
  unknown = set(params) - {FULL_ATTENTION, SLIDING_ATTENTION}
  if unknown:
    raise ValueError(
        f"Invalid rope_parameters in {where}: gemma3_text expects one entry "
        f"per layer type ({FULL_ATTENTION!r}, {SLIDING_ATTENTION!r}), got "
        f"keys {sorted(params)}.")
  full = dict(params.get(FULL_ATTENTION) or {"rope_type": "default"})
  full.update(source.get("rope_scaling") or {})
  full.setdefault("rope_theta", source.get("rope_theta", 1e6))
  local = dict(params.get(SLIDING_ATTENTION) or {"rope_type": "default"})
  local.setdefault("rope_theta", source.get("rope_local_base_freq", 1e4))
  return (_rope_from_dict(full, f"{where} ({FULL_ATTENTION} RoPE)"),
          _rope_from_dict(local, f"{where} ({SLIDING_ATTENTION} RoPE)"))


def _gemma3_fields(source: dict[str, Any], where: str) -> dict[str, Any]:
  """Return the LMConfig fields specific to Gemma 3 text models."""
  # transformers 5.25's Gemma3Attention never passes the cap to its
  # attention function, so a config that sets one has no reference behavior
  # to match. Gemma 3 releases set it to null.
  if source.get("attn_logit_softcapping") is not None:
    raise ValueError(
        f"Unsupported attn_logit_softcapping="
        f"{source['attn_logit_softcapping']!r} in {where}: it is not "
        "implemented for gemma3_text. Set it to null.")
  if source.get("use_bidirectional_attention"):
    raise ValueError(
        f"Unsupported use_bidirectional_attention=true in {where}: only "
        "causal gemma3_text models are implemented.")
  rope, sliding_rope = _gemma3_ropes(source, where)
  hidden = int(source["hidden_size"])
  softcap = source.get("final_logit_softcapping")
  return dict(
      rope=rope,
      sliding_rope=sliding_rope,
      norm_unit_offset=True,
      qk_norm=True,
      sandwich_norms=True,
      embed_scale=hidden**0.5,
      query_pre_attn_scalar=float(source.get("query_pre_attn_scalar", 256)),
      final_logit_softcapping=None if softcap is None else float(softcap),
  )


def _token_ids(value: Any) -> tuple[int, ...]:
  if value is None:
    return ()
  if isinstance(value, int):
    return (value,)
  return tuple(int(v) for v in value)


def config_from_dict(source: dict[str, Any], where: str = "config") -> LMConfig:
  """Build an LMConfig from a parsed HF config dictionary.

  Args:
    source: the contents of config.json.
    where: a name for error messages, usually the file path.

  Raises:
    ValueError: for an unsupported model_type, rope_type, activation or
      softcapping setting, or a missing required field.
  """
  model_type = source.get("model_type")
  if model_type == "gemma3":
    # The multimodal checkpoint nests the text weights under
    # model.language_model and adds a vision tower, so its tensor names
    # differ from Gemma3ForCausalLM's.
    raise ValueError(
        f"Unsupported model_type 'gemma3' (multimodal Gemma 3) in {where}. "
        "Save the text model alone (Gemma3ForCausalLM, model_type "
        "'gemma3_text') and load that folder.")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(
        f"Unsupported model_type {model_type!r} in {where}; supported types "
        f"are {', '.join(SUPPORTED_MODEL_TYPES)}.")
  is_gemma = model_type == "gemma3_text"
  if is_gemma:
    hidden_act = source.get("hidden_activation", "gelu_pytorch_tanh")
  else:
    hidden_act = source.get("hidden_act", "silu")
  if hidden_act not in SUPPORTED_ACTIVATIONS:
    raise ValueError(
        f"Unsupported activation {hidden_act!r} in {where} for {model_type}; "
        f"implemented: {', '.join(SUPPORTED_ACTIVATIONS)}.")
  try:
    num_heads = int(source["num_attention_heads"])
    hidden = int(source["hidden_size"])
    num_layers = int(source["num_hidden_layers"])
    fields = dict(
        vocab_size=int(source["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(source["intermediate_size"]),
        num_hidden_layers=num_layers,
        rms_norm_eps=float(source["rms_norm_eps"]),
    )
  except KeyError as e:
    raise ValueError(f"Missing required field {e.args[0]!r} in {where}.") from e
  # Gemma3TextConfig defaults head_dim to 256, not hidden // heads.
  head_dim = source.get("head_dim") or (256 if is_gemma else hidden // num_heads)
  if model_type == "qwen2":
    # Qwen2 always has q/k/v biases, whatever `attention_bias` is set to.
    qkv_bias, o_bias = True, False
  else:
    qkv_bias = o_bias = bool(source.get("attention_bias", False))
  sliding_window = source.get("sliding_window")
  layer_types = _layer_types(source, model_type, num_layers)
  if SLIDING_ATTENTION in layer_types and not sliding_window:
    raise ValueError(
        f"{where} has sliding-attention layers but no sliding_window size.")
  if is_gemma:
    fields.update(_gemma3_fields(source, where))
  else:
    fields["rope"] = parse_rope(source, where)
  return LMConfig(
      model_type=model_type,
      num_attention_heads=num_heads,
      num_key_value_heads=int(source.get("num_key_value_heads") or num_heads),
      head_dim=int(head_dim),
      # Gemma3TextConfig ties by default; the Llama family does not.
      tie_word_embeddings=bool(source.get("tie_word_embeddings", is_gemma)),
      qkv_bias=qkv_bias,
      o_bias=o_bias,
      mlp_bias=bool(source.get("mlp_bias", False)),
      hidden_act=hidden_act,
      layer_types=layer_types,
      sliding_window=int(sliding_window) if sliding_window else None,
      max_position_embeddings=int(source.get("max_position_embeddings", 2048)),
      bos_token_id=source.get("bos_token_id"),
      eos_token_ids=_token_ids(source.get("eos_token_id")),
      pad_token_id=source.get("pad_token_id"),
      source=dict(source),
      **fields,
  )


def load_config(model_dir: str | os.PathLike[str]) -> LMConfig:
  """Parse `config.json` in a Hugging Face model folder."""
  if os.path.isfile(model_dir):
    # FileNotFoundError, which the command lines report as a usage error.
    raise FileNotFoundError(
        f"Model folder {model_dir} not found: it is a file. Pass the folder "
        "that contains config.json and the safetensors files.")
  if not os.path.isdir(model_dir):
    raise FileNotFoundError(f"Model folder {model_dir} not found.")
  path = os.path.join(model_dir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"No config.json in {model_dir}: expected a Hugging Face model folder "
        "(config.json, model.safetensors or model.safetensors.index.json, "
        "tokenizer files).")
  try:
    with open(path, encoding="utf-8") as f:
      source = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e}).") from e
  return config_from_dict(source, where=path)
