"""The generic training loop shared by every model family.

`train(config, workdir)` builds the task named by `config.task`, then runs
jitted AdamW steps over its trainable parameters only. The frozen tree is a
separate, non-differentiated argument of the step, so it has no gradients,
no optimizer state and no place in checkpoints. Rerunning the same call on
the same workdir resumes from the latest complete checkpoint and reproduces
the uninterrupted run bit for bit. This holds because the per-step RNG is a
function of (seed, step) and the data iterator position is part of the
checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import signal
import time
from typing import Any

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import ml_collections
import numpy as np
import optax

from xfusion_jax import sharding as sharding_lib
from xfusion_jax.train import checkpointing
from xfusion_jax.train import metrics as metrics_lib
from xfusion_jax.train import optimizer as optimizer_lib
from xfusion_jax.train import task as task_lib
from xfusion_jax.train import tasks
from xfusion_jax.train.task import Batch, PyTree, Task, TaskFactory

# Batches are split over both data-parallel mesh axes.
BATCH_AXES = ("data", "fsdp")
# Steps whose scalars `TrainResult.history` keeps (about 1 KB each).
HISTORY_LIMIT = 10_000


class NonFiniteLossError(FloatingPointError):
  """The loss, the gradients or the updated parameters are NaN or Inf."""


@flax.struct.dataclass
class TrainState:
  """Model part of a checkpoint: step, trainable parameters, optimizer state.

  `aux` is the task's auxiliary state (see `task.has_aux_state`), an empty
  dict for tasks without one.
  """

  step: jax.Array
  params: PyTree
  opt_state: optax.OptState
  aux: PyTree = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class TrainResult:
  """Outcome of a `train` call.

  Attributes:
    state: the train state after the last step run.
    history: logged scalars by step, for the last `HISTORY_LIMIT` steps run
      in this call.
    preempted: whether SIGTERM (or a multi-host preemption notice) ended the
      run before `total_steps`.
  """

  state: TrainState
  history: dict[int, dict[str, float]]
  preempted: bool


def count_params(tree: PyTree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


@dataclasses.dataclass
class TrainProgram:
  """The optimizer, shardings and jitted functions for one task and mesh."""

  task: Task
  mesh: Mesh
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  seed: int
  rules: sharding_lib.Rules
  grad_accum_steps: int = 1
  # Unrolls the micro-batch loop, so that XLA's cost analysis, which counts
  # a loop body once, counts every micro-batch (see `xfusion_jax.aot`).
  unroll_grad_accum: bool = False
  state_shardings: TrainState = dataclasses.field(init=False)
  abstract_state: TrainState = dataclasses.field(init=False)
  batch_sharding: NamedSharding = dataclasses.field(init=False)

  def __post_init__(self):
    init_key, self._step_key = jax.random.split(jax.random.key(self.seed))
    self._init_key = init_key
    self._derive_shardings()
    self.batch_sharding = NamedSharding(self.mesh, PartitionSpec(BATCH_AXES))
    frozen_shardings = jax.tree.map(lambda x: x.sharding, self.task.frozen)
    replicated = sharding_lib.replicated(self.mesh)
    self._train_step = jax.jit(
        self._step,
        in_shardings=(self.state_shardings, frozen_shardings,
                      self.batch_sharding),
        out_shardings=(self.state_shardings, replicated),
        donate_argnums=0)
    self._init = jax.jit(self._init_fn, out_shardings=self.state_shardings)

  def _derive_shardings(self) -> None:
    with self.context():
      boxed = jax.eval_shape(self.task.init_trainable, self._init_key)
    # Outside the mesh context, unboxing abstract values applies no sharding
    # constraint.
    param_shardings = sharding_lib.logical_shardings(boxed, self.mesh,
                                                     self.rules)
    abstract_params = nn.meta.unbox(boxed)
    abstract_opt_state = jax.eval_shape(self.tx.init, abstract_params)
    replicated = sharding_lib.replicated(self.mesh)
    # Moments take their parameter's sharding, and counters are replicated.
    opt_shardings = optax.tree_map_params(
        self.tx, lambda _, s: s, abstract_opt_state, param_shardings,
        transform_non_params=lambda _: replicated)
    abstract_aux = self._abstract_aux()
    # The auxiliary state is replicated: every device updates its own copy
    # with the global batch.
    self.state_shardings = TrainState(
        step=replicated, params=param_shardings, opt_state=opt_shardings,
        aux=jax.tree.map(lambda _: replicated, abstract_aux))
    shapes = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
        opt_state=abstract_opt_state, aux=abstract_aux)
    self.abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        shapes, self.state_shardings)

  def _abstract_aux(self) -> PyTree:
    if not task_lib.has_aux_state(self.task):
      return {}
    with self.context():
      return jax.eval_shape(self.task.init_aux_state)

  def context(self):
    """Enter the mesh and logical-axis rules that the task's modules expect."""
    return _MeshContext(self.mesh, self.rules)

  def _init_fn(self) -> TrainState:
    params = nn.meta.unbox(self.task.init_trainable(self._init_key))
    aux = {}
    if task_lib.has_aux_state(self.task):
      aux = self.task.init_aux_state()
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.tx.init(params), aux=aux)

  def init_state(self) -> TrainState:
    """Return the initial state, sharded on the mesh."""
    with self.context():
      return self._init()

  def loss_and_grads(self, params: PyTree, frozen: PyTree, batch: Batch,
                     rng: jax.Array, aux: PyTree | None = None):
    """Return `((loss, metrics), grads)`, with gradients for `params` only.

    For a task with auxiliary state, `aux` defaults to its initial state.
    """
    if task_lib.has_aux_state(self.task) and aux is None:
      aux = self.task.init_aux_state()
    return self.loss_grads_and_aux(params, frozen, batch, rng, aux)[:2]

  def loss_grads_and_aux(self, params: PyTree, frozen: PyTree, batch: Batch,
                         rng: jax.Array, aux: PyTree):
    """Return `((loss, metrics), grads, new_aux)`; `aux` is not differentiated.

    A task without auxiliary state gets no `aux` argument and `aux` is
    returned unchanged.
    """
    grad_fn = jax.value_and_grad(self.task.loss_fn, argnums=0, has_aux=True)
    if not task_lib.has_aux_state(self.task):
      return (*grad_fn(params, frozen, batch, rng), aux)
    (loss, (metrics, new_aux)), grads = grad_fn(params, frozen, batch, rng,
                                                aux)
    return (loss, metrics), grads, new_aux

  def accumulated_loss_grads_and_aux(self, params: PyTree, frozen: PyTree,
                                     batch: Batch, rng: jax.Array,
                                     aux: PyTree):
    """Like `loss_grads_and_aux`, over `grad_accum_steps` micro-batches.

    Micro-batch i takes rows i, i + k, i + 2k, ... of the batch (k =
    `grad_accum_steps`), so that every device gets an equal share of each,
    and its own RNG `fold_in(rng, i)`. The gradients, loss and metrics are
    the means over micro-batches, and the auxiliary state passes through
    them in order. Only one micro-batch's activations are alive at a time.
    """
    k = self.grad_accum_steps
    if k == 1:
      return self.loss_grads_and_aux(params, frozen, batch, rng, aux)
    micro_sharding = NamedSharding(self.mesh, PartitionSpec(None, BATCH_AXES))

    def split(x):
      x = jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
      return jax.lax.with_sharding_constraint(x, micro_sharding)

    def body(carry, inputs):
      grad_sum, aux = carry
      index, micro = inputs
      (loss, metrics), grads, aux = self.loss_grads_and_aux(
          params, frozen, micro, jax.random.fold_in(rng, index), aux)
      grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
      return (grad_sum, aux), (loss, metrics)

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grad_sum, aux), (losses, metrics) = jax.lax.scan(
        body, (zeros, aux), (jnp.arange(k), jax.tree.map(split, batch)),
        unroll=self.unroll_grad_accum)
    grads = jax.tree.map(lambda g: g / k, grad_sum)
    metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)
    return (jnp.mean(losses), metrics), grads, aux

  def _step(self, state: TrainState, frozen: PyTree, batch: Batch):
    rng = jax.random.fold_in(self._step_key, state.step)
    (loss, task_metrics), grads, aux = self.accumulated_loss_grads_and_aux(
        state.params, frozen, batch, rng, state.aux)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    step_metrics = dict(task_metrics)
    step_metrics.update(
        loss=loss,
        grad_norm=optax.tree.norm(grads),
        learning_rate=self.schedule(state.step),
        params_finite=_all_finite(params))
    return TrainState(state.step + 1, params, opt_state, aux), step_metrics

  def lower_train_step(self, batch: Batch) -> jax.stages.Lowered:
    """Lower the step for `abstract_state`, the task's frozen tree and `batch`.

    The frozen tree and `batch` may be `jax.ShapeDtypeStruct`s with
    shardings, so the step compiles ahead of time for devices that this
    process cannot run on (see `xfusion_jax.aot`).
    """
    with self.context():
      return self._train_step.lower(self.abstract_state, self.task.frozen,
                                    batch)

  def train_step(self, state: TrainState, batch: Batch):
    """Run one step on a global batch, donating `state`."""
    with self.context():
      return self._train_step(state, self.task.frozen, batch)

  def global_batch(self, local_batch: Batch) -> Batch:
    """Assemble the processes' local batches into one sharded global batch."""
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(
            self.batch_sharding, np.asarray(x)), local_batch)


class _MeshContext:
  """`jax.set_mesh` plus `nn.logical_axis_rules`, as one context manager."""

  def __init__(self, mesh: Mesh, rules: sharding_lib.Rules):
    self._contexts = (jax.set_mesh(mesh), nn.logical_axis_rules(rules))

  def __enter__(self):
    for context in self._contexts:
      context.__enter__()
    return self

  def __exit__(self, *exc_info):
    for context in reversed(self._contexts):
      context.__exit__(*exc_info)
    return False


def _all_finite(tree: PyTree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def build_program(config: ml_collections.ConfigDict, task: Task,
                  mesh: Mesh, unroll_grad_accum: bool = False) -> TrainProgram:
  tx, schedule = optimizer_lib.make_optimizer(config)
  return TrainProgram(task=task, mesh=mesh, tx=tx, schedule=schedule,
                      seed=config.seed, rules=sharding_lib.DEFAULT_RULES,
                      grad_accum_steps=config.grad_accum_steps,
                      unroll_grad_accum=unroll_grad_accum)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raise ValueError naming the first invalid loop field of `config`."""
  positive = ("total_steps", "batch_size", "checkpoint_every",
              "keep_checkpoints", "log_every")
  for name in positive:
    if config[name] < 1:
      raise ValueError(f"config.{name} must be >= 1, got {config[name]}.")
  if config.learning_rate <= 0:
    raise ValueError(
        f"config.learning_rate must be > 0, got {config.learning_rate}.")
  if config.sample_every < 0:
    raise ValueError(
        f"config.sample_every must be >= 0, got {config.sample_every}.")
  if config.grad_accum_steps < 1 or config.batch_size % (
      config.grad_accum_steps * jax.process_count()):
    raise ValueError(
        f"config.grad_accum_steps={config.grad_accum_steps} must be >= 1 and "
        f"divide config.batch_size={config.batch_size} / "
        f"{jax.process_count()} processes. Choose a divisor.")
  if config.batch_size % jax.process_count():
    raise ValueError(
        f"config.batch_size={config.batch_size} is not divisible by the "
        f"{jax.process_count()} processes.")


class _PreemptionWatcher:
  """Turns SIGTERM or a multi-host preemption notice into a stop request.

  With several processes, JAX's preemption service (started by
  `jax.distributed.initialize`) receives SIGTERM and makes every process
  reach the same sync step. A Python handler would replace the service's
  handler, so one is installed only when there is a single process.
  """

  def __init__(self, checkpointer: checkpointing.Checkpointer):
    self._checkpointer = checkpointer
    self._signal_received = False
    self._previous_handler = None
    if jax.process_count() == 1:
      try:
        self._previous_handler = signal.signal(signal.SIGTERM, self._handle)
      except ValueError:
        logging.warning("train() runs outside the main thread, so SIGTERM "
                        "cannot be caught; a SIGTERM will not save a "
                        "checkpoint.")

  def _handle(self, signum, frame) -> None:
    del signum, frame
    logging.warning("Received SIGTERM; stopping after the current step.")
    self._signal_received = True

  def should_stop(self, step: int) -> bool:
    # Every process must call reached_preemption at every step.
    notice = self._checkpointer.reached_preemption(step)
    return self._signal_received or notice

  def close(self) -> None:
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)


@dataclasses.dataclass
class _StepRecord:
  """A dispatched step whose metrics are still on the device."""

  step: int
  metrics: dict[str, jax.Array]
  start_time: float
  data_wait_s: float
  tokens: int


class _StepLogger:
  """Fetches step metrics, checks them, logs them and keeps the history."""

  def __init__(self, config: ml_collections.ConfigDict,
               writer: metrics_lib.MetricWriter, flops_per_token: float,
               peak_flops: float | None):
    self._log_every = config.log_every
    self._writer = writer
    self._flops_per_token = flops_per_token
    self._peak_flops = peak_flops
    self.history: dict[int, dict[str, float]] = {}
    self._last_done = -math.inf

  def finish(self, record: _StepRecord) -> None:
    """Block on the record's metrics and write them.

    The step time runs from when the device could start the step (the
    start of its loop iteration, or the end of the step before if that came
    later) to the arrival of its metrics. The loop dispatches each step
    before it waits for the one before, so the time from one dispatch to
    the next would measure the earlier step, which differs when batches
    differ in length.

    Raises:
      NonFiniteLossError: if the loss, the gradient norm or the updated
        parameters are not finite.
    """
    values = {k: float(v) for k, v in jax.device_get(record.metrics).items()}
    done = time.perf_counter()
    step_time = done - max(record.start_time, self._last_done)
    self._last_done = done
    _check_finite(record.step, values)
    scalars = {"train/loss": values.pop("loss")}
    values.pop("params_finite")
    scalars["train/grad_norm"] = values.pop("grad_norm")
    scalars["train/learning_rate"] = values.pop("learning_rate")
    scalars.update({f"train/{k}": v for k, v in values.items()})
    scalars["perf/step_time_s"] = step_time
    scalars["perf/data_wait_s"] = record.data_wait_s
    # Summed over steps, this gives the training tokens seen by a checkpoint.
    scalars["perf/tokens"] = record.tokens
    scalars["perf/tokens_per_s"] = record.tokens / step_time
    if self._peak_flops:
      scalars["perf/mfu"] = (self._flops_per_token * record.tokens /
                             step_time / self._peak_flops)
    self._writer.write_scalars(record.step, scalars)
    self.history[record.step] = scalars
    if len(self.history) > HISTORY_LIMIT:
      del self.history[next(iter(self.history))]
    if record.step % self._log_every == 0:
      logging.info(
          "step %d: loss %.5g, grad norm %.3g, learning rate %.3g, "
          "%.3f s/step, data wait %.3f s, %.4g tokens/s, MFU %s",
          record.step, scalars["train/loss"], scalars["train/grad_norm"],
          scalars["train/learning_rate"], step_time, record.data_wait_s,
          scalars["perf/tokens_per_s"],
          f"{scalars['perf/mfu']:.2%}" if "perf/mfu" in scalars else "unknown")


def _check_finite(step: int, values: dict[str, float]) -> None:
  loss, grad_norm = values["loss"], values["grad_norm"]
  if not (math.isfinite(loss) and math.isfinite(grad_norm)):
    raise NonFiniteLossError(
        f"Stopping at step {step}: the loss is {loss} and the gradient norm "
        f"is {grad_norm}. The state of this step was not checkpointed. Lower "
        "config.learning_rate or config.grad_clip, or check the data of "
        "this step.")
  if not values["params_finite"]:
    raise NonFiniteLossError(
        f"Stopping at step {step}: the update made parameters NaN or Inf "
        f"(loss {loss}, gradient norm {grad_norm}). The state of this step "
        "was not checkpointed. Lower config.learning_rate.")


def _log_start(task: Task, program: TrainProgram, start_step: int,
               total_steps: int) -> None:
  logging.info("Process %d of %d: %d local devices %s; mesh %s.",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.local_devices(),
               dict(program.mesh.shape))
  logging.info("Trainable parameters: %d; frozen parameters: %d.",
               count_params(program.abstract_state.params),
               count_params(task.frozen))
  if start_step:
    logging.info("Resuming at step %d of %d.", start_step, total_steps)
  else:
    logging.info("Starting a new run of %d steps.", total_steps)


def _check_batch(batch: Batch, config: ml_collections.ConfigDict) -> None:
  expected = config.batch_size // jax.process_count()
  for name, value in batch.items():
    if np.shape(value)[0] != expected:
      raise ValueError(
          f"The task's batch field {name!r} has {np.shape(value)[0]} rows, "
          f"but config.batch_size={config.batch_size} over "
          f"{jax.process_count()} processes needs {expected} per process.")


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike[str],
          task_factory: TaskFactory | None = None) -> TrainResult:
  """Train `config.task` in `workdir`, resuming from its latest checkpoint.

  Args:
    config: a training config (see `xfusion_jax.train.config.base_config`).
    workdir: folder for checkpoints, TensorBoard events, `metrics.jsonl` and
      samples.
    task_factory: builds the task; default: the factory registered under
      `config.task`.

  Returns:
    The final state, the scalars of each step run and whether a SIGTERM
    ended the run early. After a SIGTERM a checkpoint of the last step is
    complete on disk.

  Raises:
    NonFiniteLossError: when a step's loss, gradients or updated parameters
      are not finite; that state is not checkpointed.
    checkpointing.FrozenSourceMismatchError: when the workdir's checkpoint
      was trained beside other frozen weights.
  """
  validate_config(config)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = sharding_lib.make_mesh(dict(config.mesh))
  factory = task_factory or tasks.get_task_factory(config.task)
  task = factory(config, mesh)
  program = build_program(config, task, mesh)
  checkpointer = checkpointing.Checkpointer(workdir / "checkpoints", config,
                                            task.frozen_source)
  data_iterator = task.train_data(config.seed)
  start_step = checkpointer.latest_step() or 0
  if start_step:
    state = checkpointer.restore(
        start_step, program.abstract_state, data_iterator,
        task_lib.has_process_count_invariant_data(task))
  else:
    state = program.init_state()
  _log_start(task, program, start_step, config.total_steps)

  writer = metrics_lib.MetricWriter(workdir)
  step_logger = _StepLogger(config, writer, task.flop_count().per_token(),
                            metrics_lib.peak_flops_per_second())
  watcher = _PreemptionWatcher(checkpointer)
  try:
    state, preempted = _run_steps(config, workdir, program, state, start_step,
                                  data_iterator, checkpointer, step_logger,
                                  writer, watcher)
  finally:
    watcher.close()
    # Waits for saves already started; a failed step never started one.
    checkpointer.close()
    writer.close()
  return TrainResult(state=state, history=step_logger.history,
                     preempted=preempted)


def _run_steps(config: ml_collections.ConfigDict, workdir: pathlib.Path,
               program: TrainProgram, state: TrainState, start_step: int,
               data_iterator: Any, checkpointer: checkpointing.Checkpointer,
               step_logger: _StepLogger, writer: metrics_lib.MetricWriter,
               watcher: _PreemptionWatcher) -> tuple[TrainState, bool]:
  """Run steps `start_step + 1 .. total_steps`; return (state, preempted)."""
  task = program.task
  pending: _StepRecord | None = None
  for step in range(start_step + 1, config.total_steps + 1):
    start_time = time.perf_counter()
    local_batch = next(data_iterator)
    if step == start_step + 1:
      _check_batch(local_batch, config)
    batch = program.global_batch(local_batch)
    data_wait = time.perf_counter() - start_time
    state, step_metrics = program.train_step(state, batch)
    # Metrics of the previous step are fetched only now, so the host does
    # not wait for the step it has just dispatched (except before a save).
    if pending is not None:
      step_logger.finish(pending)
    pending = _StepRecord(
        step, step_metrics, start_time, data_wait,
        task.tokens_per_batch(local_batch) * jax.process_count())

    stop = watcher.should_stop(step)
    save = (step % config.checkpoint_every == 0 or
            step == config.total_steps or stop)
    sample = config.sample_every and step % config.sample_every == 0
    if save or sample:
      # The step's metrics are checked before its state is saved, and its
      # step time excludes the save and the samples.
      # NOTE: finite parameters whose next loss is NaN still get saved; the
      # check covers this step's loss, gradients and updated parameters.
      step_logger.finish(pending)
      pending = None
    if save:
      checkpointer.save(step, state, data_iterator)
    if sample:
      with program.context():
        writer.write_samples(step, task.samples(state.params, step,
                                                str(workdir)))
    if stop:
      logging.warning("Stopped at step %d after a preemption request; the "
                      "checkpoint of this step is being written.", step)
      return state, True
  if pending is not None:
    step_logger.finish(pending)
  if start_step >= config.total_steps:
    logging.info("The checkpoint of step %d already reaches "
                  "config.total_steps=%d; nothing to run.", start_step,
                  config.total_steps)
  return state, False
