"""Import and export of Hugging Face checkpoints (safetensors).

Every leaf of the Flax tree is matched to named HF tensors through a layout
that gives how the two shapes relate. Import streams each device's shard
straight from the memory-mapped files into its `jax.Array`, so no process
ever holds a full copy of a tensor for each of its devices. Export writes
standard HF files that transformers loads with no missing or unexpected keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import re
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from xfusion_jax.llm.config import LMConfig

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"

# Layouts: how a per-layer Flax leaf is obtained from its HF tensor.
SAME = "same"  # identical shape
TRANSPOSE = "transpose"  # HF [out, in] -> Flax [in, out]
HEADS_OUT = "heads_out"  # HF [heads*head_dim, in] -> Flax [in, heads, head_dim]
HEADS_IN = "heads_in"  # HF [out, heads*head_dim] -> Flax [heads, head_dim, out]
HEADS_BIAS = "heads_bias"  # HF [heads*head_dim] -> Flax [heads, head_dim]

# Buffers some older checkpoints carry that are recomputed, never loaded.
_IGNORED_TENSORS = re.compile(r".*\.rotary_emb\.inv_freq$")


@dataclasses.dataclass(frozen=True)
class LeafPlan:
  """Source of one Flax leaf in the HF checkpoint.

  Attributes:
    hf_names: one HF tensor name, or one per layer for stacked leaves.
    layout: one of the layout constants above.
    stacked: whether the Flax leaf has a leading "layers" axis.
    vocab_axis: the Flax axis that indexes the vocabulary, or None. Along it
      the Flax leaf has `config.padded_vocab_size` entries and the HF tensor
      `config.vocab_size`; the padding is zero and is never exported.
  """

  hf_names: tuple[str, ...]
  layout: str
  stacked: bool
  vocab_axis: int | None = None


_LAYER_LAYOUTS = {
    ("self_attn", "q_proj", "kernel"): HEADS_OUT,
    ("self_attn", "k_proj", "kernel"): HEADS_OUT,
    ("self_attn", "v_proj", "kernel"): HEADS_OUT,
    ("self_attn", "q_proj", "bias"): HEADS_BIAS,
    ("self_attn", "k_proj", "bias"): HEADS_BIAS,
    ("self_attn", "v_proj", "bias"): HEADS_BIAS,
    ("self_attn", "o_proj", "kernel"): HEADS_IN,
    ("self_attn", "o_proj", "bias"): SAME,
    ("mlp", "gate_proj", "kernel"): TRANSPOSE,
    ("mlp", "up_proj", "kernel"): TRANSPOSE,
    ("mlp", "down_proj", "kernel"): TRANSPOSE,
    ("mlp", "gate_proj", "bias"): SAME,
    ("mlp", "up_proj", "bias"): SAME,
    ("mlp", "down_proj", "bias"): SAME,
    ("input_layernorm", "scale"): SAME,
    ("post_attention_layernorm", "scale"): SAME,
    # Gemma 3 only.
    ("self_attn", "q_norm", "scale"): SAME,
    ("self_attn", "k_norm", "scale"): SAME,
    ("pre_feedforward_layernorm", "scale"): SAME,
    ("post_feedforward_layernorm", "scale"): SAME,
}


def _hf_suffix(path: tuple[str, ...]) -> str:
  *module, leaf = path
  hf_leaf = "weight" if leaf in ("kernel", "scale") else leaf
  return ".".join(module + [hf_leaf])


def leaf_plan(path: tuple[str, ...], config: LMConfig) -> LeafPlan:
  """Return the HF source of the Flax leaf at `path` (collection excluded).

  Raises:
    KeyError: for a path with no HF counterpart.
  """
  if path == ("model", "embed_tokens"):
    return LeafPlan(("model.embed_tokens.weight",), SAME, False, vocab_axis=0)
  if path == ("model", "norm", "scale"):
    return LeafPlan(("model.norm.weight",), SAME, False)
  if path == ("lm_head", "kernel"):
    return LeafPlan(("lm_head.weight",), TRANSPOSE, False, vocab_axis=1)
  if path[:2] == ("model", "layers") and path[2:] in _LAYER_LAYOUTS:
    suffix = _hf_suffix(path[2:])
    names = tuple(f"model.layers.{i}.{suffix}"
                  for i in range(config.num_hidden_layers))
    return LeafPlan(names, _LAYER_LAYOUTS[path[2:]], True)
  raise KeyError(f"No Hugging Face tensor corresponds to {'/'.join(path)}.")


def hf_shape(layout: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  """Shape of the HF tensor for a per-layer Flax shape."""
  if layout == SAME:
    return flax_shape
  if layout == TRANSPOSE:
    return flax_shape[::-1]
  if layout == HEADS_OUT:
    d, h, k = flax_shape
    return (h * k, d)
  if layout == HEADS_IN:
    h, k, d = flax_shape
    return (d, h * k)
  if layout == HEADS_BIAS:
    h, k = flax_shape
    return (h * k,)
  raise ValueError(f"Unknown layout {layout!r}")


def to_hf(layout: str, value: np.ndarray) -> np.ndarray:
  """Convert a full per-layer Flax array to its HF layout."""
  if layout == SAME:
    return value
  if layout == TRANSPOSE:
    return value.T
  if layout == HEADS_OUT:
    d = value.shape[0]
    return value.reshape(d, -1).T
  if layout == HEADS_IN:
    d = value.shape[-1]
    return value.reshape(-1, d).T
  if layout == HEADS_BIAS:
    return value.reshape(-1)
  raise ValueError(f"Unknown layout {layout!r}")


def read_flax_block(tensor, layout: str, flax_shape: tuple[int, ...],
                    index: tuple[slice, ...]) -> np.ndarray:
  """Read the block `index` of a per-layer Flax leaf from its HF tensor.

  Args:
    tensor: an object sliceable like the HF tensor (a safetensors slice or a
      NumPy array); only the rows the block needs are read.
    layout: how the Flax leaf relates to the HF tensor.
    flax_shape: the per-layer Flax shape.
    index: one slice per Flax dimension (step 1).
  """
  bounds = [s.indices(n)[:2] for s, n in zip(index, flax_shape)]
  spans = [slice(lo, hi) for lo, hi in bounds]
  if layout == SAME:
    return np.asarray(tensor[tuple(spans)])
  if layout == TRANSPOSE:
    return np.asarray(tensor[spans[1], spans[0]]).T
  if layout == HEADS_OUT:
    (_, _), (h0, h1), _ = bounds
    head_dim = flax_shape[2]
    rows = np.asarray(tensor[h0 * head_dim:h1 * head_dim, spans[0]]).T
    return rows.reshape(rows.shape[0], h1 - h0, head_dim)[:, :, spans[2]]
  if layout == HEADS_IN:
    (h0, h1), _, _ = bounds
    head_dim = flax_shape[1]
    cols = np.asarray(tensor[spans[2], h0 * head_dim:h1 * head_dim]).T
    return cols.reshape(h1 - h0, head_dim, cols.shape[1])[:, spans[1], :]
  if layout == HEADS_BIAS:
    (h0, h1), _ = bounds
    head_dim = flax_shape[1]
    flat = np.asarray(tensor[h0 * head_dim:h1 * head_dim])
    return flat.reshape(h1 - h0, head_dim)[:, spans[1]]
  raise ValueError(f"Unknown layout {layout!r}")


def read_json(path: os.PathLike[str] | str) -> dict[str, Any]:
  """Parse a JSON file, naming the file in the error if it is invalid."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e}); re-download or "
                     "re-export the model folder.") from e


def _open_safetensors(path: pathlib.Path):
  try:
    return safetensors.safe_open(path, "np")
  except safetensors.SafetensorError as e:
    raise ValueError(
        f"{path} is truncated or not a valid safetensors file ({e}); "
        "re-download or re-export it.") from e


class CheckpointReader(contextlib.AbstractContextManager):
  """Named tensors of an HF folder, from safetensors (or, if allowed, pickle).

  Attributes:
    files: tensor name -> file name within the folder.
  """

  def __init__(self, model_dir: str | os.PathLike[str],
               allow_pickle: bool = False):
    self.model_dir = pathlib.Path(model_dir)
    self._stack = contextlib.ExitStack()
    self._handles: dict[str, Any] = {}
    self._pickled: dict[str, np.ndarray] | None = None
    if (self.model_dir / SAFE_INDEX).exists():
      self.files = self._weight_map(SAFE_INDEX)
    elif (self.model_dir / SAFE_SINGLE).exists():
      with _open_safetensors(self.model_dir / SAFE_SINGLE) as f:
        self.files = {name: SAFE_SINGLE for name in f.keys()}
    elif any((self.model_dir / n).exists() for n in (PICKLE_SINGLE,
                                                     PICKLE_INDEX)):
      if not allow_pickle:
        raise ValueError(
            f"{self.model_dir} contains only pickled PyTorch weights "
            f"({PICKLE_SINGLE}). Unpickling can run arbitrary code, so it is "
            "rejected by default. Convert the folder to safetensors, or pass "
            "allow_pickle=True (needs torch; loads with weights_only=True).")
      self._pickled = self._load_pickled()
      self.files = {name: PICKLE_SINGLE for name in self._pickled}
    else:
      raise FileNotFoundError(
          f"No weights in {self.model_dir}: expected {SAFE_SINGLE} or "
          f"{SAFE_INDEX}.")

  def _weight_map(self, index_name: str) -> dict[str, str]:
    path = self.model_dir / index_name
    weight_map = read_json(path).get("weight_map")
    if not isinstance(weight_map, dict):
      raise ValueError(f"{path} has no 'weight_map' object.")
    return dict(weight_map)

  def _load_pickled(self) -> dict[str, np.ndarray]:
    import torch  # pylint: disable=g-import-not-at-top

    if (self.model_dir / PICKLE_INDEX).exists():
      names = sorted(set(self._weight_map(PICKLE_INDEX).values()))
    else:
      names = [PICKLE_SINGLE]
    tensors = {}
    for name in names:
      state = torch.load(self.model_dir / name, map_location="cpu",
                         weights_only=True, mmap=True)
      for key, tensor in state.items():
        if tensor.dtype == torch.bfloat16:
          array = tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
          array = tensor.numpy()
        tensors[key] = array
    return tensors

  def tensor(self, name: str):
    """Return a lazily sliceable handle of tensor `name`."""
    if self._pickled is not None:
      return self._pickled[name]
    file_name = self.files[name]
    if file_name not in self._handles:
      path = self.model_dir / file_name
      if not path.exists():
        raise FileNotFoundError(
            f"{path} is listed in {SAFE_INDEX} for tensor {name} but missing.")
      self._handles[file_name] = self._stack.enter_context(
          _open_safetensors(path))
    return self._handles[file_name].get_slice(name)

  def shape(self, name: str) -> tuple[int, ...]:
    handle = self.tensor(name)
    if isinstance(handle, np.ndarray):
      return handle.shape
    return tuple(handle.get_shape())

  def file_of(self, name: str) -> str:
    return str(self.model_dir / self.files.get(name, SAFE_SINGLE))

  def __exit__(self, *exc_info):
    self._stack.close()
    return None


def flatten_paths(tree: dict[str, Any]) -> dict[tuple[str, ...], Any]:
  """Map each leaf of a nested dict to its key path."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    flat[tuple(k.key for k in path)] = leaf
  return flat


def unflatten_paths(flat: dict[tuple[str, ...], Any]) -> dict[str, Any]:
  """Rebuild the nested dict of `flatten_paths`."""
  tree: dict[str, Any] = {}
  for path, leaf in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = leaf
  return tree


def flatten_named(tree: dict[str, Any],
                  prefix: str = "") -> dict[str, np.ndarray]:
  """Flatten a nested dict to NumPy leaves named `prefix/a/b/leaf`.

  Exports store trainable heads under these names in safetensors files.
  """
  start = (prefix,) if prefix else ()
  return {"/".join(start + path): np.asarray(leaf)
          for path, leaf in flatten_paths(tree).items()}


def unflatten_named(flat: dict[str, np.ndarray]) -> dict[str, Any]:
  """Rebuild the nested dict of `flatten_named`, as jax arrays."""
  return unflatten_paths({tuple(name.split("/")): jnp.asarray(value)
                          for name, value in flat.items()})


def validate(reader: CheckpointReader, plans: dict[tuple[str, ...], LeafPlan],
             shapes: dict[tuple[str, ...], tuple[int, ...]],
             config: LMConfig) -> None:
  """Check that the checkpoint contains exactly the expected tensors and shapes.

  Raises:
    ValueError: naming each missing, unexpected or mis-shaped tensor and its
      file.
  """
  expected = {}
  for path, plan in plans.items():
    per_layer = shapes[path][1:] if plan.stacked else shapes[path]
    for name in plan.hf_names:
      expected[name] = hf_shape(plan.layout, per_layer)
  problems = []
  for name in sorted(set(expected) - set(reader.files)):
    problems.append(f"missing tensor {name} (expected in "
                    f"{reader.file_of(name)})")
  for name in sorted(set(reader.files) - set(expected)):
    if _IGNORED_TENSORS.match(name):
      continue
    if name == "lm_head.weight" and config.tie_word_embeddings:
      # Some tied checkpoints store the shared matrix twice; the embedding
      # copy is the one used.
      continue
    problems.append(f"unexpected tensor {name} in {reader.file_of(name)}")
  for name in sorted(set(expected) & set(reader.files)):
    actual = reader.shape(name)
    if tuple(actual) != tuple(expected[name]):
      problems.append(f"tensor {name} in {reader.file_of(name)} has shape "
                      f"{tuple(actual)}, expected {expected[name]}")
  if problems:
    raise ValueError(f"Checkpoint {reader.model_dir} does not match its "
                     "config.json:\n  " + "\n  ".join(problems))


def load_weights(reader: CheckpointReader, config: LMConfig,
                 abstract: dict[str, Any], shardings: dict[str, Any],
                 dtype: Any) -> dict[str, Any]:
  """Stream every leaf of `abstract` from the checkpoint into a sharded array.

  Args:
    reader: the open checkpoint.
    config: the model config.
    abstract: tree of `jax.ShapeDtypeStruct` (one collection, unboxed).
    shardings: tree of `jax.sharding.Sharding` with the same structure.
    dtype: storage dtype of the loaded leaves.

  Returns:
    The tree of loaded `jax.Array`s.
  """
  flat_abstract = flatten_paths(abstract)
  flat_shardings = flatten_paths(shardings)
  plans = {path: leaf_plan(path, config) for path in flat_abstract}
  shapes = {path: unpadded_shape(plan, tuple(flat_abstract[path].shape),
                                 config)
            for path, plan in plans.items()}
  validate(reader, plans, shapes, config)

  loaded = {}
  for path, plan in plans.items():
    read = _block_reader(reader, plan, shapes[path], np.dtype(dtype))
    if plan.vocab_axis is not None and config.vocab_padding:
      read = _zero_padded(read, plan.vocab_axis, config.vocab_size,
                          config.padded_vocab_size)
    loaded[path] = jax.make_array_from_callback(
        tuple(flat_abstract[path].shape), flat_shardings[path], read)
  return unflatten_paths(loaded)


def unpadded_shape(plan: LeafPlan, shape: tuple[int, ...],
                   config: LMConfig) -> tuple[int, ...]:
  """Return a Flax leaf's shape without the vocabulary padding."""
  if plan.vocab_axis is None:
    return shape
  unpadded = list(shape)
  unpadded[plan.vocab_axis] = config.vocab_size
  return tuple(unpadded)


def _zero_padded(read: Callable[[tuple[slice, ...]], np.ndarray], axis: int,
                 vocab_size: int, padded_vocab_size: int
                 ) -> Callable[[tuple[slice, ...]], np.ndarray]:
  """Wrap a block reader so that vocabulary rows >= `vocab_size` read as 0."""

  def read_padded(index: tuple[slice, ...]) -> np.ndarray:
    index = list(index) + [slice(None)] * (axis + 1 - len(index))
    start, stop, _ = index[axis].indices(padded_vocab_size)
    real_stop = min(stop, vocab_size)
    real_index = list(index)
    real_index[axis] = slice(start, max(start, real_stop))
    block = read(tuple(real_index))
    padding = [(0, 0)] * block.ndim
    padding[axis] = (0, max(0, stop - max(start, real_stop)))
    return np.pad(block, padding)

  return read_padded


def _block_reader(reader: CheckpointReader, plan: LeafPlan,
                  shape: tuple[int, ...],
                  dtype: np.dtype) -> Callable[[tuple[slice, ...]], np.ndarray]:
  """Return the callback that reads one device's block of a leaf."""

  def read(index: tuple[slice, ...]) -> np.ndarray:
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    if not plan.stacked:
      block = read_flax_block(
          reader.tensor(plan.hf_names[0]), plan.layout, shape, index)
      return block.astype(dtype)
    start, stop = index[0].indices(shape[0])[:2]
    layers = [
        read_flax_block(reader.tensor(plan.hf_names[i]), plan.layout,
                        shape[1:], index[1:]).astype(dtype)
        for i in range(start, stop)
    ]
    return np.stack(layers)

  return read


def _to_host(value: jax.Array) -> np.ndarray:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(value, tiled=True))
  return np.asarray(jax.device_get(value))


def hf_state_dict(weights: dict[str, Any],
                  config: LMConfig) -> dict[str, np.ndarray]:
  """Convert a tree of Flax leaves to HF tensors (host NumPy arrays)."""
  tensors = {}
  for path, value in flatten_paths(weights).items():
    plan = leaf_plan(path, config)
    array = _to_host(value)
    if plan.vocab_axis is not None:
      # Drops the rows that only exist to make a mesh axis divide the
      # vocabulary.
      array = np.take(array, np.arange(config.vocab_size), axis=plan.vocab_axis)
    if plan.stacked:
      for i, name in enumerate(plan.hf_names):
        tensors[name] = np.ascontiguousarray(to_hf(plan.layout, array[i]))
    else:
      tensors[plan.hf_names[0]] = np.ascontiguousarray(
          to_hf(plan.layout, array))
  return tensors


def _save(tensors: dict[str, np.ndarray], path: pathlib.Path,
          metadata: dict[str, str]) -> None:
  safetensors.numpy.save_file(tensors, path, metadata)
  # safetensors creates the file readable by its owner only; exported
  # checkpoints are meant to be shared like the other files of the folder.
  os.chmod(path, 0o644)


def write_safetensors(tensors: dict[str, np.ndarray],
                      out_dir: str | os.PathLike[str],
                      max_shard_size: int) -> list[str]:
  """Write tensors as HF safetensors, sharded with an index above a size.

  Args:
    tensors: name -> array.
    out_dir: the target folder (created if needed).
    max_shard_size: maximum bytes per file; a single tensor larger than this
      gets a file of its own.

  Returns:
    The file names written.
  """
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  # Weights of an earlier export would sit beside the new ones, and readers
  # that prefer the index (or the single file) would load the stale set.
  for stale in [*out.glob("model*.safetensors"), out / SAFE_INDEX]:
    if stale.exists():
      logging.info("Removing %s from an earlier export.", stale)
      stale.unlink()
  shards: list[dict[str, np.ndarray]] = [{}]
  shard_bytes = 0
  for name in sorted(tensors):
    size = tensors[name].nbytes
    if shards[-1] and shard_bytes + size > max_shard_size:
      shards.append({})
      shard_bytes = 0
    shards[-1][name] = tensors[name]
    shard_bytes += size
  metadata = {"format": "pt"}
  if len(shards) == 1:
    _save(shards[0], out / SAFE_SINGLE, metadata)
    return [SAFE_SINGLE]
  names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
           for i in range(len(shards))]
  weight_map = {}
  for file_name, shard in zip(names, shards):
    _save(shard, out / file_name, metadata)
    weight_map.update({tensor: file_name for tensor in shard})
  index = {
      "metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
      "weight_map": dict(sorted(weight_map.items())),
  }
  with open(out / SAFE_INDEX, "w", encoding="utf-8") as f:
    json.dump(index, f, indent=2)
  logging.info("Wrote %d safetensors shards to %s", len(names), out)
  return names + [SAFE_INDEX]
