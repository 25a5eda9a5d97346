"""Orbax checkpoints of the train state, the data iterator and metadata.

A checkpoint contains three items: `state` (step, trainable parameters,
optimizer state), `data` (the Grain iterator position of every process,
written by Grain's own Orbax handler) and `metadata` (JSON: the frozen
model's source and the config). The frozen model itself is never written;
its source is checked on restore instead.

Orbax writes each checkpoint into a temporary folder and renames it once
every item is complete, so a process killed during a save leaves the
previous checkpoint as the latest one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
from typing import Any

from absl import logging
import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

STATE = "state"
DATA = "data"
METADATA = "metadata"

# Files whose contents define a Hugging Face model's weights.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


def hash_weight_files(model_dir: str | os.PathLike[str]) -> str:
  """Return the SHA-256 of a model folder's config and weight files.

  Files are hashed in name order, each preceded by its name, so renaming a
  shard changes the hash too.
  """
  model_dir = pathlib.Path(model_dir)
  names = sorted(p.name for p in model_dir.iterdir()
                 if p.name == "config.json" or p.suffix in _WEIGHT_SUFFIXES)
  if not any(pathlib.Path(n).suffix in _WEIGHT_SUFFIXES for n in names):
    raise ValueError(f"No weight files ({', '.join(_WEIGHT_SUFFIXES)}) found "
                     f"in {model_dir}.")
  digest = hashlib.sha256()
  for name in names:
    digest.update(name.encode() + b"\0")
    with open(model_dir / name, "rb") as f:
      while chunk := f.read(1 << 24):
        digest.update(chunk)
  return digest.hexdigest()


def read_metadata(workdir: str | os.PathLike[str],
                  step: int | None = None) -> tuple[int, dict[str, Any]]:
  """Return the step and metadata of a workdir's latest (or given) checkpoint.

  The metadata contains `config` (the run's config as JSON text) and
  `frozen_source` (path and weight hash of the frozen model).

  Raises:
    FileNotFoundError: when the workdir has no complete checkpoint.
  """
  directory = pathlib.Path(workdir).resolve() / "checkpoints"
  manager = ocp.CheckpointManager(directory, item_names=(STATE, METADATA))
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(
          f"No complete checkpoint in {directory}. Train first with "
          f"`python -m xfusion_jax.train --config=... --workdir={workdir}`.")
    metadata = manager.restore(step, args=ocp.args.Composite(**{
        METADATA: ocp.args.JsonRestore()}))[METADATA]
  finally:
    manager.close()
  return step, dict(metadata)


def restore_state_on_one_device(path: pathlib.Path) -> dict[str, Any]:
  """Restore a saved train state onto the default device.

  The checkpoint records the training mesh's shardings, which need not
  exist here (a pod checkpoint on a laptop), so the target is rebuilt from
  the stored shapes with a single-device sharding.
  """
  checkpointer = ocp.StandardCheckpointer()
  stored = checkpointer.metadata(path).item_metadata
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(
      lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device),
      stored)
  return checkpointer.restore(path, target)


class FrozenSourceMismatchError(ValueError):
  """The checkpoint was trained beside different frozen weights."""


@dataclasses.dataclass(frozen=True)
class SavedRun:
  """A training checkpoint read back for inference or export.

  Attributes:
    step: the checkpoint's step.
    config: the run's config, as a dict.
    frozen_source: path and weight hash of the frozen model it trained beside.
    state: the train state (`step`, `params`, `opt_state`) on one device.
  """

  step: int
  config: dict[str, Any]
  frozen_source: dict[str, Any]
  state: dict[str, Any]


def load_saved_run(workdir: str | os.PathLike[str], step: int | None = None,
                   task: str | None = None) -> SavedRun:
  """Read a workdir's latest (or given) checkpoint onto the default device.

  Args:
    workdir: the training workdir.
    step: the step to read; None reads the latest.
    task: when given, the `config.task` the run must have.

  Raises:
    FileNotFoundError: when the workdir has no complete checkpoint.
    ValueError: when the run's task is not `task`.
    FrozenSourceMismatchError: when the frozen model's weight files changed
      since the run trained beside them.
  """
  step, metadata = read_metadata(workdir, step)
  config = json.loads(metadata["config"])
  if task is not None and config.get("task") != task:
    raise ValueError(f"{workdir} contains a run of task "
                     f"{config.get('task')!r}, not {task!r}.")
  source = dict(metadata["frozen_source"])
  if hash_weight_files(source["path"]) != source["weights_sha256"]:
    raise FrozenSourceMismatchError(
        f"The frozen LLM at {source['path']} changed since {workdir} was "
        "trained beside it.")
  directory = pathlib.Path(workdir).resolve() / "checkpoints"
  state = restore_state_on_one_device(directory / str(step) / STATE)
  return SavedRun(step, config, source, state)


class Checkpointer:
  """Saves and restores training checkpoints under `directory`.

  Saves are asynchronous: `save` returns once the arrays are copied off the
  device, and the files are written in the background. Call `close` (or
  `wait_until_finished`) before the process exits.
  """

  def __init__(self, directory: str | os.PathLike[str],
               config: ml_collections.ConfigDict,
               frozen_source: dict[str, str]):
    self._config = config
    self._frozen_source = dict(frozen_source)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.keep_checkpoints,
        enable_async_checkpointing=True,
        create=True,
    )
    self._manager = ocp.CheckpointManager(
        os.path.abspath(directory), options=options,
        item_names=(STATE, DATA, METADATA))

  @property
  def directory(self) -> pathlib.Path:
    return pathlib.Path(self._manager.directory)

  def latest_step(self) -> int | None:
    """Return the step of the latest complete checkpoint, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iterator: Any) -> None:
    """Start an asynchronous save of `state` and the iterator position."""
    metadata = {
        "step": step,
        "frozen_source": self._frozen_source,
        "config": self._config.to_json_best_effort(),
    }
    self._manager.save(
        step,
        args=ocp.args.Composite(**{
            STATE: ocp.args.StandardSave(state),
            DATA: grain.checkpoint.CheckpointSave(data_iterator),
            METADATA: ocp.args.JsonSave(metadata),
        }),
        force=True)
    logging.info("Started saving the checkpoint of step %d to %s.", step,
                 self.directory)

  def restore(self, step: int, abstract_state: Any, data_iterator: Any,
              process_count_invariant_data: bool = False) -> Any:
    """Restore the state of `step` and move `data_iterator` to its position.

    The arrays are read into the shardings of `abstract_state`, so the mesh
    and the number of processes may differ from the run that saved them.

    Args:
      step: a step listed by `all_steps`.
      abstract_state: tree of `jax.ShapeDtypeStruct` with shardings, the
        structure the state is restored into.
      data_iterator: the freshly created Grain iterator; it is modified in
        place.
      process_count_invariant_data: whether the task's data iterators have
        the same state in every process under any process count (see
        `task.Task`). Only then may the checkpoint come from another number
        of processes.

    Raises:
      FrozenSourceMismatchError: if the checkpoint records frozen weights
        with another hash than this run's.
      ValueError: if another number of processes wrote the checkpoint and
        the data position cannot be carried over.
    """
    metadata = self._manager.restore(
        step, args=ocp.args.Composite(**{METADATA: ocp.args.JsonRestore()}))
    self._check_frozen_source(step, metadata[METADATA]["frozen_source"])
    data_states = self._saved_data_states(step)
    if len(data_states) == jax.process_count():
      restored = self._manager.restore(
          step,
          args=ocp.args.Composite(**{
              STATE: ocp.args.StandardRestore(abstract_state),
              DATA: grain.checkpoint.CheckpointRestore(data_iterator),
          }))
    else:
      data_state = self._common_data_state(step, data_states,
                                           process_count_invariant_data)
      restored = self._manager.restore(
          step,
          args=ocp.args.Composite(**{
              STATE: ocp.args.StandardRestore(abstract_state)}))
      data_iterator.set_state(data_state)
      # As Grain's own restore handler does: prefetching restarts from the
      # restored position.
      if hasattr(data_iterator, "start_prefetch"):
        data_iterator.start_prefetch()
      logging.info(
          "The checkpoint of step %d was written by %d processes; this run "
          "has %d and continues from their common data position.", step,
          len(data_states), jax.process_count())
    logging.info("Restored the checkpoint of step %d from %s.", step,
                 self.directory)
    return restored[STATE]

  def _saved_data_states(self, step: int) -> list[str]:
    """Return the JSON iterator states of step `step`, in process order."""
    data_dir = self.directory / str(step) / DATA
    pattern = re.compile(r"process_(\d+)-of-(\d+)\.json")
    files = {}
    for path in data_dir.glob("process_*-of-*.json"):
      match = pattern.fullmatch(path.name)
      if match:
        files[int(match[1])] = (int(match[2]), path)
    counts = {count for count, _ in files.values()}
    if len(counts) != 1 or sorted(files) != list(range(counts.pop())):
      raise ValueError(
          f"The data item {data_dir} of the checkpoint of step {step} must "
          "hold one process_I-of-N.json per process I < N, found "
          f"{sorted(p.name for p in data_dir.iterdir())}.")
    return [files[i][1].read_text() for i in sorted(files)]

  def _common_data_state(self, step: int, data_states: list[str],
                         process_count_invariant_data: bool) -> Any:
    """Return the iterator state that every saving process had."""
    saved, current = len(data_states), jax.process_count()
    if not process_count_invariant_data:
      raise ValueError(
          f"The checkpoint of step {step} in {self.directory} was written by "
          f"{saved} processes, but this run has {current}, and this task's "
          "batches depend on the process count, so its data position cannot "
          f"be carried over. Resume with {saved} processes.")
    states = {json.dumps(json.loads(text), sort_keys=True)
              for text in data_states}
    if len(states) != 1:
      raise ValueError(
          f"The checkpoint of step {step} in {self.directory} contains "
          f"different data positions for its {saved} processes, so they "
          f"cannot be carried over to {current} processes. Resume with "
          f"{saved} processes.")
    return json.loads(states.pop())

  def _check_frozen_source(self, step: int, saved: dict[str, str]) -> None:
    saved_hash = saved.get("weights_sha256")
    current_hash = self._frozen_source.get("weights_sha256")
    if saved_hash != current_hash:
      raise FrozenSourceMismatchError(
          f"The checkpoint of step {step} in {self.directory} was trained "
          f"beside frozen weights {saved.get('path')!r} with SHA-256 "
          f"{saved_hash}, but this run loads {self._frozen_source.get('path')!r}"
          f" with SHA-256 {current_hash}. Point the config at the original "
          "frozen model, or start a new run in an empty --workdir.")
    if saved.get("path") != self._frozen_source.get("path"):
      logging.warning(
          "The frozen weights moved from %s to %s; their hash is unchanged.",
          saved.get("path"), self._frozen_source.get("path"))

  def reached_preemption(self, step: int) -> bool:
    """Return whether every process reached a preemption notice's sync step.

    Always False without `jax.distributed.initialize`.
    """
    return self._manager.reached_preemption(step)

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Wait for pending saves, then release the manager's threads."""
    self._manager.wait_until_finished()
    self._manager.close()

