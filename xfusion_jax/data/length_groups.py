"""Global batches of windows of similar length, for right-padded training.

Windows padded to one fixed length spend compute on their padding. Here the
shuffled stream of window indices is cut into pools of `pool_batches`
global batches. Each pool is sorted by length and split into batches, and
the batches of a pool are shuffled. A batch is later cut to the smallest of
`buckets` fixed lengths that fits its longest window, so a job compiles
its step at most `buckets` times.

The plan depends only on the lengths, the global batch size and the seed,
never on the process count: every process computes the same global batch
`i` and reads its own rows of it.
"""

from __future__ import annotations

import functools
import sys
from typing import Sequence

import grain
import numpy as np


def bucket_lengths(max_length: int, buckets: int) -> list[int]:
  """Return `buckets` evenly spaced lengths whose largest is `max_length`."""
  if buckets < 1 or buckets > max_length:
    raise ValueError(f"buckets={buckets} must be between 1 and the maximum "
                     f"length {max_length}.")
  return [-(-max_length * k // buckets) for k in range(1, buckets + 1)]


def bucket_length(length: int, max_length: int, buckets: int) -> int:
  """Return the smallest of `bucket_lengths` that is at least `length`."""
  if length > max_length:
    raise ValueError(f"length {length} exceeds the maximum {max_length}.")
  return next(b for b in bucket_lengths(max_length, buckets) if b >= length)


class GroupedPlan:
  """Maps a global batch number to the window indices of that batch."""

  def __init__(self, lengths: Sequence[int], global_batch: int, seed: int,
               pool_batches: int):
    if global_batch < 1 or pool_batches < 1:
      raise ValueError(f"global_batch={global_batch} and pool_batches="
                       f"{pool_batches} must both be positive.")
    self.lengths = np.asarray(lengths)
    if not self.lengths.size:
      raise ValueError("There are no windows to batch.")
    self.global_batch = global_batch
    self.pool_batches = pool_batches
    self.seed = seed
    # Reshuffled every epoch, like `MapDataset.shuffle(...).repeat()`.
    self._stream = grain.MapDataset.range(self.lengths.size).shuffle(
        seed=seed).repeat()
    # Consecutive batches share a pool. A cache per plan, not one on the
    # class, so a finished plan is not kept alive by the cache.
    self._pool = functools.lru_cache(maxsize=2)(self._build_pool)

  def _build_pool(self, pool: int) -> np.ndarray:
    """Return the batches of pool `pool` as `[pool_batches, global_batch]`."""
    size = self.global_batch * self.pool_batches
    start = pool * size
    indices = np.array([self._stream[t] for t in range(start, start + size)])
    # A stable sort keeps the shuffled order among windows of equal length.
    indices = indices[np.argsort(self.lengths[indices], kind="stable")]
    batches = indices.reshape(self.pool_batches, self.global_batch)
    order = np.random.default_rng([self.seed, pool]).permutation(
        self.pool_batches)
    return batches[order]

  def __call__(self, batch: int) -> np.ndarray:
    pool, offset = divmod(batch, self.pool_batches)
    return self._pool(pool)[offset]


def grouped_batches(lengths: Sequence[int], global_batch: int, seed: int,
                    pool_batches: int) -> grain.MapDataset:
  """Endless dataset whose element `i` is `(i, indices of global batch i)`."""
  plan = GroupedPlan(lengths, global_batch, seed, pool_batches)
  return grain.MapDataset.range(sys.maxsize).map(lambda i: (i, plan(i)))
