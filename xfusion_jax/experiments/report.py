"""Write an ablation study's Markdown table, plots and JSON of all figures."""

from __future__ import annotations

import json
import pathlib
from typing import Any

from matplotlib.figure import Figure

RESULTS_JSON = "results.json"
RESULTS_MARKDOWN = "results.md"

# (key in the figures, column title, the better direction).
METRICS = (
    ("generation_accuracy", "generation accuracy", "higher"),
    ("frechet_distance", "Fréchet distance on EfficientNet-Lite0 features",
     "lower"),
    ("caption_accuracy", "caption accuracy", "higher"),
    ("bleu4", "BLEU-4", "higher"),
    ("perplexity_xfusion", "perplexity, X-Fusion text-only", "lower"),
    ("perplexity_base_llm", "perplexity, base LLM", "lower"),
)


def plot_file(key: str) -> str:
  return f"{key}.png"


def _format(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value)


def _final(checkpoints: list[dict[str, Any]]) -> dict[str, Any] | None:
  return max(checkpoints, key=lambda c: c["step"]) if checkpoints else None


def markdown_table(results: dict[str, Any]) -> str:
  """Render the results as Markdown: final figures, then every checkpoint."""
  columns = [title for _, title, _ in METRICS]
  lines = [
      f"# Ablation study: {results['study']}",
      "",
      f"Every arm trained {results['steps']} steps with seed "
      f"{results['seed']} on the same data; figures at checkpoints "
      f"{', '.join(map(str, results['eval_steps']))}.",
      "",
      "## Final checkpoint",
      "",
      "| arm | config | training tokens | " + " | ".join(columns) + " |",
      "|" + "---|" * (len(columns) + 3),
  ]
  for name, arm in results["arms"].items():
    final = _final(arm["checkpoints"])
    config = ", ".join(f"{k}={v}" for k, v in arm["overrides"].items())
    if final is None:
      lines.append(f"| {name} | {config} | not evaluated |" +
                   " |" * len(columns))
      continue
    cells = [_format(final[key]) for key, _, _ in METRICS]
    lines.append(f"| {name} | {config} | {final['training_tokens']} | " +
                 " | ".join(cells) + " |")
  lines += [
      "",
      "Better: " + "; ".join(f"{title} {direction}"
                             for _, title, direction in METRICS) + ".",
      "",
      "## Every checkpoint",
      "",
      "| arm | step | training tokens | " + " | ".join(columns) + " |",
      "|" + "---|" * (len(columns) + 3),
  ]
  for name, arm in results["arms"].items():
    for point in sorted(arm["checkpoints"], key=lambda c: c["step"]):
      cells = [_format(point[key]) for key, _, _ in METRICS]
      lines.append(f"| {name} | {point['step']} | {point['training_tokens']}"
                   " | " + " | ".join(cells) + " |")
  lines += ["", "## Plots", ""]
  lines += [f"![{title}]({plot_file(key)})" for key, title, _ in METRICS]
  return "\n".join(lines) + "\n"


def plot_metric(results: dict[str, Any], key: str, title: str,
                path: pathlib.Path) -> None:
  """Plot one metric against training tokens, one line per arm."""
  figure = Figure(figsize=(6.4, 4.0))
  axes = figure.subplots()
  for name, arm in results["arms"].items():
    points = sorted(arm["checkpoints"], key=lambda c: c["step"])
    if points:
      axes.plot([p["training_tokens"] for p in points],
                [p[key] for p in points], marker="o", label=name)
  axes.set_xlabel("training tokens")
  axes.set_ylabel(title)
  axes.set_title(f"{results['study']}: {title}")
  axes.grid(alpha=0.3)
  if axes.lines:
    axes.legend(fontsize="small")
  figure.tight_layout()
  figure.savefig(path, dpi=100)


def write_report(out: pathlib.Path, results: dict[str, Any]) -> None:
  """Write results.json, results.md and one PNG per metric into `out`."""
  out.mkdir(parents=True, exist_ok=True)
  (out / RESULTS_JSON).write_text(json.dumps(results, indent=2) + "\n",
                                  encoding="utf-8")
  (out / RESULTS_MARKDOWN).write_text(markdown_table(results),
                                      encoding="utf-8")
  for key, title, _ in METRICS:
    plot_metric(results, key, title, out / plot_file(key))
