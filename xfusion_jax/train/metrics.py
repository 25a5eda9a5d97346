"""Training metrics: peak FLOP/s for MFU, TensorBoard and text logs, samples."""

from __future__ import annotations

import json
import os
import pathlib
import time
from typing import Any, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import tensorboardX

# Dense bf16 peak FLOP/s per JAX device, matched as a prefix of
# `device.device_kind`. Sources: Google Cloud TPU and NVIDIA data sheets.
# On TPU v2 and v3 a JAX device is one TensorCore (half a chip).
PEAK_BF16_FLOPS = (
    ("TPU v2", 22.5e12),
    ("TPU v3", 61.5e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12),
    ("TPU v6e", 918e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100", 989e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA A100", 312e12),
    # NOTE: the L4 and A10 figures are the data sheets' dense numbers (the
    # sheets lead with the sparse ones); not checked on hardware.
    ("NVIDIA L4", 121e12),
    ("NVIDIA A10", 125e12),
)


def measure_cpu_flops(sizes: tuple[int, ...] = (1024, 2048),
                      repeats: int = 10) -> float:
  """Measure this host's float32 matmul FLOP/s on its first CPU device.

  The best of `repeats` timed runs of a jitted square matmul of each size,
  after a compile-and-warm-up run. One size with few runs read up to 20%
  low on a 2-core machine, which would inflate every MFU computed against
  this figure.
  """
  device = jax.devices("cpu")[0]
  matmul = jax.jit(lambda x: x @ x)
  best = 0.0
  for size in sizes:
    matrix = jax.device_put(jnp.ones((size, size), jnp.float32), device)
    matmul(matrix).block_until_ready()
    for _ in range(repeats):
      start = time.perf_counter()
      matmul(matrix).block_until_ready()
      best = max(best, 2 * size**3 / (time.perf_counter() - start))
  return best


def peak_flops_per_second() -> float | None:
  """Return the summed peak FLOP/s of all devices, or None if unknown.

  On CPU the figure is measured at start-up. All CPU devices of one process
  share the host's cores, so the measured figure counts once per process,
  not once per device.
  """
  device = jax.devices()[0]
  if device.platform == "cpu":
    per_process = measure_cpu_flops()
    logging.info("Measured CPU peak: %.3g float32 FLOP/s per process "
                 "(best square matmul of 1024 and 2048).", per_process)
    return per_process * jax.process_count()
  for prefix, flops in PEAK_BF16_FLOPS:
    if device.device_kind.startswith(prefix):
      logging.info("Peak of %s: %.3g bf16 FLOP/s per device (table value).",
                   device.device_kind, flops)
      return flops * jax.device_count()
  logging.warning("No peak FLOP/s known for device kind %r; MFU is not "
                  "reported.", device.device_kind)
  return None


class MetricWriter:
  """Writes scalars, images and text to TensorBoard and the workdir.

  Only process 0 writes; other processes' calls do nothing. Scalars also go
  to `metrics.jsonl`, one JSON object per step.
  """

  def __init__(self, workdir: str | os.PathLike[str]):
    self._enabled = jax.process_index() == 0
    self._workdir = pathlib.Path(workdir)
    self._samples_dir = self._workdir / "samples"
    self._writer = None
    self._jsonl = None
    if self._enabled:
      self._writer = tensorboardX.SummaryWriter(
          str(self._workdir / "tensorboard"))
      self._jsonl = open(self._workdir / "metrics.jsonl", "a",
                         encoding="utf-8")

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self._enabled:
      return
    for name, value in scalars.items():
      self._writer.add_scalar(name, value, step)
    self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self._jsonl.flush()

  def write_samples(self, step: int, samples: Mapping[str, Any]) -> None:
    """Write PNG images (uint8 HWC arrays) and texts returned by a task.

    Raises:
      ValueError: for a value that is neither a string nor a uint8 image.
    """
    if not self._enabled:
      return
    self._samples_dir.mkdir(parents=True, exist_ok=True)
    for name, value in samples.items():
      tag = f"samples/{name}"
      if isinstance(value, str):
        self._writer.add_text(tag, value, step)
        with open(self._samples_dir / f"{name}.txt", "a",
                  encoding="utf-8") as f:
          f.write(f"step {step}:\n{value}\n\n")
        continue
      image = np.asarray(value)
      if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (
          1, 3, 4):
        raise ValueError(
            f"Sample {name!r} must be a string or a uint8 HWC image with 1, 3 "
            f"or 4 channels; got dtype {image.dtype}, shape {image.shape}.")
      Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image
                     ).save(self._samples_dir / f"{name}_{step:08d}.png")
      self._writer.add_image(tag, image, step, dataformats="HWC")
    self._writer.flush()

  def flush(self) -> None:
    if self._enabled:
      self._writer.flush()

  def close(self) -> None:
    if self._enabled:
      self._writer.close()
      self._jsonl.close()
