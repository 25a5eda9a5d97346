"""Length-grouped global batches: buckets, coverage, grouping, determinism."""

import gc
import weakref

import numpy as np
import pytest

from xfusion_jax.data import length_groups


def test_bucket_lengths():
  assert length_groups.bucket_lengths(256, 4) == [64, 128, 192, 256]
  assert length_groups.bucket_lengths(48, 5) == [10, 20, 29, 39, 48]
  assert length_groups.bucket_lengths(7, 1) == [7]
  assert length_groups.bucket_length(0, 256, 4) == 64
  assert length_groups.bucket_length(64, 256, 4) == 64
  assert length_groups.bucket_length(65, 256, 4) == 128
  assert length_groups.bucket_length(256, 256, 4) == 256
  with pytest.raises(ValueError, match="exceeds"):
    length_groups.bucket_length(257, 256, 4)
  with pytest.raises(ValueError, match="buckets=0"):
    length_groups.bucket_lengths(256, 0)


def _batches(lengths, global_batch, seed, pool_batches, count):
  plan = length_groups.GroupedPlan(lengths, global_batch, seed, pool_batches)
  return np.stack([plan(i) for i in range(count)])


def test_epoch_covers_each_window_once():
  lengths = np.random.default_rng(0).integers(1, 200, size=96)
  batches = _batches(lengths, 4, 0, 6, 48)
  # 96 windows are 24 batches of 4: one epoch, then the next.
  for epoch in batches.reshape(2, 96):
    assert sorted(epoch) == list(range(96))
  assert not np.array_equal(batches[:24], batches[24:])


def test_pool_batches_have_disjoint_lengths():
  lengths = np.random.default_rng(1).integers(1, 200, size=500)
  batches = _batches(lengths, 8, 3, 5, 40)
  for pool in batches.reshape(8, 5, 8):
    ranges = sorted((lengths[b].min(), lengths[b].max()) for b in pool)
    for (_, high), (low, _) in zip(ranges, ranges[1:]):
      assert high <= low
  # Grouping leaves less padding than the same windows in shuffled batches.
  grouped = sum(lengths[b].max() for b in batches)
  shuffled = _batches(lengths, 8, 3, 1, 40)
  assert sorted(batches.ravel()) == sorted(shuffled.ravel())
  assert grouped < sum(lengths[b].max() for b in shuffled)


def test_plan_depends_only_on_seed():
  lengths = np.random.default_rng(2).integers(1, 50, size=64)
  first = _batches(lengths, 4, 7, 4, 20)
  np.testing.assert_array_equal(first, _batches(lengths, 4, 7, 4, 20))
  assert not np.array_equal(first, _batches(lengths, 4, 8, 4, 20))
  # Reading batch 13 first gives the same batch as reading them in order.
  plan = length_groups.GroupedPlan(lengths, 4, 7, 4)
  np.testing.assert_array_equal(plan(13), first[13])


def test_grouped_batches_dataset_and_errors():
  dataset = length_groups.grouped_batches([3, 1, 2, 5], 2, 0, 2)
  index, rows = dataset[5]
  assert index == 5
  assert rows.shape == (2,)
  with pytest.raises(ValueError, match="no windows"):
    length_groups.GroupedPlan([], 2, 0, 2)
  with pytest.raises(ValueError, match="pool_batches=0"):
    length_groups.GroupedPlan([1], 2, 0, 0)


def test_finished_plan_is_freed():
  plan = length_groups.GroupedPlan(np.arange(1, 33), 4, 0, 2)
  first = plan(0)
  np.testing.assert_array_equal(plan(0), first)
  ref = weakref.ref(plan)
  del plan
  gc.collect()
  # A cache shared by all plans would keep it alive.
  assert ref() is None
