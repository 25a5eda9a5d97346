"""Score held-out replies of three systems: zero-shot, plain LoRA and querier.

For every held-out MQDialog window, each system writes the responder's
reply greedily (`inference.ReplyGenerator`), and the reply is scored
against the real one with ROUGE-L and BLEU-1..4 (`metrics`):

- zero-shot: the frozen LLM alone;
- FT: a plain LoRA fine-tune on the same data (a querier run with
  `specific_tower = False`), when its workdir is given;
- querier-aware: the run being evaluated.

Scores are given per querier (the `input_role` of the windows), as the
unweighted mean over queriers and over all windows, in one Markdown table
(`querier_eval.md`), plus `results.json` and every reply in
`replies.jsonl`.

Whether the querier-aware model beats FT: the per-querier ROUGE-L
differences are averaged, with a percentile bootstrap interval over
queriers (`paired_rouge_l`), so a gap smaller than the spread between
queriers is not read as a gain. With a gated merge, the mean weight the
gate gives the general tower at the reference reply tokens is reported
too: near 1, the specific tower hardly reaches the replies.

The same query from another querier: for some windows the querier's turns
are given to another querier of the same responder, and the trained systems
reply again. `querier_swap.jsonl` contains both replies, and the line
under the table counts the windows whose reply changed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from typing import Any, Sequence

from absl import logging
import numpy as np
from scipy import stats

from xfusion_jax.querier import artifacts
from xfusion_jax.querier import data as querier_data
from xfusion_jax.querier import inference
from xfusion_jax.metrics import text as metrics

TABLE_FILE = "querier_eval.md"
RESULTS_FILE = "results.json"
REPLIES_FILE = "replies.jsonl"
SWAP_FILE = "querier_swap.jsonl"
METRIC_NAMES = ("rouge_l",) + tuple(f"bleu_{n}" for n in metrics.BLEU_ORDERS)
_METRIC_TITLES = {"rouge_l": "R-L", "bleu_1": "B-1", "bleu_2": "B-2",
                  "bleu_3": "B-3", "bleu_4": "B-4"}
# With fewer resamples the 2.5% and 97.5% quantiles vary with the seed.
MIN_RESAMPLES = 1000
# A bootstrap over a handful of queriers gives an interval that looks
# exact but carries little information.
MIN_QUERIERS_FOR_INTERVAL = 5
# Per-querier differences within this are ties: the same replies scored in
# another order differ in the last bits.
_TIE = 1e-9
MEAN_OVER_QUERIERS = "mean over queriers"
ALL_WINDOWS = "all windows"


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Evaluation settings.

  Attributes:
    test_file: MQDialog file of held-out windows; None takes `test.json`
      (or `test.jsonl`) beside the run's `train_file`.
    max_new_tokens: reply budget in tokens.
    batch_size: windows per generation call.
    max_windows: score only this many windows, spread evenly over the
      file (None scores all).
    swap_windows: windows, spread evenly over the scored ones, that are
      asked again by another querier (0 skips this).
    bootstrap_resamples: resamples of the queriers for the interval of the
      querier-aware minus FT ROUGE-L (0 skips the interval).
  """

  test_file: str | None = None
  max_new_tokens: int = 64
  batch_size: int = 8
  max_windows: int | None = None
  swap_windows: int = 32
  bootstrap_resamples: int = 10000


def default_test_file(train_file: str) -> pathlib.Path:
  """Return the held-out file beside `train_file` (`train.json` -> `test.json`).

  Raises:
    FileNotFoundError: when there is none.
  """
  train = pathlib.Path(train_file)
  for name in ("test" + train.suffix, "test.json", "test.jsonl"):
    if (train.parent / name).is_file() and name != train.name:
      return train.parent / name
  raise FileNotFoundError(
      f"No test.json or test.jsonl beside the run's train_file {train}; "
      "give the held-out windows with --test_file.")


def select_windows(records: list[dict[str, Any]],
                   max_windows: int | None) -> list[dict[str, Any]]:
  """Return at most `max_windows` records, spread evenly over the list."""
  if max_windows is None or max_windows >= len(records):
    return records
  indices = np.linspace(0, len(records) - 1, max_windows).round().astype(int)
  return [records[i] for i in sorted(set(indices.tolist()))]


def swap_querier(record: dict[str, Any], other: str) -> dict[str, Any]:
  """Return a copy of `record` in which `other` speaks the querier's turns."""
  querier = record["input_role"]
  turns = [{**turn, "from": other if turn["from"] == querier else turn["from"]}
           for turn in record["conversations"]]
  return {**record, "conversations": turns, "input_role": other}


def querier_swaps(records: Sequence[dict[str, Any]], count: int
                  ) -> list[tuple[int, dict[str, Any]]]:
  """Pick up to `count` records and give each to another querier.

  The other querier is the next one, in sorted order, of the queriers that
  the same responder replies to in `records` who do not speak in the
  window, so no two speakers share a name. Records without such a querier
  are skipped. Returns `(index into records, swapped record)`.
  """
  queriers = {}
  for record in records:
    queriers.setdefault(record["target_role"], set()).add(record["input_role"])
  others = {}
  for i, record in enumerate(records):
    names = sorted(queriers[record["target_role"]])
    start = names.index(record["input_role"]) + 1
    speakers = {turn["from"] for turn in record["conversations"]}
    free = [name for name in names[start:] + names[:start]
            if name not in speakers]
    if free:
      others[i] = free[0]
  candidates = sorted(others)
  if not candidates or count <= 0:
    return []
  picks = np.linspace(0, len(candidates) - 1, min(count, len(candidates)))
  chosen = [candidates[k] for k in sorted(set(picks.round().astype(int)))]
  return [(i, swap_querier(records[i], others[i])) for i in chosen]


def score_table(replies: dict[str, Sequence[str]],
                records: Sequence[dict[str, Any]]
                ) -> dict[str, dict[str, dict[str, float]]]:
  """Return `{system: {row: {metric: value}}}` with per-querier rows.

  Rows are each querier, `MEAN_OVER_QUERIERS` (unweighted) and
  `ALL_WINDOWS` (every window pooled). All values are in [0, 100].
  """
  references = [r["conversations"][-1]["value"] for r in records]
  queriers = sorted({r["input_role"] for r in records})
  table = {}
  for system, texts in replies.items():
    rows = {}
    for querier in queriers:
      chosen = [i for i, r in enumerate(records) if r["input_role"] == querier]
      rows[querier] = metrics.score_replies([texts[i] for i in chosen],
                                            [references[i] for i in chosen])
    rows[MEAN_OVER_QUERIERS] = {
        m: float(np.mean([rows[q][m] for q in queriers]))
        for m in METRIC_NAMES}
    rows[ALL_WINDOWS] = metrics.score_replies(list(texts), references)
    table[system] = rows
  return table


def check_resamples(resamples: int) -> None:
  """Raise ValueError unless `resamples` is 0 or at least `MIN_RESAMPLES`."""
  if resamples < 0 or 0 < resamples < MIN_RESAMPLES:
    raise ValueError(
        f"--bootstrap_resamples={resamples} is invalid; pass at least "
        f"{MIN_RESAMPLES} for a stable interval, or 0 to skip it.")


def paired_rouge_l(table: dict[str, dict[str, dict[str, float]]],
                   system: str, baseline: str, resamples: int,
                   confidence: float = 0.95, seed: int = 0
                   ) -> dict[str, Any]:
  """Compare two systems of `score_table` querier by querier on ROUGE-L.

  The difference is `system - baseline` per querier, and its mean equals the
  difference of the two `MEAN_OVER_QUERIERS` rows. The interval is the
  percentile bootstrap of that mean over queriers drawn with replacement,
  so it reflects how much the gap depends on which queriers were held out
  (not the run-to-run spread of training).

  Returns:
    `mean`, the interval `low` to `high`, `confidence`, `resamples`,
    `queriers`, and the counts of queriers where `system` is `higher`,
    `lower` or `equal`. `low` and `high` equal `mean` when every querier
    has the same difference. They are None when `resamples` is 0 or there
    are fewer than `MIN_QUERIERS_FOR_INTERVAL` queriers.

  Raises:
    ValueError: when `resamples` is neither 0 nor at least `MIN_RESAMPLES`.
  """
  check_resamples(resamples)
  queriers = [row for row in table[system]
              if row not in (MEAN_OVER_QUERIERS, ALL_WINDOWS)]
  diffs = np.array([table[system][q]["rouge_l"] - table[baseline][q]["rouge_l"]
                    for q in queriers])
  diffs[np.abs(diffs) <= _TIE] = 0.0
  mean = float(diffs.mean())
  if not resamples or len(queriers) < MIN_QUERIERS_FOR_INTERVAL:
    low = high = None
  elif np.ptp(diffs) == 0:
    # scipy reports NaN for a constant sample, whose resamples all have this
    # mean.
    low = high = mean
  else:
    # Batches of resamples keep the index array small whatever the count.
    interval = stats.bootstrap(
        (diffs,), np.mean, n_resamples=resamples, batch=1000,
        confidence_level=confidence, method="percentile",
        rng=np.random.default_rng(seed)).confidence_interval
    low, high = float(interval.low), float(interval.high)
  return {"system": system, "baseline": baseline, "mean": mean, "low": low,
          "high": high, "confidence": confidence, "resamples": resamples,
          "queriers": len(queriers), "higher": int((diffs > 0).sum()),
          "lower": int((diffs < 0).sum()), "equal": int((diffs == 0).sum())}


def _signed(value: float) -> str:
  """Format a difference with its sign, and a bare 0.00 when it rounds to 0."""
  text = f"{value:+.2f}"
  return "0.00" if float(text) == 0 else text


def paired_line(paired: dict[str, Any]) -> str:
  """Return the sentence under the table that states `paired_rouge_l`."""
  count = paired["queriers"]
  line = (f"{paired['system']} minus {paired['baseline']}, mean ROUGE-L "
          f"over queriers: {_signed(paired['mean'])}")
  if paired["low"] is not None:
    line += (f" ({paired['confidence']:.0%} bootstrap interval over the "
             f"{count} queriers, {paired['resamples']} resamples: "
             f"{_signed(paired['low'])} to {_signed(paired['high'])})")
  elif paired["resamples"]:
    line += (f" (no interval: it needs at least "
             f"{MIN_QUERIERS_FOR_INTERVAL} queriers)")
  return line + (f". Of the {count} {'querier' if count == 1 else 'queriers'}"
                 f", {paired['system']} is higher for {paired['higher']}, "
                 f"lower for {paired['lower']} and equal for "
                 f"{paired['equal']}.\n")


def markdown_table(table: dict[str, dict[str, dict[str, float]]],
                   counts: dict[str, int]) -> str:
  """Render `score_table` output: one row per querier, five columns a system."""
  systems = list(table)
  header = ["querier", "windows"] + [
      f"{system} {_METRIC_TITLES[m]}" for system in systems
      for m in METRIC_NAMES]
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
  for row in table[systems[0]]:
    count = counts.get(row, counts[ALL_WINDOWS])
    cells = [row, str(count)] + [f"{table[s][row][m]:.2f}" for s in systems
                                 for m in METRIC_NAMES]
    if row in (MEAN_OVER_QUERIERS, ALL_WINDOWS):
      cells[0] = f"**{row}**"
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _generate(name: str, generator: inference.ReplyGenerator,
              records: list[dict[str, Any]]) -> list[str]:
  start = time.perf_counter()
  replies = generator(records)
  logging.info("%s: %d replies in %.1f s.", name, len(replies),
               time.perf_counter() - start)
  return replies


def evaluate_workdir(workdir: str | os.PathLike[str], config: EvalConfig,
                     ft_workdir: str | os.PathLike[str] | None = None,
                     out_dir: str | os.PathLike[str] | None = None
                     ) -> dict[str, Any]:
  """Score the querier-aware run in `workdir` against zero-shot and FT.

  Args:
    workdir: a querier training workdir with the specific tower.
    config: evaluation settings.
    ft_workdir: the plain LoRA run (`specific_tower = False`) on the same
      data beside the same frozen LLM; without it the table has no FT
      columns.
    out_dir: output folder; default `WORKDIR/eval`.

  Returns:
    The contents of `results.json`.

  Raises:
    ValueError: when a workdir contains the wrong kind of run.
    FileNotFoundError: when a checkpoint or the test file is missing.
  """
  if config.swap_windows < 0:
    raise ValueError(f"--swap_windows={config.swap_windows} is negative; "
                     "pass 0 to skip the querier swap, or a window count.")
  # Checked before any reply is generated, so a bad flag costs nothing.
  check_resamples(config.bootstrap_resamples)
  if config.max_windows is not None and config.max_windows < 1:
    raise ValueError(f"--max_windows={config.max_windows} must be at least "
                     "1; leave it unset to score every window.")
  if config.batch_size < 1:
    raise ValueError(f"--batch_size={config.batch_size} must be at least 1.")
  trained = artifacts.load_workdir(workdir)
  if not trained.specific_tower:
    raise ValueError(
        f"{workdir} is a plain LoRA run (specific_tower = False); pass the "
        "querier-aware run as --workdir and this one as --ft_workdir.")
  run_config = trained.run_config
  test_file = pathlib.Path(config.test_file or
                           default_test_file(run_config["train_file"]))
  records = select_windows(
      [r.to_json() for r in querier_data.read_mqdialog(test_file)],
      config.max_windows)
  if not records:
    raise ValueError(f"{test_file} contains no windows.")
  seq_len = int(run_config["seq_len"])
  common = dict(
      prompt_tokens=max(seq_len - config.max_new_tokens, seq_len // 2),
      max_new_tokens=config.max_new_tokens, batch_size=config.batch_size)
  logging.info("Scoring %d windows of %s.", len(records), test_file)

  generators = {"zero-shot": inference.ReplyGenerator(trained.lm, **common)}
  if ft_workdir is not None:
    try:
      ft = artifacts.load_workdir(ft_workdir)
    except FileNotFoundError as error:
      raise FileNotFoundError(f"--ft_workdir: {error}") from error
    if ft.specific_tower:
      raise ValueError(f"--ft_workdir {ft_workdir} has the specific tower; "
                       "FT is a run with config.specific_tower = False.")
    if ft.frozen_source["weights_sha256"] != trained.frozen_source[
        "weights_sha256"]:
      raise ValueError(f"{ft_workdir} was trained beside another frozen LLM "
                       f"({ft.frozen_source['path']}) than {workdir}.")
    generators["FT"] = inference.ReplyGenerator(trained.lm, ft.module,
                                                ft.params, **common)
  generators["querier-aware"] = inference.ReplyGenerator(
      trained.lm, trained.module, trained.params, **common)
  replies = {name: _generate(name, generator, records)
             for name, generator in generators.items()}

  table = score_table(replies, records)
  counts = {q: sum(r["input_role"] == q for r in records)
            for q in {r["input_role"] for r in records}}
  counts[MEAN_OVER_QUERIERS] = counts[ALL_WINDOWS] = len(records)
  out = pathlib.Path(out_dir) if out_dir else pathlib.Path(workdir) / "eval"
  out.mkdir(parents=True, exist_ok=True)
  markdown = markdown_table(table, counts)
  paired = None
  if "FT" in table:
    paired = paired_rouge_l(table, "querier-aware", "FT",
                            config.bootstrap_resamples)
    markdown += "\n" + paired_line(paired)
  gate = None
  if trained.module.gated_merge:
    # A gate that shuts the specific tower out leaves FT's model behind.
    weights = inference.reply_general_weights(
        trained.lm, trained.module, trained.params, records, seq_len,
        config.batch_size)
    p10, p50, p90 = np.percentile(weights, [10, 50, 90])
    gate = {"mean": float(weights.mean()), "p10": float(p10),
            "p50": float(p50), "p90": float(p90), "tokens": int(weights.size)}
    markdown += (
        f"\nThe gate gave the general tower a mean weight of "
        f"{gate['mean']:.3f} at the {gate['tokens']} reference reply tokens "
        f"(10th to 90th percentile: {p10:.3f} to {p90:.3f}).\n")
  swaps = querier_swaps(records, config.swap_windows)
  changed = {}
  # A file of an earlier evaluation must not pass for this one's.
  (out / SWAP_FILE).unlink(missing_ok=True)
  if config.swap_windows and not swaps:
    logging.warning("No window was asked again by another querier: no "
                    "responder has a querier outside some window's speakers.")
  if swaps:
    swapped = [record for _, record in swaps]
    trained_systems = [name for name in generators if name != "zero-shot"]
    swap_replies = {name: _generate(f"{name}, other querier",
                                    generators[name], swapped)
                    for name in trained_systems}
    changed = {name: sum(swap_replies[name][k] != replies[name][i]
                         for k, (i, _) in enumerate(swaps))
               for name in trained_systems}
    markdown += ("\nThe same query from another querier of the same "
                 "responder changed the reply in " + "; ".join(
                     f"{count} of {len(swaps)} windows ({name})"
                     for name, count in changed.items()) + ".\n")
    with open(out / SWAP_FILE, "w", encoding="utf-8") as f:
      for k, (i, record) in enumerate(swaps):
        f.write(json.dumps({
            "window": i, "target_role": record["target_role"],
            "input_role": records[i]["input_role"],
            "other_querier": record["input_role"],
            "query": record["conversations"][-2]["value"]
            if len(record["conversations"]) > 1 else "",
            **{name: {"reply": replies[name][i],
                      "other_querier_reply": swap_replies[name][k]}
               for name in trained_systems}}, ensure_ascii=False) + "\n")
  (out / TABLE_FILE).write_text(markdown, encoding="utf-8")
  with open(out / REPLIES_FILE, "w", encoding="utf-8") as f:
    for i, record in enumerate(records):
      f.write(json.dumps({
          "input_role": record["input_role"],
          "target_role": record["target_role"],
          "reference": record["conversations"][-1]["value"],
          **{system: texts[i] for system, texts in replies.items()}},
                         ensure_ascii=False) + "\n")
  results = {"workdir": str(workdir), "ft_workdir": ft_workdir and str(
      ft_workdir), "test_file": str(test_file), "windows": len(records),
             "max_new_tokens": config.max_new_tokens, "scores": table,
             "paired_rouge_l": paired, "gate_general_weight": gate,
             "querier_swap": {"windows": len(swaps), "changed": changed},
             "table": str(out / TABLE_FILE)}
  with open(out / RESULTS_FILE, "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2, ensure_ascii=False)
  return results
