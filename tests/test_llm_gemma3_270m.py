"""The real Gemma-3-270M base model, converted from its PyPI GGUF chunks."""

import gc

import numpy as np
import pytest
import safetensors
import torch
import transformers

from xfusion_jax import assets
from xfusion_jax import llm
from xfusion_jax.llm import gguf_convert

# A base model continues a pattern: one example sentence, then the prompt.
PROMPT = "北京是中国的政治中心。\n上海是"
CONTINUATION = "中国的经济中心。"


@pytest.fixture(name="gemma_dir", scope="module")
def fixture_gemma_dir():
  return gguf_convert.gemma3_270m()


@pytest.fixture(name="gemma", scope="module")
def fixture_gemma(gemma_dir):
  return llm.from_pretrained(gemma_dir, dtype="float32")


def test_converted_config(gemma):
  config = gemma.config
  assert config.model_type == "gemma3_text"
  assert (config.num_hidden_layers, config.hidden_size,
          config.num_attention_heads, config.num_key_value_heads,
          config.head_dim, config.vocab_size) == (18, 640, 4, 1, 256, 262144)
  assert config.sliding_window == 512
  full_layers = [i for i, t in enumerate(config.layer_types)
                 if t == "full_attention"]
  assert full_layers == [5, 11, 17]
  assert (config.rope.theta, config.sliding_rope.theta) == (1e6, 1e4)
  assert config.attention_scale == 256**-0.5
  assert config.tie_word_embeddings
  assert (config.bos_token_id, config.eos_token_ids, config.pad_token_id) == (
      2, (1,), 0)


def test_conversion_matches_transformers_gguf_loader(gemma_dir):
  """Our dequantization and norm offset equal transformers' own."""
  gguf_path = assets.cache_dir() / assets.GEMMA3_270M_GGUF
  reference = transformers.AutoModelForCausalLM.from_pretrained(
      str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
  expected = reference.state_dict()
  del reference
  # The tied lm_head.weight of the reference is the embedding matrix.
  expected.pop("lm_head.weight")
  with safetensors.safe_open(gemma_dir / "model.safetensors", "pt") as f:
    assert set(f.keys()) == set(expected)
    for name in f.keys():
      assert torch.equal(f.get_tensor(name), expected[name]), name
  del expected
  gc.collect()


def test_few_shot_continuation(gemma):
  input_ids, mask = gemma.encode_prompts([PROMPT])
  assert input_ids[0, 0] == 2, "the tokenizer must add BOS"
  tokens = gemma.generate(input_ids, mask, max_new_tokens=4)
  assert tokens[0].tolist() == [110323, 27353, 20634, 236924]
  assert gemma.decode_tokens(tokens) == [CONTINUATION]


def test_greedy_continuation_matches_transformers(gemma, gemma_dir):
  prompts = [PROMPT, "The capital of France is"]
  input_ids, mask = gemma.encode_prompts(prompts)
  new_tokens = 24
  ours = gemma.generate(input_ids, mask, max_new_tokens=new_tokens)
  reference_model = transformers.AutoModelForCausalLM.from_pretrained(
      gemma_dir, dtype=torch.float32).eval()
  with torch.no_grad():
    reference = reference_model.generate(
        torch.as_tensor(input_ids, dtype=torch.long),
        attention_mask=torch.as_tensor(mask), max_new_tokens=new_tokens,
        do_sample=False)[:, input_ids.shape[1]:].numpy()
  for row in range(len(prompts)):
    expected = list(reference[row])
    if 1 in expected:
      expected = expected[:expected.index(1) + 1]
    assert list(ours[row][:len(expected)]) == expected, prompts[row]
