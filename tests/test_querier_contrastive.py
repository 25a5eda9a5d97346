"""Memory bank and contrastive losses of the querier-aware responder."""

import jax
import jax.numpy as jnp
import numpy as np

from xfusion_jax.querier import contrastive

TEMPERATURE = 0.1


def normalized(rng, *shape):
  x = rng.normal(size=shape).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def reference_prototype_loss(views, bank_views, bank_count, cluster, querier):
  """Cross-view prototype InfoNCE written with loops over samples."""
  total, count = 0.0, 0
  for view in (0, 1):
    other = 1 - view
    for i in range(views.shape[1]):
      c, q = cluster[i], querier[i]
      if bank_count[c, q] == 0:
        continue
      logits = {}
      for k in range(bank_count.shape[1]):
        n = bank_count[c, k]
        if n == 0:
          continue
        proto = bank_views[other, c, k, :n].mean(axis=0)
        proto = proto / np.linalg.norm(proto)
        logits[k] = float(views[view, i] @ proto) / TEMPERATURE
      values = np.array(list(logits.values()))
      log_z = values.max() + np.log(np.exp(values - values.max()).sum())
      total += log_z - logits[q]
      count += 1
  return total / count


def test_enqueue_is_fifo_per_queue():
  bank = contrastive.init_bank(num_clusters=2, num_queriers=3, length=3,
                               dim=1)
  values = np.arange(1, 6, dtype=np.float32)
  for value in values:
    views = jnp.full((2, 1, 1), value)
    bank = contrastive.enqueue(bank, views, jnp.array([1]), jnp.array([2]))
  # Five appends to a queue of three: 4 and 5 overwrote 1 and 2.
  np.testing.assert_array_equal(bank.embeddings[0, 1, 2, :, 0], [4, 5, 3])
  assert int(bank.count[1, 2]) == 3
  assert int(bank.next_slot[1, 2]) == 2
  assert int(bank.count.sum()) == 3
  assert float(jnp.abs(bank.embeddings[:, 0]).sum()) == 0.0


def test_enqueue_batch_matches_sequential():
  rng = np.random.default_rng(0)
  cluster = np.array([0, 1, 0, 0, 0, 0, 1])
  querier = np.array([2, 0, 2, 2, 1, 2, 0])
  views = normalized(rng, 2, 7, 4)
  batched = contrastive.enqueue(
      contrastive.init_bank(2, 3, 3, 4), jnp.asarray(views),
      jnp.asarray(cluster), jnp.asarray(querier))
  sequential = contrastive.init_bank(2, 3, 3, 4)
  for i in range(7):
    sequential = contrastive.enqueue(
        sequential, jnp.asarray(views[:, i:i + 1]),
        jnp.asarray(cluster[i:i + 1]), jnp.asarray(querier[i:i + 1]))
  for got, want in zip(jax.tree.leaves(batched),
                       jax.tree.leaves(sequential)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_prototype_loss_matches_reference():
  rng = np.random.default_rng(1)
  num_clusters, num_queriers, length, dim = 3, 4, 5, 8
  bank = contrastive.init_bank(num_clusters, num_queriers, length, dim)
  for _ in range(4):
    cluster = rng.integers(0, num_clusters, 6)
    querier = rng.integers(0, num_queriers, 6)
    bank = contrastive.enqueue(bank, jnp.asarray(normalized(rng, 2, 6, dim)),
                               jnp.asarray(cluster), jnp.asarray(querier))
  cluster = np.array([0, 1, 2, 0])
  querier = np.array([1, 3, 0, 2])
  views = normalized(rng, 2, 4, dim)
  bank = contrastive.enqueue(bank, jnp.asarray(views), jnp.asarray(cluster),
                             jnp.asarray(querier))

  got = contrastive.cross_view_prototype_loss(
      jnp.asarray(views), bank, jnp.asarray(cluster), jnp.asarray(querier),
      TEMPERATURE)
  want = reference_prototype_loss(views, np.asarray(bank.embeddings),
                                  np.asarray(bank.count), cluster, querier)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_other_clusters_never_in_denominator():
  dim = 4
  bank = contrastive.init_bank(num_clusters=2, num_queriers=3, length=2,
                               dim=dim)
  rng = np.random.default_rng(2)
  # Cluster 0 holds queriers 0 and 1; cluster 1 holds querier 2 only.
  bank = contrastive.enqueue(
      bank, jnp.asarray(normalized(rng, 2, 3, dim)), jnp.array([0, 0, 1]),
      jnp.array([0, 1, 2]))
  views = jnp.asarray(normalized(rng, 2, 1, dim))
  protos, valid = contrastive.prototypes(bank, 1)
  loss_before, _ = contrastive.prototype_infonce(
      views[0], protos, valid, jnp.array([0]), jnp.array([0]), TEMPERATURE)

  # Filling cluster 1 with querier 0 and 1 must not change a cluster 0 loss.
  other = contrastive.enqueue(
      bank, jnp.asarray(normalized(rng, 2, 4, dim)), jnp.array([1, 1, 1, 1]),
      jnp.array([0, 1, 2, 0]))
  protos, valid = contrastive.prototypes(other, 1)
  loss_after, _ = contrastive.prototype_infonce(
      views[0], protos, valid, jnp.array([0]), jnp.array([0]), TEMPERATURE)
  np.testing.assert_array_equal(np.asarray(loss_before),
                                np.asarray(loss_after))

  # A cluster with one querier gives a softmax over one logit: loss 0.
  loss_single, has_positive = contrastive.prototype_infonce(
      views[0], protos, valid.at[1, :2].set(False), jnp.array([1]),
      jnp.array([2]), TEMPERATURE)
  assert bool(has_positive[0])
  np.testing.assert_allclose(np.asarray(loss_single), [0.0], atol=1e-6)


def test_missing_prototype_gives_zero_loss():
  bank = contrastive.init_bank(1, 2, 2, 4)
  protos, valid = contrastive.prototypes(bank, 0)
  views = jnp.asarray(normalized(np.random.default_rng(3), 1, 4))
  loss, has_positive = contrastive.prototype_infonce(
      views, protos, valid, jnp.array([0]), jnp.array([1]), TEMPERATURE)
  assert not bool(has_positive[0])
  assert float(loss[0]) == 0.0


def test_instance_loss_matches_reference():
  rng = np.random.default_rng(4)
  views = normalized(rng, 2, 5, 6)
  cluster = np.array([0, 1, 0, 0, 1])
  got = contrastive.instance_loss(jnp.asarray(views), jnp.asarray(cluster),
                                  TEMPERATURE)
  losses = []
  for anchor, other in ((0, 1), (1, 0)):
    for i in range(5):
      same = np.flatnonzero(cluster == cluster[i])
      logits = views[anchor, i] @ views[other, same].T / TEMPERATURE
      log_z = np.log(np.exp(logits).sum())
      losses.append(log_z - logits[list(same).index(i)])
  np.testing.assert_allclose(float(got), np.mean(losses), rtol=1e-5)
