"""Evaluate a training workdir with the figures its task defines.

  python -m xfusion_jax.evaluate --workdir=DIR [--out=DIR]

The task comes from the workdir's checkpoint. An X-Fusion run on
Fashion-MNIST captions gets its generation, captioning and text-invariance
figures (`xfusion_jax.xfusion.evaluate`). A querier-aware run gets ROUGE-L
and BLEU-1..4 of its held-out replies, beside those of the zero-shot frozen
LLM and, with --ft_workdir, a plain LoRA fine-tune
(`xfusion_jax.querier.evaluate`). Results land in `WORKDIR/eval`.

  python -m xfusion_jax.evaluate --workdir=QUERIER_RUN --ft_workdir=FT_RUN
"""

from __future__ import annotations

import json
import sys

from absl import app
from absl import flags

from xfusion_jax import hostenv
from xfusion_jax.train import checkpointing


def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "Training workdir to evaluate.",
                      required=True)
  flags.DEFINE_string("out", None, "Output folder; default WORKDIR/eval.")
  flags.DEFINE_integer("images_per_class", 5,
                       "X-Fusion: images drawn per class prompt.")
  flags.DEFINE_integer("caption_examples", 200,
                       "X-Fusion: held-out test images captioned.")
  flags.DEFINE_float("cfg_scale", None,
                     "X-Fusion: guidance scale; default the run's "
                     "sample_cfg_scale.")
  flags.DEFINE_integer("steps", None,
                       "X-Fusion: sampler steps; default the run's "
                       "sample_steps.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_string("ft_workdir", None,
                      "Querier: workdir of the plain LoRA run "
                      "(config.specific_tower=False) on the same data.")
  flags.DEFINE_string("test_file", None,
                      "Querier: MQDialog file of held-out windows; default "
                      "test.json beside the run's train_file.")
  flags.DEFINE_integer("max_new_tokens", 64,
                       "Querier: reply budget in tokens.")
  flags.DEFINE_integer("batch_size", 8,
                       "Querier: windows per generation call.")
  flags.DEFINE_integer("max_windows", None,
                       "Querier: score this many windows, spread over the "
                       "test file; default all.")
  flags.DEFINE_integer("swap_windows", 32,
                       "Querier: windows asked again by another querier of "
                       "the same responder; 0 skips this.")
  flags.DEFINE_integer("bootstrap_resamples", 10000,
                       "Querier: bootstrap resamples of the queriers for the "
                       "interval of querier-aware minus FT ROUGE-L; 0 skips "
                       "the interval.")


def main(argv: list[str]) -> None:
  del argv
  values = flags.FLAGS
  try:
    _, metadata = checkpointing.read_metadata(values.workdir)
    task = json.loads(metadata["config"]).get("task")
    if task == "xfusion":
      from xfusion_jax.xfusion import evaluate  # pylint: disable=g-import-not-at-top
      results = evaluate.evaluate_workdir(
          values.workdir,
          evaluate.EvalConfig(images_per_class=values.images_per_class,
                              caption_examples=values.caption_examples,
                              cfg_scale=values.cfg_scale, steps=values.steps,
                              seed=values.seed),
          out_dir=values.out)
    elif task == "querier":
      from xfusion_jax.querier import evaluate as querier_evaluate  # pylint: disable=g-import-not-at-top
      results = querier_evaluate.evaluate_workdir(
          values.workdir,
          querier_evaluate.EvalConfig(
              test_file=values.test_file,
              max_new_tokens=values.max_new_tokens,
              batch_size=values.batch_size, max_windows=values.max_windows,
              swap_windows=values.swap_windows,
              bootstrap_resamples=values.bootstrap_resamples),
          ft_workdir=values.ft_workdir, out_dir=values.out)
      with open(results["table"], encoding="utf-8") as f:
        print(f.read())
    else:
      raise ValueError(f"{values.workdir} contains a run of task {task!r}, "
                       "which has no evaluation; evaluable tasks: xfusion, "
                       "querier.")
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  print(json.dumps(results, indent=2, ensure_ascii=False))


if __name__ == "__main__":
  hostenv.restart_with_hugepage_malloc()
  _define_flags()
  app.run(main)
