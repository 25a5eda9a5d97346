"""The contract between the generic training loop and a model family.

A Task owns everything specific to one system (X-Fusion, the querier-aware
responder, ...): its frozen LLM, how trainable parameters are created, its
loss, its data and its sample renderings. The training loop owns everything
shared: optimizer, jit and shardings, checkpoints, resume, logging, MFU.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Protocol

import jax
import numpy as np

PyTree = Any
Batch = dict[str, np.ndarray]
Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class FlopCount:
  """Training FLOPs per token, split by how each part is used.

  The frozen-aware count is 6N per token for trainable parameters (forward
  and both backward matmuls), 4N for frozen parameters that gradients pass
  through (forward and the activation gradient, no weight gradient) and 2N
  for frozen parameters used forward only. Attention score FLOPs go in
  `attention_flops_per_token`.
  """

  trainable_params: int
  frozen_backprop_params: int
  frozen_forward_params: int
  attention_flops_per_token: float = 0.0

  def per_token(self) -> float:
    return (6 * self.trainable_params + 4 * self.frozen_backprop_params +
            2 * self.frozen_forward_params + self.attention_flops_per_token)


class DataIterator(Protocol):
  """A Grain-style iterator whose position can be saved and restored."""

  def __next__(self) -> Batch:
    ...

  def __iter__(self) -> Iterator[Batch]:
    ...

  def get_state(self) -> Any:
    ...

  def set_state(self, state: Any) -> None:
    ...


class Task(Protocol):
  """Interface between the training loop and a model family.

  A `TaskFactory` builds the task from the config and the mesh. The loop
  calls `init_trainable` and `loss_fn` inside the mesh and
  `sharding.DEFAULT_RULES` contexts, under jit.

  Attributes:
    frozen: tree of frozen `jax.Array`s (e.g. `{"frozen": lm.weights}`),
      already placed on the factory's mesh. The loop passes it to the step
      as a separate argument: it is never differentiated, has no optimizer
      state and is never checkpointed.
    frozen_source: description of where the frozen weights came from
      (path and content hash); stored in checkpoints and checked on restore.
  """

  frozen: PyTree
  frozen_source: dict[str, str]

  def init_trainable(self, rng: jax.Array) -> PyTree:
    """Return the trainable parameters, boxed with logical axis names."""

  def loss_fn(self, trainable: PyTree, frozen: PyTree, batch: Batch,
              rng: jax.Array) -> tuple[jax.Array, Metrics]:
    """Return the scalar loss and named scalar metrics (jit-traceable).

    `batch` is the global batch; `rng` is derived from (seed, step).
    """

  def train_data(self, seed: int) -> DataIterator:
    """Return this process's resumable iterator of batches.

    Every leaf of a batch has `config.batch_size // jax.process_count()`
    rows. The checkpoint stores the iterator's position with Grain's Orbax
    handler, so it must be a Grain `DatasetIterator` or `DataLoaderIterator`.
    """

  def tokens_per_batch(self, batch: Batch) -> int:
    """Count the tokens of this process's batch, for tokens/s and MFU."""

  def flop_count(self) -> FlopCount:
    """Return the per-token FLOP split used for MFU."""

  def samples(self, trainable: PyTree, step: int,
              workdir: str) -> dict[str, Any]:
    """Render periodic samples; return {name: PNG array or text} to log."""

  # Optional: a task that keeps state besides its parameters (a memory bank,
  # running statistics) defines `init_aux_state() -> PyTree` of arrays. The
  # loop then stores that state in the train state, replicated on every
  # device and checkpointed, never differentiated. It calls
  # `loss_fn(trainable, frozen, batch, rng, aux_state)`, which must return
  # `(loss, (metrics, new_aux_state))` with the same tree structure.


  # Optional: a task whose global batches and per-process iterator states do
  # not depend on `jax.process_count()` sets `process_count_invariant_data =
  # True`. Only such a task may resume a checkpoint that another number of
  # processes wrote. For other tasks the loop raises a ValueError, because
  # it cannot derive their data position.


def has_process_count_invariant_data(task: Any) -> bool:
  """Return whether `task` sets `process_count_invariant_data` (see `Task`)."""
  return bool(getattr(task, "process_count_invariant_data", False))


def has_aux_state(task: Any) -> bool:
  """Whether `task` defines `init_aux_state` (see `Task`)."""
  return callable(getattr(task, "init_aux_state", None))


TaskFactory = Callable[[Any, jax.sharding.Mesh], Task]
