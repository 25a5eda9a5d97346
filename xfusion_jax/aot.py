"""Compile the X-Fusion train step for a TPU slice on a machine without TPUs.

    python -m xfusion_jax.aot --config=configs/tpu_v4.py --topology=v4-32 \
        --model=llama-3.1-8b

libtpu (the `tpu` extra) describes the slice's chips, and XLA compiles the
real train step for them from abstract inputs: no weights, data or TPU are
needed. The command prints per-chip memory against the chip's HBM, XLA's
FLOP and byte counts and a roofline bound on the step time. It exits with
status 1 when the step does not fit in HBM.

XLA's cost analysis counts the body of a while loop once, and the step has
two loops: the layer scan and the micro-batch loop of gradient
accumulation. `loop_aware_cost` therefore compiles reduced copies of the
step with both loops unrolled, at 1 and 2 layers and at two micro-batch
counts, and extrapolates their costs bilinearly to the real counts.

Only the "xfusion" task is supported.
"""

from __future__ import annotations

import dataclasses
import os
import re
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
               mesh: jax.sharding.Mesh, scan_unroll: int = 1):
    # XFusionTask.__init__ loads weights and reads the dataset, so it is not
    # called.
    # pylint: disable=super-init-not-called
    self._config = config
    dtype = jnp.dtype(config.dtype)
    self.frozen = model_lib.frozen_from_lm(
        abstract_lm_weights(lm_config, dtype, mesh))
    self.frozen_source = {"path": "", "weights_sha256": ""}
    module_config = dataclasses.replace(xfusion_task.xfusion_config(config),
                                        scan_unroll=scan_unroll)
    self.module = model_lib.XFusion(lm_config, module_config,
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


@dataclasses.dataclass(frozen=True)
class StepCost:
  """XLA's cost analysis of one compiled step, per chip.

  Attributes:
    flops: floating-point operations.
    bytes_accessed: operand and output bytes of every operation, XLA's
      estimate of HBM traffic.
    while_loops: while loops left in the optimized HLO, whose bodies the
      cost analysis counts once however many times they run.
  """

  flops: float
  bytes_accessed: float
  while_loops: int

  @classmethod
  def of(cls, compiled: jax.stages.Compiled) -> "StepCost":
    cost = compiled.cost_analysis()
    # Older JAX returns one dict per computation.
    if isinstance(cost, list):
      cost = cost[0]
    # An HLO while instruction prints as "%name = shape while(%init), ...".
    loops = len(re.findall(r"\bwhile\(", compiled.as_text()))
    return cls(flops=float(cost.get("flops", 0.0)),
               bytes_accessed=float(cost.get("bytes accessed", 0.0)),
               while_loops=loops)


@dataclasses.dataclass(frozen=True)
class LoopAwareCost:
  """FLOPs and bytes per chip of the step with every loop iteration counted.

  Attributes:
    flops: estimated FLOPs of the whole step.
    bytes_accessed: estimated HBM bytes of the whole step.
    samples: the reduced compiles that the estimate extrapolates, keyed by
      (layers, micro-batches).
  """

  flops: float
  bytes_accessed: float
  samples: dict[tuple[int, int], StepCost]

  @property
  def loops_left(self) -> int:
    """The maximum number of while loops left in an unrolled sample."""
    return max(c.while_loops for c in self.samples.values())


@dataclasses.dataclass
class CompileReport:
  """Per-chip figures of one compiled train step.

  `flops` and `bytes_accessed` are XLA's raw cost analysis of the real
  step, which counts each loop body once. `loop_cost`, when computed, counts
  every layer and micro-batch, and only it makes the roofline meaningful.
  """

  topology: Topology
  mesh_shape: dict[str, int]
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  flops: float
  bytes_accessed: float
  model_flops_per_chip: float
  loop_cost: LoopAwareCost | None = None

  @property
  def peak_bytes(self) -> int:
    # Donated state buffers are counted in both arguments and outputs.
    return (self.argument_bytes + self.output_bytes - self.alias_bytes +
            self.temp_bytes)

  @property
  def fits(self) -> bool:
    return self.peak_bytes <= self.topology.hbm_bytes

  @property
  def roofline_seconds(self) -> float | None:
    """Lower bound on the step time, compute- or HBM-bound, or None.

    It uses the loop-aware FLOPs and bytes, so it is None without
    `loop_cost` or when while loops stayed in its samples, whose bodies XLA
    counts once. NOTE: collectives and their overlap with compute are
    ignored, so the real step can be slower than this bound.
    """
    if self.loop_cost is None or self.loop_cost.loops_left:
      return None
    return max(self.loop_cost.flops / self.topology.peak_flops,
               self.loop_cost.bytes_accessed / self.topology.hbm_bandwidth)

  @property
  def roofline_mfu(self) -> float | None:
    """Frozen-aware model FLOPs over peak FLOPs at the roofline step time."""
    seconds = self.roofline_seconds
    if seconds is None:
      return None
    return self.model_flops_per_chip / (seconds * self.topology.peak_flops)

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
        f"raw XLA cost per chip (each loop body counted once): "
        f"{self.flops:.4g} FLOPs, {self.bytes_accessed:.4g} bytes accessed",
        f"frozen-aware model FLOPs per chip: {self.model_flops_per_chip:.4g}",
    ]
    cost = self.loop_cost
    if cost is None:
      lines.append("no roofline: the loop-aware cost was not computed")
      return "\n".join(lines)
    lines.append(
        f"loop-aware XLA cost per chip (every layer and micro-batch): "
        f"{cost.flops:.4g} FLOPs, {cost.bytes_accessed:.4g} bytes accessed")
    if cost.loops_left:
      # XLA's SPMD partitioner can turn FSDP matrix products into windowed
      # einsum loops ("windowed_dot_general" in the HLO) that overlap the
      # all-gather with the product, and unrolling does not remove them.
      lines.append(
          f"no roofline: {cost.loops_left} while loop(s) stayed in the "
          "unrolled samples, so the loop-aware cost counts their bodies once "
          "and is too low")
      return "\n".join(lines)
    seconds = self.roofline_seconds
    compute = cost.flops / t.peak_flops
    memory = cost.bytes_accessed / t.hbm_bandwidth
    lines += [
        f"roofline step time >= {seconds * 1e3:.1f} ms: compute "
        f"{compute * 1e3:.1f} ms at {t.peak_flops / 1e12:.0f} TFLOP/s, HBM "
        f"{memory * 1e3:.1f} ms at {t.hbm_bandwidth / 1e9:.0f} GB/s per chip",
        f"frozen-aware MFU at the roofline time: {self.roofline_mfu:.1%} "
        f"(model FLOPs / loop-aware FLOPs: "
        f"{self.model_flops_per_chip / cost.flops:.1%})",
    ]
    return "\n".join(lines)


def _check_config(config: ml_collections.ConfigDict,
                  mesh: jax.sharding.Mesh) -> None:
  if config.task != "xfusion":
    raise ValueError(
        f"config.task={config.task!r}: ahead-of-time compilation supports "
        "only the 'xfusion' task.")
  batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if config.batch_size % batch_shards:
    raise ValueError(
        f"config.batch_size={config.batch_size} is not divisible by the "
        f"{batch_shards} batch shards of mesh {dict(mesh.shape)}; pass a "
        f"--batch_size that is a multiple of {batch_shards}.")


def _lower(config: ml_collections.ConfigDict,
           lm_config: lm_config_lib.LMConfig, mesh: jax.sharding.Mesh,
           unroll: bool = False
           ) -> tuple[AbstractXFusionTask, jax.stages.Lowered]:
  """Lower the step; `unroll` unrolls the layer scan and micro-batch loop."""
  scan_unroll = lm_config.num_hidden_layers if unroll else 1
  task = AbstractXFusionTask(config, lm_config, mesh, scan_unroll=scan_unroll)
  program = loop.build_program(config, task, mesh, unroll_grad_accum=unroll)
  batch = task.abstract_batch(config.batch_size, program.batch_sharding)
  # The step runs on a TPU, so it is traced as a TPU host would trace it.
  with lm_model.merge_token_axes(False):
    return task, program.lower_train_step(batch)


def _with_layers(lm_config: lm_config_lib.LMConfig,
                 layers: int) -> lm_config_lib.LMConfig:
  """Return `lm_config` with `layers` layers, all of its single layer type."""
  types = set(lm_config.layer_types)
  if len(types) > 1:
    # A 1- or 2-layer sample cannot stand for a mix of attention kinds.
    raise ValueError(
        f"Layer types {sorted(types)}: the loop-aware cost supports models "
        "whose layers all have one type; pass --nocount_loops.")
  return dataclasses.replace(lm_config, num_hidden_layers=layers,
                             layer_types=tuple(types) * layers)


def loop_aware_cost(config: ml_collections.ConfigDict,
                    lm_config: lm_config_lib.LMConfig,
                    mesh: jax.sharding.Mesh) -> LoopAwareCost:
  """Estimate the step's per-chip FLOPs and bytes with every loop counted.

  XLA's cost analysis counts a while loop's body once. This compiles the
  step with the layer scan and the micro-batch loop unrolled at 1 and 2
  layers and at two micro-batch counts k0 < k1, keeping the micro-batch
  size. The counts are the two smallest from 2 up whose batches divide over
  the mesh, or only k itself when k <= 2 or no other count divides. The
  cost is modelled as bilinear in layers L and micro-batches k:

      cost(L, k) = a + b L + c k + d L k,

  the optimizer and embedding (a, b), each micro-batch's fixed part (c)
  and each layer of each micro-batch (d), which the four samples determine
  exactly. The assumption is that XLA compiles every layer and micro-batch
  alike in the real step and in the samples. Rematerialized recomputation,
  attention and the optimizer are in the samples like any other HLO.
  NOTE: loops that XLA adds itself (windowed einsums) stay in the samples,
  and `LoopAwareCost.loops_left` counts them.
  """
  layers = lm_config.num_hidden_layers
  steps = config.grad_accum_steps
  micro_batch = config.batch_size // steps
  batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  counts_k = [k for k in range(2, steps + 1)
              if micro_batch * k % batch_shards == 0][:2]
  if steps <= 2 or len(counts_k) < 2:
    counts_k = [steps]
  samples = {}
  for sample_layers in (1, 2):
    sample_lm = _with_layers(lm_config, sample_layers)
    for sample_steps in counts_k:
      sample_config = config.copy_and_resolve_references()
      sample_config.unlock()
      sample_config.grad_accum_steps = sample_steps
      sample_config.batch_size = micro_batch * sample_steps
      _, lowered = _lower(sample_config, sample_lm, mesh, unroll=True)
      samples[(sample_layers, sample_steps)] = StepCost.of(lowered.compile())

  def extrapolate(field: str) -> float:
    values = {key: getattr(cost, field) for key, cost in samples.items()}
    return extrapolate_bilinear(values, layers, steps)

  return LoopAwareCost(flops=extrapolate("flops"),
                       bytes_accessed=extrapolate("bytes_accessed"),
                       samples=samples)


def extrapolate_bilinear(values: dict[tuple[int, int], float], layers: int,
                         steps: int) -> float:
  """Extrapolate a + b L + c k + d L k to (`layers`, `steps`).

  Args:
    values: the cost at (L, k) for L in (1, 2) and one or two values of k.
      With one k, it must be `steps`.
    layers: the real layer count.
    steps: the real micro-batch count.
  """
  counts_k = sorted({k for _, k in values})
  k0 = counts_k[0]
  per_layer = values[(2, k0)] - values[(1, k0)]
  total = values[(1, k0)] + (layers - 1) * per_layer
  if len(counts_k) == 1:
    if k0 != steps:
      raise ValueError(
          f"Invalid samples: only k={k0} was sampled, so the cost at "
          f"k={steps} cannot be extrapolated. Sample two values of k.")
    return total
  k1 = counts_k[1]
  per_step = (values[(1, k1)] - values[(1, k0)]) / (k1 - k0)
  per_layer_step = (values[(2, k1)] - values[(1, k1)] - per_layer) / (k1 - k0)
  return total + (steps - k0) * (per_step + (layers - 1) * per_layer_step)


def compile_step(config: ml_collections.ConfigDict,
                 lm_config: lm_config_lib.LMConfig, topology: Topology,
                 devices: list[jax.Device] | None = None,
                 count_loops: bool = True
                 ) -> tuple[jax.stages.Compiled, CompileReport]:
  """Compile the X-Fusion train step of `config` for `topology`.

  Args:
    config: an X-Fusion training config; `batch_size` is the global batch.
    lm_config: the frozen LLM's architecture.
    topology: the TPU slice, whose peak figures the report uses.
    devices: the devices to compile for (default: libtpu's description of
      `topology`).
    count_loops: also compile the 2 or 4 reduced samples of
      `loop_aware_cost`, which the roofline needs.

  Raises:
    ValueError: if `config.task` is not "xfusion" or the batch does not
      divide over the mesh.
    StepDoesNotFitError: if XLA rejects the step for exceeding HBM.
  """
  devices = devices or topology_devices(topology)
  mesh = sharding_lib.make_mesh(dict(config.mesh), devices)
  _check_config(config, mesh)
  task, lowered = _lower(config, lm_config, mesh)
  try:
    compiled = lowered.compile()
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
  cost = StepCost.of(compiled)
  tokens = config.batch_size * task.seq_len
  model_flops = task.flop_count().per_token() * tokens / len(devices)
  report = CompileReport(
      topology=topology, mesh_shape=dict(mesh.shape),
      argument_bytes=memory.argument_size_in_bytes,
      output_bytes=memory.output_size_in_bytes,
      alias_bytes=memory.alias_size_in_bytes,
      temp_bytes=memory.temp_size_in_bytes,
      flops=cost.flops,
      bytes_accessed=cost.bytes_accessed,
      model_flops_per_chip=model_flops,
      loop_cost=(loop_aware_cost(config, lm_config, mesh)
                 if count_loops else None))
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
_COUNT_LOOPS = flags.DEFINE_boolean(
    "count_loops", True,
    "Also compile 2 or 4 reduced copies of the step with its loops unrolled, "
    "to count every layer and micro-batch in the FLOPs, bytes and roofline.")


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
    _, report = compile_step(config, lm_config, topology,
                             count_loops=_COUNT_LOOPS.value)
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
