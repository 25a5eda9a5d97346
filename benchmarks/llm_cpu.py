"""Prefill and decode throughput of xfusion_jax against transformers (PyTorch).

Both run the same SmolLM2-135M-Instruct weights in float32 on the CPU, each
in its own process (so that neither library's idle thread pool competes with
the other's work). Compilation (JAX) and a warm-up call (both) are excluded
from the timings.

Batch-1 decoding reads every weight once per token, so it is bound by
memory bandwidth. The script also times a float32 matrix-vector product
over a matrix far larger than the CPU caches and prints the decode rate
that this bandwidth allows: the weights' bytes per token over bytes/s.

  python benchmarks/llm_cpu.py [--prompt_tokens=256] [--new_tokens=128]
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags
import numpy as np

_PROMPT_TOKENS = flags.DEFINE_integer("prompt_tokens", 256,
                                      "Prompt length for the prefill timing.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 128,
                                   "Generated tokens for the decode timing.")
_BATCH = flags.DEFINE_integer("batch", 1, "Sequences per call.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions (median).")
_LIBRARY = flags.DEFINE_enum(
    "library", None, ["jax", "torch"],
    "Measure one library and print its figures as JSON; unset runs both in "
    "subprocesses and prints the comparison.")


def _median_seconds(fn, repeats: int) -> float:
  fn()  # warm-up (and compilation for JAX)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _prompts():
  rng = np.random.default_rng(0)
  prompt = rng.integers(100, 40000,
                        (_BATCH.value, _PROMPT_TOKENS.value)).astype(np.int32)
  return prompt, prompt[:, :16]


def _matvec_bytes_per_second() -> float:
  """Time XLA's float32 matrix-vector product and return bytes read per s."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  matrix = jnp.ones((4096, 16384), jnp.float32)  # 256 MiB
  vector = jnp.ones((1, 4096), jnp.float32)
  product = jax.jit(jnp.matmul)
  seconds = _median_seconds(
      lambda: product(vector, matrix).block_until_ready(), 10)
  return matrix.nbytes / seconds


def _measure_jax(model_dir) -> dict[str, float]:
  import jax  # pylint: disable=g-import-not-at-top
  from xfusion_jax import llm  # pylint: disable=g-import-not-at-top

  prompt, short_prompt = _prompts()
  lm = llm.from_pretrained(model_dir, dtype="float32")
  # A token id outside the vocabulary never matches, so no row stops early.
  lm.generation_config = {"eos_token_id": [-1], "pad_token_id": 0}

  def prefill():
    lm.logits(prompt).block_until_ready()

  def decode():
    lm.generate(short_prompt, max_new_tokens=_NEW_TOKENS.value)

  # Each token reads every weight once. The one exception is an untied
  # embedding table, of which a token reads a single row.
  weight_bytes = sum(x.nbytes for x in jax.tree.leaves(lm.weights))
  if not lm.config.tie_word_embeddings:
    weight_bytes -= lm.weights["model"]["embed_tokens"].nbytes
  return {"prefill": _median_seconds(prefill, _REPEATS.value),
          "decode": _median_seconds(decode, _REPEATS.value),
          "weight_bytes": weight_bytes,
          "bandwidth": _matvec_bytes_per_second()}


def _measure_torch(model_dir) -> dict[str, float]:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  prompt, short_prompt = _prompts()
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      model_dir, dtype=torch.float32).eval()

  def prefill():
    with torch.no_grad():
      hf(torch.as_tensor(prompt, dtype=torch.long))

  def decode():
    with torch.no_grad():
      hf.generate(torch.as_tensor(short_prompt, dtype=torch.long),
                  max_new_tokens=_NEW_TOKENS.value,
                  min_new_tokens=_NEW_TOKENS.value, do_sample=False,
                  pad_token_id=0)

  return {"prefill": _median_seconds(prefill, _REPEATS.value),
          "decode": _median_seconds(decode, _REPEATS.value)}


def _run_library(library: str) -> dict[str, float]:
  command = [sys.executable, __file__, f"--library={library}",
             f"--prompt_tokens={_PROMPT_TOKENS.value}",
             f"--new_tokens={_NEW_TOKENS.value}", f"--batch={_BATCH.value}",
             f"--repeats={_REPEATS.value}"]
  output = subprocess.run(command, check=True, capture_output=True,
                          text=True).stdout
  return json.loads(output.strip().splitlines()[-1])


def main(argv):
  del argv
  from xfusion_jax.llm import gguf_convert  # pylint: disable=g-import-not-at-top

  model_dir = gguf_convert.smollm2_135m_instruct()
  if _LIBRARY.value == "jax":
    print(json.dumps(_measure_jax(model_dir)))
    return
  if _LIBRARY.value == "torch":
    print(json.dumps(_measure_torch(model_dir)))
    return
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  seconds = {"jax": _run_library("jax"), "torch": _run_library("torch")}
  tokens = {"prefill": _BATCH.value * _PROMPT_TOKENS.value,
            "decode": _BATCH.value * _NEW_TOKENS.value}
  print(f"machine: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs; jax {jax.__version__}, torch "
        f"{torch.__version__}, transformers {transformers.__version__}")
  print(f"batch {_BATCH.value}, prefill {_PROMPT_TOKENS.value} tokens, decode "
        f"{_NEW_TOKENS.value} tokens after a 16-token prompt, float32")
  print("| phase | xfusion_jax tokens/s | transformers tokens/s | ratio |")
  print("|---|---|---|---|")
  for phase in ("prefill", "decode"):
    ours = tokens[phase] / seconds["jax"][phase]
    theirs = tokens[phase] / seconds["torch"][phase]
    print(f"| {phase} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f}x |")
  bandwidth = seconds["jax"]["bandwidth"]
  weight_bytes = seconds["jax"]["weight_bytes"]
  print(f"memory bound on decode: {weight_bytes / 1e6:.0f} MB of weights per "
        f"token at {bandwidth / 1e9:.1f} GB/s (float32 matrix-vector "
        f"product) allow {_BATCH.value * bandwidth / weight_bytes:.1f} "
        "tokens/s")


if __name__ == "__main__":
  # The library's command lines start this way, and the subprocesses of
  # both libraries inherit the environment.
  from xfusion_jax import hostenv  # pylint: disable=g-import-not-at-top
  hostenv.restart_with_hugepage_malloc()
  app.run(main)
