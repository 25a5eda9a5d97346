"""Querier-contrastive learning: projection heads, memory bank and losses.

The specific tower's last-layer states pass a trainable RMS norm and are
mean-pooled over the responder's tokens. Two projection heads per query
cluster map the pooled vector to two L2-normalized views. The cross-view
prototype InfoNCE scores each view against per-querier prototypes, the mean
of the other view's recent embeddings in a memory bank, among the queriers
that the bank contains for the sample's own cluster only:

  loss_v(i) = -log softmax_k(<z_v(i), p_other(c_i, k)> / temperature)[q_i]

over queriers k with a non-empty queue in cluster c_i. The bank is a FIFO
queue per (cluster, querier) and view, updated with the batch before the
loss is computed, so every sample's own querier has a prototype.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from xfusion_jax.querier import model as querier_model

# A logit that masks a querier out of the softmax; finite, so a row whose
# queriers are all masked gives no NaN gradient.
MASKED_LOGIT = -1e9


@flax.struct.dataclass
class MemoryBank:
  """Recent projected embeddings, a FIFO queue per view, cluster and querier.

  Attributes:
    embeddings: `[2, clusters, queriers, length, dim]` float32; view 0 contains
      the first head's embeddings, view 1 the second's.
    count: `[clusters, queriers]` int32, valid entries per queue (at most
      `length`).
    next_slot: `[clusters, queriers]` int32, the slot the next entry of each
      queue overwrites.
  """

  embeddings: jax.Array
  count: jax.Array
  next_slot: jax.Array

  @property
  def length(self) -> int:
    return self.embeddings.shape[3]


def init_bank(num_clusters: int, num_queriers: int, length: int,
              dim: int) -> MemoryBank:
  """Return an empty bank."""
  return MemoryBank(
      embeddings=jnp.zeros((2, num_clusters, num_queriers, length, dim),
                           jnp.float32),
      count=jnp.zeros((num_clusters, num_queriers), jnp.int32),
      next_slot=jnp.zeros((num_clusters, num_queriers), jnp.int32))


def _rank_within_queue(keys: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Return each item's rank among earlier equal keys and its key's total."""
  same = keys[:, None] == keys[None, :]
  earlier = jnp.tril(same, k=-1)
  return earlier.sum(axis=1), same.sum(axis=1)


def enqueue(bank: MemoryBank, views: jax.Array, cluster: jax.Array,
            querier: jax.Array) -> MemoryBank:
  """Append a batch to the bank in batch order, dropping the oldest entries.

  Args:
    bank: the current bank.
    views: `[2, batch, dim]` embeddings of both views (not differentiated).
    cluster: `[batch]` cluster ids.
    querier: `[batch]` querier ids.

  When more than `length` items of one batch share a queue, only the last
  `length` of them are written, as sequential appends would leave.
  """
  num_queriers = bank.count.shape[1]
  keys = cluster * num_queriers + querier
  rank, total = _rank_within_queue(keys)
  start = bank.next_slot[cluster, querier]
  slot = (start + rank) % bank.length
  # Items overwritten later in the same batch get an out-of-range cluster
  # index, which the scatter drops.
  is_written = rank >= total - bank.length
  write_cluster = jnp.where(is_written, cluster, bank.count.shape[0])
  views = jax.lax.stop_gradient(views).astype(jnp.float32)
  embeddings = bank.embeddings.at[:, write_cluster, querier, slot].set(
      views, mode="drop")
  added = jnp.zeros_like(bank.count).at[cluster, querier].add(1)
  return MemoryBank(
      embeddings=embeddings,
      count=jnp.minimum(bank.count + added, bank.length),
      next_slot=(bank.next_slot + added) % bank.length)


def prototypes(bank: MemoryBank, view: int) -> tuple[jax.Array, jax.Array]:
  """Return L2-normalized queue means `[clusters, queriers, dim]` of `view`.

  Also returns `[clusters, queriers]` booleans, True where the queue is not
  empty. Slots past `count` are zero until written, so the sum over all
  slots is the sum over the valid ones.
  """
  total = bank.embeddings[view].sum(axis=2)
  mean = total / jnp.maximum(bank.count, 1)[..., None].astype(jnp.float32)
  return l2_normalize(mean), bank.count > 0


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), -1, keepdims=True) + eps)


def prototype_infonce(embeddings: jax.Array, protos: jax.Array,
                      valid: jax.Array, cluster: jax.Array,
                      querier: jax.Array,
                      temperature: float) -> tuple[jax.Array, jax.Array]:
  """Per-sample InfoNCE against the prototypes of the sample's own cluster.

  Args:
    embeddings: `[batch, dim]` normalized embeddings of one view.
    protos: `[clusters, queriers, dim]` prototypes of the other view.
    valid: `[clusters, queriers]`, True where a prototype exists.
    cluster: `[batch]` cluster ids.
    querier: `[batch]` querier ids.
    temperature: divides the cosine similarities.

  Returns:
    `(loss [batch], has_positive [batch])`; the loss is 0 where the sample's
    own querier has no prototype.
  """
  own_protos = protos[cluster]
  own_valid = valid[cluster]
  logits = jnp.einsum("bd,bqd->bq", embeddings.astype(jnp.float32),
                      own_protos) / temperature
  logits = jnp.where(own_valid, logits, MASKED_LOGIT)
  positive = jnp.take_along_axis(logits, querier[:, None], axis=1)[:, 0]
  has_positive = own_valid[jnp.arange(cluster.shape[0]), querier]
  loss = jax.nn.logsumexp(logits, axis=1) - positive
  return jnp.where(has_positive, loss, 0.0), has_positive


def cross_view_prototype_loss(views: jax.Array, bank: MemoryBank,
                              cluster: jax.Array, querier: jax.Array,
                              temperature: float) -> jax.Array:
  """Mean prototype InfoNCE of each view against the other view's bank.

  Args:
    views: `[2, batch, dim]` normalized embeddings.
    bank: the bank, already updated with this batch.
    cluster: `[batch]` cluster ids.
    querier: `[batch]` querier ids.
    temperature: InfoNCE temperature.
  """
  losses, counts = [], []
  for view in (0, 1):
    protos, valid = prototypes(bank, 1 - view)
    loss, has_positive = prototype_infonce(views[view], protos, valid, cluster,
                                           querier, temperature)
    losses.append(loss.sum())
    counts.append(has_positive.sum())
  return sum(losses) / jnp.maximum(sum(counts), 1)


def instance_loss(views: jax.Array, cluster: jax.Array,
                  temperature: float) -> jax.Array:
  """In-batch InfoNCE: a sample's two views are the positive pair.

  The negatives are the other samples of the same cluster, so the scope
  matches the prototype loss.
  """
  first, second = views[0].astype(jnp.float32), views[1].astype(jnp.float32)
  same_cluster = cluster[:, None] == cluster[None, :]
  logits = jnp.einsum("id,jd->ij", first, second) / temperature
  logits = jnp.where(same_cluster, logits, MASKED_LOGIT)
  diagonal = jnp.diagonal(logits)
  forward = jax.nn.logsumexp(logits, axis=1) - diagonal
  backward = jax.nn.logsumexp(logits, axis=0) - diagonal
  return (forward.mean() + backward.mean()) / 2


class ProjectionHead(nn.Module):
  """Per-cluster two-layer heads `w2 . gelu(w1 . x + b1)`, selected by id."""

  num_clusters: int
  hidden_dim: int
  output_dim: int

  @nn.compact
  def __call__(self, pooled: jax.Array, cluster: jax.Array) -> jax.Array:
    """Map `[batch, embed]` to normalized `[batch, output_dim]`."""
    width = pooled.shape[-1]
    c, h, p = self.num_clusters, self.hidden_dim, self.output_dim

    def param(name, shape, axes, init):
      return self.param(name, nn.with_logical_partitioning(init, axes), shape,
                        jnp.float32)

    w1 = param("w1", (c, width, h), (None, "embed", None),
               nn.initializers.normal(width**-0.5))
    b1 = param("b1", (c, h), (None, None), nn.initializers.zeros)
    w2 = param("w2", (c, h, p), (None, None, None),
               nn.initializers.normal(h**-0.5))
    x = pooled.astype(jnp.float32)
    hidden = jax.nn.gelu(jnp.einsum("bd,bdh->bh", x, w1[cluster]) +
                         b1[cluster])
    return l2_normalize(jnp.einsum("bh,bhp->bp", hidden, w2[cluster]))


class ContrastiveHeads(nn.Module):
  """The trainable norm, mean pooling and the two heads of each cluster."""

  num_clusters: int
  hidden_dim: int
  output_dim: int
  eps: float = 1e-6

  def setup(self):
    self.norm = querier_model.TrainableRMSNorm(self.eps, name="norm")
    heads = dict(num_clusters=self.num_clusters, hidden_dim=self.hidden_dim,
                 output_dim=self.output_dim)
    self.head_1 = ProjectionHead(**heads, name="head_1")
    self.head_2 = ProjectionHead(**heads, name="head_2")

  def pool(self, states: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of normalized `[batch, seq, embed]` states where `mask` is set."""
    normed = self.norm(states, jnp.ones(states.shape[-1:], jnp.float32))
    weights = mask.astype(jnp.float32)[..., None]
    return ((normed.astype(jnp.float32) * weights).sum(axis=1) /
            jnp.maximum(weights.sum(axis=1), 1.0))

  def __call__(self, states: jax.Array, mask: jax.Array, cluster: jax.Array,
               second_states: jax.Array | None = None,
               second_mask: jax.Array | None = None) -> jax.Array:
    """Return both views `[2, batch, output_dim]`.

    Without `second_states` both heads read the same pooled states. With
    them (a text-level second view), the second head reads those.
    """
    pooled = self.pool(states, mask)
    second = pooled
    if second_states is not None:
      second = self.pool(second_states, second_mask)
    return jnp.stack([self.head_1(pooled, cluster),
                      self.head_2(second, cluster)])


def all_gather_batch(tree: Any, mesh: Mesh | None,
                     batch_axes: tuple[str, ...]) -> Any:
  """Gather `[batch, ...]` leaves sharded over `batch_axes` onto every device.

  Uses an explicit `all_gather` under `shard_map`, so each device's copy of
  the memory bank is updated with the global batch. Without a mesh, or when
  the batch axes have size 1, the gather is the identity.
  """
  if mesh is None:
    return tree
  axes = tuple(a for a in batch_axes if mesh.shape[a] > 1)
  if not axes:
    return tree

  def gather(local):
    return jax.tree.map(
        lambda x: jax.lax.all_gather(x, axes, axis=0, tiled=True), local)

  specs = jax.tree.map(lambda _: PartitionSpec(axes), tree)
  replicated = jax.tree.map(lambda _: PartitionSpec(), tree)
  return jax.shard_map(gather, mesh=mesh, in_specs=(specs,),
                       out_specs=replicated, check_vma=False)(tree)
