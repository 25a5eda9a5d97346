"""Compile the X-Fusion train step for a TPU slice on a machine without TPUs.

    python -m xfusion_jax.aot --config=configs/tpu_v4.py --topology=v4-32 \
        --model=llama-3.1-8b

libtpu (the `tpu` extra) describes the slice's chips, and XLA compiles the
real train step for them from abstract inputs: no weights, data or TPU are
needed. The command prints per-chip memory against the chip's HBM, XLA's
FLOP and byte counts and a roofline bound on the step time. It exits with
status 1 when the step does not fit in HBM.

Only the "xfusion" task is supported.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

# libtpu reads these when it loads. Without them it queries the GCE metadata
# server for the accelerator type and worker addresses; here it only
# describes chips and never runs on them.
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
# libtpu holds /tmp/libtpu_lockfile so that two processes never share a
# chip. Compiling uses no chip, so parallel compiles (and tests) may share.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# The host's own arrays (RNG keys) stay on the CPU backend.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
import flax.linen as nn
import jax
from jax.experimental import topologies
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np

from xfusion_jax import sharding as sharding_lib
from xfusion_jax.llm import config as lm_config_lib
from xfusion_jax.llm import model as lm_model
from xfusion_jax.train import loop
from xfusion_jax.train.task import Batch, PyTree
from xfusion_jax.xfusion import model as model_lib
from xfusion_jax.xfusion import sequences
from xfusion_jax.xfusion import task as xfusion_task

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Topology:
  """A TPU slice: libtpu's topology arguments and per-chip peak figures.

  Attributes:
    name: the Cloud TPU accelerator type ("v4-32": 32 TensorCores).
    libtpu_name: libtpu's "generation:XxYxZ" chip grid.
    chip_config: "megacore" fuses a v4 chip's two TensorCores into one JAX
      device, as on real v4 slices.
    wrap: whether each grid axis is a torus ring (full 4-chip axes of v4).
    hbm_bytes: HBM per chip.
    peak_flops: dense bf16 FLOP/s per chip.
    hbm_bandwidth: HBM bytes/s per chip.
  """

  name: str
  libtpu_name: str
  chip_config: str
  wrap: tuple[bool, bool, bool]
  hbm_bytes: int
  peak_flops: float
  hbm_bandwidth: float

  @property
  def chips(self) -> int:
    return int(np.prod([int(d) for d in self.libtpu_name.split(":")[1]
                        .split("x")]))


# NOTE: per-chip HBM, peak bf16 FLOP/s and HBM bandwidth as Google Cloud
# lists them for TPU v4 and v5e. They were not checked against its pages.
_V4 = dict(chip_config="megacore", hbm_bytes=32 * GIB, peak_flops=275e12,
           hbm_bandwidth=1.2e12)
_V5E = dict(chip_config="default", hbm_bytes=16 * GIB, peak_flops=197e12,
            hbm_bandwidth=819e9)
TOPOLOGIES = {
    t.name: t for t in (
        Topology("v4-8", "v4:2x2x1", wrap=(False, False, False), **_V4),
        Topology("v4-16", "v4:2x2x2", wrap=(False, False, False), **_V4),
        Topology("v4-32", "v4:2x2x4", wrap=(False, False, True), **_V4),
        Topology("v4-128", "v4:4x4x4", wrap=(True, True, True), **_V4),
        Topology("v5e-16", "v5e:4x4", wrap=(False, False, False), **_V5E),
    )
}

# Architecture fields of the public Hugging Face config.json files; only the
# shapes matter, since no weights are loaded.
LLAMA_3_2_1B = {
    "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048,
    "intermediate_size": 8192, "num_hidden_layers": 16,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0,
                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "max_position_embeddings": 131072, "tie_word_embeddings": True,
    "hidden_act": "silu", "bos_token_id": 128000, "eos_token_id": 128001,
}
LLAMA_3_1_8B = {
    "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "max_position_embeddings": 131072, "tie_word_embeddings": False,
    "hidden_act": "silu", "bos_token_id": 128000, "eos_token_id": 128001,
}
# A two-layer Llama for tests: compiles in seconds.
TINY_LLAMA = {
    "model_type": "llama", "vocab_size": 256, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "hidden_act": "silu",
    "bos_token_id": 1, "eos_token_id": 2,
}
MODELS = {"llama-3.2-1b": LLAMA_3_2_1B, "llama-3.1-8b": LLAMA_3_1_8B,
          "tiny-llama": TINY_LLAMA}


def topology_devices(topology: Topology) -> list[jax.Device]:
  """Return libtpu's compile-only devices for `topology`, one per chip."""
  description = topologies.get_topology_desc(
      topology.libtpu_name, "tpu", chip_config_name=topology.chip_config,
      chips_per_host_bounds=(2, 2, 1), num_slices=1, wrap=list(topology.wrap))
  devices = list(description.devices)
  if len(devices) != topology.chips:
    raise RuntimeError(
        f"libtpu described {len(devices)} devices for {topology.name}, "
        f"expected {topology.chips} chips.")
  return devices


class AbstractXFusionTask(xfusion_task.XFusionTask):
  """The X-Fusion task with shape-only frozen weights and no data.

  It supports what compiling the train step needs (`frozen`,
  `init_trainable`, `loss_fn`, `flop_count`) and nothing that reads data.
  """

  def __init__(self, config: ml_collections.ConfigDict,
               lm_config: lm_config_lib.LMConfig,
               mesh: jax.sharding.Mesh):
    # XFusionTask.__init__ loads weights and reads the dataset, so it is not
    # called.
    # pylint: disable=super-init-not-called
    self._config = config
    dtype = jnp.dtype(config.dtype)
    self.frozen = model_lib.frozen_from_lm(
        abstract_lm_weights(lm_config, dtype, mesh))
    self.frozen_source = {"path": "", "weights_sha256": ""}
    self.module = model_lib.XFusion(lm_config,
                                    xfusion_task.xfusion_config(config),
                                    frozen_dtype=dtype)
    self.objective = xfusion_task.objective_config(config)
    if self.objective.lambda_align > 0:
      # NOTE: the alignment projector's width comes from the stored encoder
      # features of a latent dataset, which an abstract compile has not got.
      raise ValueError(
          f"config.lambda_align={config.lambda_align}: AOT compilation "
          "supports alignment off only; pass --config.lambda_align=0.")
    self.aligned = False
    self.projector = None
    self.feature_grid = None
    self.eos_id = lm_config.eos_token_ids[0]
    self.pad_id = lm_config.eos_token_ids[0]
    self.seq_len = sequences.sequence_length(
        config.max_caption_tokens, self.module.config.tokens_per_image)

  def init_trainable(self, rng: jax.Array) -> PyTree:
    # Vision blocks start as copies of the frozen layers. Zeros of the same
    # shapes stand in for them; the loop only traces this function.
    frozen = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), self.frozen)
    return model_lib.init_trainable(self.module, frozen, rng)

  def abstract_batch(self, batch_size: int,
                     sharding: jax.sharding.Sharding) -> Batch:
    """Return the shapes and dtypes of a global batch of `batch_size` rows."""
    caption = [self.eos_id] * self._config.max_caption_tokens
    arrays = sequences.layout_both([caption],
                                   self.module.config.tokens_per_image,
                                   self.seq_len, self.eos_id, self.pad_id)
    arrays["latents"] = np.zeros(
        (1, *self.module.config.latent_size,
         self.module.config.latent_channels), np.float32)
    return {
        name: jax.ShapeDtypeStruct((batch_size, *value.shape[1:]),
                                   value.dtype, sharding=sharding)
        for name, value in arrays.items()
    }


def abstract_lm_weights(lm_config: lm_config_lib.LMConfig, dtype: Any,
                        mesh: jax.sharding.Mesh) -> PyTree:
  """Return the LLM's weights as sharded `jax.ShapeDtypeStruct`s."""
  module = lm_model.CausalLM(lm_config, dtype=dtype, param_dtype=dtype)
  ids = jnp.zeros((1, 1), jnp.int32)
  boxed = jax.eval_shape(
      lambda: module.init(jax.random.key(0), ids, ids, ids.astype(bool))
  )[lm_model.FROZEN]
  shardings = sharding_lib.logical_shardings(boxed, mesh)
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      nn.meta.unbox(boxed), shardings)


class StepDoesNotFitError(RuntimeError):
  """XLA could not fit the compiled step in one chip's HBM."""


@dataclasses.dataclass
class CompileReport:
  """Per-chip figures of one compiled train step."""

  topology: Topology
  mesh_shape: dict[str, int]
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  flops: float
  bytes_accessed: float
  model_flops_per_chip: float

  @property
  def peak_bytes(self) -> int:
    # Donated state buffers are counted in both arguments and outputs.
    return (self.argument_bytes + self.output_bytes - self.alias_bytes +
            self.temp_bytes)

  @property
  def fits(self) -> bool:
    return self.peak_bytes <= self.topology.hbm_bytes

  @property
  def roofline_seconds(self) -> float:
    """Lower bound on the step time, compute- or HBM-bound.

    NOTE: XLA's cost analysis counts the body of a while loop once, so with
    layers under `nn.scan` its FLOPs and bytes cover one layer. The compute
    bound therefore also uses the frozen-aware model FLOPs, and the HBM
    bound is too low by up to the layer count. Collectives are ignored.
    """
    flops = max(self.flops, self.model_flops_per_chip)
    return max(flops / self.topology.peak_flops,
               self.bytes_accessed / self.topology.hbm_bandwidth)

  @property
  def roofline_mfu(self) -> float:
    """Frozen-aware model FLOPs over peak FLOPs at the roofline step time."""
    return self.model_flops_per_chip / (self.roofline_seconds *
                                        self.topology.peak_flops)

  def format(self) -> str:
    t = self.topology
    lines = [
        f"topology {t.name}: {t.chips} chips, mesh {self.mesh_shape}",
        "per-chip memory:",
        f"  arguments   {self.argument_bytes / GIB:8.2f} GiB",
        f"  outputs     {self.output_bytes / GIB:8.2f} GiB "
        f"({self.alias_bytes / GIB:.2f} GiB aliased to donated arguments)",
        f"  temporaries {self.temp_bytes / GIB:8.2f} GiB",
        f"  total       {self.peak_bytes / GIB:8.2f} GiB of "
        f"{t.hbm_bytes / GIB:.0f} GiB HBM",
        f"XLA cost per chip: {self.flops:.4g} FLOPs, "
        f"{self.bytes_accessed:.4g} bytes accessed",
        f"roofline step time >= {self.roofline_seconds * 1e3:.1f} ms "
        f"(peak {t.peak_flops / 1e12:.0f} TFLOP/s, "
        f"{t.hbm_bandwidth / 1e9:.0f} GB/s per chip)",
        f"frozen-aware model FLOPs per chip: {self.model_flops_per_chip:.4g}; "
        f"MFU at the roofline time: {self.roofline_mfu:.1%}",
    ]
    return "\n".join(lines)


def compile_step(config: ml_collections.ConfigDict,
                 lm_config: lm_config_lib.LMConfig, topology: Topology,
                 devices: list[jax.Device] | None = None
                 ) -> tuple[jax.stages.Compiled, CompileReport]:
  """Compile the X-Fusion train step of `config` for `topology`.

  Args:
    config: an X-Fusion training config; `batch_size` is the global batch.
    lm_config: the frozen LLM's architecture.
    topology: the TPU slice, whose peak figures the report uses.
    devices: the devices to compile for (default: libtpu's description of
      `topology`).

  Raises:
    ValueError: if `config.task` is not "xfusion".
  """
  if config.task != "xfusion":
    raise ValueError(
        f"config.task={config.task!r}: ahead-of-time compilation supports "
        "only the 'xfusion' task.")
  devices = devices or topology_devices(topology)
  mesh = sharding_lib.make_mesh(dict(config.mesh), devices)
  batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if config.batch_size % batch_shards:
    raise ValueError(
        f"config.batch_size={config.batch_size} is not divisible by the "
        f"{batch_shards} batch shards of mesh {dict(mesh.shape)}; pass a "
        f"--batch_size that is a multiple of {batch_shards}.")
  task = AbstractXFusionTask(config, lm_config, mesh)
  program = loop.build_program(config, task, mesh)
  batch = task.abstract_batch(config.batch_size, program.batch_sharding)
  try:
    compiled = program.lower_train_step(batch).compile()
  except jax.errors.JaxRuntimeError as e:
    # XLA's TPU compiler rejects a program whose buffers exceed HBM.
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    raise StepDoesNotFitError(
        f"The step for global batch {config.batch_size} does not fit the "
        f"HBM of one {topology.name} chip: {e}. Use a larger slice, a "
        "smaller --batch_size or a remat policy that saves fewer "
        "activations.") from e

  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  # Older JAX returns one dict per computation.
  if isinstance(cost, list):
    cost = cost[0]
  tokens = config.batch_size * task.seq_len
  model_flops = task.flop_count().per_token() * tokens / len(devices)
  report = CompileReport(
      topology=topology, mesh_shape=dict(mesh.shape),
      argument_bytes=memory.argument_size_in_bytes,
      output_bytes=memory.output_size_in_bytes,
      alias_bytes=memory.alias_size_in_bytes,
      temp_bytes=memory.temp_size_in_bytes,
      flops=float(cost.get("flops", 0.0)),
      bytes_accessed=float(cost.get("bytes accessed", 0.0)),
      model_flops_per_chip=model_flops)
  return compiled, report


def sharding_summary(config: ml_collections.ConfigDict,
                     lm_config: lm_config_lib.LMConfig,
                     devices: list[jax.Device]) -> str:
  """Return one line per trainable leaf: its path and PartitionSpec."""
  mesh = sharding_lib.make_mesh(dict(config.mesh), devices)
  task = AbstractXFusionTask(config, lm_config, mesh)
  program = loop.build_program(config, task, mesh)
  flat = jax.tree_util.tree_flatten_with_path(
      program.abstract_state.params)[0]
  lines = [f"mesh {dict(mesh.shape)}"]
  for path, leaf in flat:
    lines.append(f"{jax.tree_util.keystr(path, simple=True, separator='/')} "
                 f"{tuple(leaf.shape)} {leaf.sharding.spec}")
  return "\n".join(lines) + "\n"


_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "X-Fusion training config file.", lock_config=True)
_TOPOLOGY = flags.DEFINE_enum("topology", "v4-32", sorted(TOPOLOGIES),
                              "TPU slice to compile for.")
_MODEL = flags.DEFINE_enum("model", "llama-3.2-1b", sorted(MODELS),
                           "Architecture of the frozen LLM.")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", None, "Global batch in examples (default: the config's).")


def main(argv: list[str]) -> None:
  del argv
  config = _CONFIG.value
  if _BATCH_SIZE.value:
    config = config.unlock()
    config.batch_size = _BATCH_SIZE.value
  lm_config = lm_config_lib.config_from_dict(MODELS[_MODEL.value],
                                             _MODEL.value)
  topology = TOPOLOGIES[_TOPOLOGY.value]
  print(f"Compiling the {config.task} step for {_MODEL.value} on "
        f"{topology.name}, global batch {config.batch_size} examples.")
  try:
    _, report = compile_step(config, lm_config, topology)
  except StepDoesNotFitError as e:
    sys.exit(str(e))
  print(report.format())
  if not report.fits:
    sys.exit(
        f"The step needs {report.peak_bytes / GIB:.2f} GiB per chip, more than "
        f"the {topology.hbm_bytes / GIB:.0f} GiB HBM of {topology.name}. Use "
        "a larger slice, a smaller --batch_size or a remat policy that saves "
        "fewer activations.")


if __name__ == "__main__":
  app.run(main)
