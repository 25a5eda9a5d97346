"""Command line for the frozen-LLM core.

  python -m xfusion_jax.llm generate --prompt="..." [--model=DIR]
  python -m xfusion_jax.llm convert_gguf --gguf=FILE --out=DIR
  python -m xfusion_jax.llm export --model=DIR --out=DIR

Without --model, `generate` uses SmolLM2-135M-Instruct, converted once from
the pinned GGUF on PyPI into the asset cache.
"""

from __future__ import annotations

import sys
import time

from absl import app
from absl import flags
from absl import logging

from xfusion_jax import hostenv

COMMANDS = ("generate", "convert_gguf", "export")

_MODEL = flags.DEFINE_string(
    "model", None,
    "Hugging Face model folder; default: the cached SmolLM2-135M-Instruct.")
_PROMPT = flags.DEFINE_multi_string(
    "prompt", ["What is the capital of France?"],
    "Prompt text; repeat the flag for a batch of prompts.")
_CHAT = flags.DEFINE_bool(
    "chat", True, "Wrap each prompt in the tokenizer's chat template.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 64,
                                       "Maximum number of generated tokens.")
_TEMPERATURE = flags.DEFINE_float(
    "temperature", 0.0, "Sampling temperature; 0 means greedy decoding.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Top-k filter; 0 disables it.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus mass; 1 disables it.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed for sampling.")
_DTYPE = flags.DEFINE_string(
    "dtype", "float32",
    "Weight and compute dtype, e.g. float32 or bfloat16. float32 is the "
    "default here because CPUs without native bf16 run it faster.")
_GGUF = flags.DEFINE_string("gguf", None, "GGUF file to convert.")
_OUT = flags.DEFINE_string("out", None, "Output folder.")
_MAX_SHARD_SIZE = flags.DEFINE_string(
    "max_shard_size", "5GB", "Largest safetensors file written by export.")


def _model_dir() -> str:
  if _MODEL.value:
    return _MODEL.value
  from xfusion_jax.llm import gguf_convert  # pylint: disable=g-import-not-at-top
  return str(gguf_convert.smollm2_135m_instruct())


def _generate() -> None:
  from xfusion_jax import llm  # pylint: disable=g-import-not-at-top
  if _MAX_NEW_TOKENS.value < 1:
    raise app.UsageError(
        f"--max_new_tokens must be >= 1, got {_MAX_NEW_TOKENS.value}.")
  if not all(p.strip() for p in _PROMPT.value):
    raise app.UsageError("--prompt must not be empty.")
  lm = llm.from_pretrained(_model_dir(), dtype=_DTYPE.value)
  input_ids, mask = lm.encode_prompts(_PROMPT.value, chat=_CHAT.value)
  start = time.perf_counter()
  tokens = lm.generate(
      input_ids, mask, max_new_tokens=_MAX_NEW_TOKENS.value,
      temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
      seed=_SEED.value)
  elapsed = time.perf_counter() - start
  for prompt, completion in zip(_PROMPT.value, lm.decode_tokens(tokens)):
    print(f">>> {prompt}\n{completion}\n")
  logging.info("Generated %d prompts x up to %d tokens in %.1f s "
               "(compilation included).", tokens.shape[0], tokens.shape[1],
               elapsed)


def _require(flag: flags.FlagHolder, command: str) -> str:
  if not flag.value:
    raise app.UsageError(f"{command} requires --{flag.name}.")
  return flag.value


def _convert_gguf() -> None:
  from xfusion_jax.llm import gguf_convert  # pylint: disable=g-import-not-at-top
  out = gguf_convert.convert(_require(_GGUF, "convert_gguf"),
                             _require(_OUT, "convert_gguf"))
  print(out)


def _export() -> None:
  from xfusion_jax import llm  # pylint: disable=g-import-not-at-top
  out = _require(_OUT, "export")
  lm = llm.from_pretrained(_model_dir(), dtype=_DTYPE.value)
  llm.save_pretrained(lm, out, max_shard_size=_MAX_SHARD_SIZE.value)
  print(out)


def main(argv: list[str]) -> None:
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(
        f"Expected one command out of {', '.join(COMMANDS)}; got {argv[1:]}.")
  command = {"generate": _generate, "convert_gguf": _convert_gguf,
             "export": _export}[argv[1]]
  try:
    command()
  except (ValueError, FileNotFoundError) as e:
    # Bad input: the message names the file, tensor or flag, so a traceback
    # would only hide it.
    sys.exit(f"error: {e}")


def run() -> None:
  hostenv.restart_with_hugepage_malloc()
  app.run(main, argv=sys.argv)
