"""Tiny random Hugging Face causal LMs built by transformers, for parity tests."""

from __future__ import annotations

import pathlib
import shutil

import torch
import transformers

SEQ_LEN = 40


def tiny_config(model_type: str = "llama", **overrides):
  """A small config of `model_type`: 8 query heads of dim 8, 2 layers."""
  fields = dict(
      vocab_size=128,
      hidden_size=64,
      intermediate_size=96,
      num_hidden_layers=2,
      num_attention_heads=8,
      num_key_value_heads=2,
      max_position_embeddings=256,
      rms_norm_eps=1e-5,
      tie_word_embeddings=False,
      bos_token_id=1,
      eos_token_id=2,
      pad_token_id=0,
  )
  fields.update(overrides)
  config_cls = {
      "llama": transformers.LlamaConfig,
      "mistral": transformers.MistralConfig,
      "qwen2": transformers.Qwen2Config,
      "gemma3_text": transformers.Gemma3TextConfig,
  }[model_type]
  return config_cls(**fields)


def tiny_gemma3_config(**overrides):
  """A small Gemma 3 text config: global layer 3 of 4, window 8 < SEQ_LEN.

  head_dim (16) differs from hidden_size // heads (8) and
  query_pre_attn_scalar (24) differs from head_dim, so neither can stand in
  for the other unnoticed.
  """
  fields = dict(
      head_dim=16,
      num_hidden_layers=4,
      layer_types=["sliding_attention", "sliding_attention", "full_attention",
                   "sliding_attention"],
      sliding_window=8,
      query_pre_attn_scalar=24,
      rms_norm_eps=1e-6,
      tie_word_embeddings=True,
      bos_token_id=2,
      eos_token_id=1,
      pad_token_id=0,
  )
  fields.update(overrides)
  return tiny_config("gemma3_text", **fields)


def build_model(config, seed: int = 0) -> transformers.PreTrainedModel:
  """Instantiate a model with every weight random, norms and biases included.

  transformers initializes norm weights to 1 and biases to 0, which would
  hide a swapped or missing norm or bias in the conversion.
  """
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(
      config, dtype=torch.float32, attn_implementation="eager")
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name.endswith("norm.weight"):
        param.copy_(1.0 + 0.2 * torch.randn_like(param))
      elif name.endswith(".bias"):
        param.copy_(0.5 * torch.randn_like(param))
  return model.eval()


def save_model(model, path: pathlib.Path, max_shard_size: str | None = None):
  kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
  model.save_pretrained(path, **kwargs)
  return path


def reference_logits(model, input_ids, attention_mask=None):
  with torch.no_grad():
    out = model(
        input_ids=torch.as_tensor(input_ids),
        attention_mask=None if attention_mask is None else
        torch.as_tensor(attention_mask))
  return out.logits.float().numpy()


def save_tiny_llama_with_smollm2_tokenizer(path: pathlib.Path) -> pathlib.Path:
  """A tiny random Llama with SmolLM2's real tokenizer and vocabulary."""
  from xfusion_jax.llm import gguf_convert  # pylint: disable=g-import-not-at-top
  smollm2 = gguf_convert.smollm2_135m_instruct()
  model = build_model(
      tiny_config("llama", vocab_size=49152, eos_token_id=2, pad_token_id=2,
                  bos_token_id=1))
  path = save_model(model, path)
  for name in ("tokenizer.json", "tokenizer_config.json",
               "chat_template.jinja"):
    if (smollm2 / name).exists():
      shutil.copy(smollm2 / name, path / name)
  return path
