"""Train-step speed, MFU and memory of X-Fusion beside SmolLM2-135M on CPU.

  python benchmarks/xfusion_train_cpu.py [--batch=8] [--grids=4,7,10] \
      [--caption_tokens=12,48] [--steps=5]

For each image-token grid (patch size 1, so grid x grid image tokens) and
caption length, the script times the jitted train step of the dual-tower
model (loss, gradients and an AdamW update) on random latents and captions.
MFU uses the frozen-aware FLOP count of the training loop against the
float32 matmul peak measured at the start of the same run. Memory is the
size of the frozen weights, the trainable weights and the optimizer state.
"""

from __future__ import annotations

import platform
import statistics
import time

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from xfusion_jax import hostenv
from xfusion_jax import llm
from xfusion_jax.llm import gguf_convert
from xfusion_jax.train import metrics
from xfusion_jax.xfusion import model as model_lib
from xfusion_jax.xfusion import objective
from xfusion_jax.xfusion import sequences
from xfusion_jax.xfusion import task as task_lib

_BATCH = flags.DEFINE_integer("batch", 8, "Examples per step.")
_GRIDS = flags.DEFINE_list("grids", ["4", "7", "10"],
                           "Sides of the latent grid (image tokens = side^2).")
_CAPTION_TOKENS = flags.DEFINE_list("caption_tokens", ["12", "48"],
                                    "Caption budgets in tokens.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps (median).")


def _bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _step_fn(module, tx):
  config = objective.ObjectiveConfig()

  def step(params, opt_state, frozen, batch, rng):
    def loss(p):
      return objective.loss_fn(module, config, p, frozen, batch, rng)[0]
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  return jax.jit(step, donate_argnums=(0, 1))


def _measure(lm, frozen, grid: int, caption_tokens: int, peak: float):
  config = task_lib.add_fields(ml_collections.ConfigDict())
  config.dtype = "float32"
  config.latent_size = (grid, grid)
  config.patch_size = 1
  module = model_lib.XFusion(lm.config, task_lib.xfusion_config(config),
                             frozen_dtype=jnp.float32)
  params = nn.meta.unbox(model_lib.init_trainable(module, frozen,
                                                  jax.random.key(0)))
  tx = optax.adamw(1e-5)
  opt_state = tx.init(params)
  memory = {"trainable": _bytes(params), "optimizer": _bytes(opt_state)}

  tokens_per_image = module.config.tokens_per_image
  seq_len = sequences.sequence_length(caption_tokens, tokens_per_image)
  rng = np.random.default_rng(0)
  captions = [list(rng.integers(100, 40000, caption_tokens - 1))
              for _ in range(_BATCH.value)]
  eos = lm.eos_token_ids()[0]
  batch = sequences.layout_both(captions, tokens_per_image, seq_len, eos,
                                lm.pad_token_id())
  batch["latents"] = rng.standard_normal(
      (_BATCH.value, grid, grid, 4)).astype(np.float32)
  step = _step_fn(module, tx)
  params, opt_state, loss = step(params, opt_state, frozen, batch,
                                 jax.random.key(0))
  jax.block_until_ready(loss)
  times = []
  for i in range(_STEPS.value):
    start = time.perf_counter()
    params, opt_state, loss = step(params, opt_state, frozen, batch,
                                   jax.random.key(i + 1))
    jax.block_until_ready(loss)
    times.append(time.perf_counter() - start)
  seconds = statistics.median(times)
  tokens = int(np.sum(batch["und_valid"]))
  flops = task_lib.flop_count(module, frozen, seq_len).per_token() * tokens
  return {
      "grid": grid, "image_tokens": tokens_per_image,
      "caption_tokens": caption_tokens, "seq_len": seq_len,
      "seconds": seconds, "tokens_per_second": tokens / seconds,
      "mfu": flops / seconds / peak, **memory,
  }


def main(argv):
  del argv
  lm = llm.from_pretrained(gguf_convert.smollm2_135m_instruct(),
                           dtype="float32")
  frozen = model_lib.frozen_from_lm(lm.weights)
  peak = metrics.measure_cpu_flops()
  print(f"Machine: {platform.processor() or platform.machine()}, "
        f"{jax.local_device_count()} JAX CPU device(s); measured float32 "
        f"matmul peak {peak:.3g} FLOP/s; batch {_BATCH.value}; frozen "
        f"weights {_bytes(frozen) / 2**20:.0f} MiB.")
  print("| image tokens | caption tokens | sequence | s/step | tokens/s | "
        "MFU | trainable MiB | optimizer MiB |")
  print("|---|---|---|---|---|---|---|---|")
  for grid in (int(g) for g in _GRIDS.value):
    for caption_tokens in (int(c) for c in _CAPTION_TOKENS.value):
      r = _measure(lm, frozen, grid, caption_tokens, peak)
      print(f"| {r['image_tokens']} | {r['caption_tokens']} | "
            f"{r['seq_len']} | {r['seconds']:.2f} | "
            f"{r['tokens_per_second']:.0f} | {100 * r['mfu']:.0f}% | "
            f"{r['trainable'] / 2**20:.0f} | {r['optimizer'] / 2**20:.0f} |",
            flush=True)


if __name__ == "__main__":
  hostenv.restart_with_hugepage_malloc()
  app.run(main)
