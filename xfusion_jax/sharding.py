"""Device meshes and the rules that map logical axis names onto them.

Modules name the axes of every weight and activation ("embed", "q_heads",
"activation_batch", ...). A rule table, set in config, maps each name to mesh
axes (`data`, `fsdp`, `tensor`) or to None (replicated). Changing the mesh or
the rules never requires touching model code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import math
from typing import Any

from absl import logging
import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

# FSDP shards the hidden dimension of weights; tensor parallelism shards
# heads, MLP width and vocabulary. Activations split their batch over both
# data-parallel axes.
DEFAULT_RULES: Rules = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
)


def make_mesh(shape: Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Create a mesh with axes (data, fsdp, tensor).

  Args:
    shape: size of each axis; at most one may be -1, meaning "all remaining
      devices". Missing axes have size 1. The default puts every device on
      `data`.
    devices: the devices to use (default: all of them).

  Raises:
    ValueError: for an unknown axis name or sizes that do not multiply to the
      device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = dict(shape or {"data": -1})
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(
        f"Unknown mesh axes {sorted(unknown)}; expected a subset of "
        f"{MESH_AXES}.")
  sizes = [shape.get(axis, 1) for axis in MESH_AXES]
  for axis, size in zip(MESH_AXES, sizes):
    if not isinstance(size, int) or (size < 1 and size != -1):
      raise ValueError(f"Mesh axis {axis} has size {size!r}; use a positive "
                       "integer, or -1 for all remaining devices.")
  if sizes.count(-1) > 1:
    raise ValueError(f"At most one mesh axis may be -1, got {shape}.")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(
          f"Mesh {shape} cannot use {len(devices)} devices: the fixed axes "
          f"multiply to {known}, which does not divide the device count.")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(
        f"Mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} "
        f"devices, but {len(devices)} are available; set one axis to -1 to "
        "use all remaining devices.")
  # jax.make_mesh orders the devices by the physical topology (TPU torus),
  # so neighbouring mesh coordinates are neighbouring chips.
  # Auto axes let XLA propagate shardings from the logical constraints.
  return jax.make_mesh(tuple(sizes), MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(sizes))


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _fit_spec(name: str, shape: tuple[int, ...], spec: PartitionSpec,
              mesh: Mesh) -> PartitionSpec:
  """Replicate every dimension whose size its mesh axes do not divide.

  Replication is exact, only costlier in memory. The common case is a
  KV-head count smaller than the tensor axis (2 KV heads on tensor=8): every
  tensor shard then contains all KV heads, at the memory cost of full copies
  of the key and value projections. The vocabulary never gets here from `llm.from_pretrained`, which
  pads it instead (see `vocab_padding`).
  """
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      fitted.append(None)
      continue
    axis_tuple = axes if isinstance(axes, tuple) else (axes,)
    size = math.prod(mesh.shape[a] for a in axis_tuple)
    if dim % size:
      logging.warning(
          "Replicating dimension of size %d of %s: it is not divisible by "
          "mesh axes %s of total size %d.", dim, name, axis_tuple, size)
      fitted.append(None)
    else:
      fitted.append(axes)
  return PartitionSpec(*fitted)


def logical_shardings(boxed_tree: Any, mesh: Mesh,
                      rules: Rules = DEFAULT_RULES) -> Any:
  """Map a tree of `nn.LogicallyPartitioned` leaves to NamedShardings.

  Leaves without logical names are replicated.
  """
  logical_specs = nn.get_partition_spec(boxed_tree)
  values = nn.meta.unbox(boxed_tree)

  def to_sharding(path, value, logical_spec):
    mesh_spec = nn.logical_to_mesh_axes(logical_spec, rules)
    spec = _fit_spec(_path_name(path), value.shape, mesh_spec, mesh)
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(to_sharding, values, logical_specs)


def axis_size(logical_name: str, mesh: Mesh, rules: Rules = DEFAULT_RULES
              ) -> int:
  """Return how many shards the rules split a logical axis into on `mesh`."""
  mesh_axes = nn.logical_to_mesh_axes((logical_name,), rules)[0]
  if mesh_axes is None:
    return 1
  if isinstance(mesh_axes, str):
    mesh_axes = (mesh_axes,)
  return math.prod(mesh.shape[axis] for axis in mesh_axes)


def vocab_padding(vocab_size: int, mesh: Mesh | None,
                  rules: Rules = DEFAULT_RULES) -> int:
  """Return the rows to add so that the "vocab" mesh axes divide the vocabulary.

  Padding keeps the embedding table and LM head sharded where replication
  would put a whole copy (the largest frozen matrices of small LLMs) on
  every device.
  """
  if mesh is None:
    return 0
  shards = axis_size("vocab", mesh, rules)
  return -vocab_size % shards


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
