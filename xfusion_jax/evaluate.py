"""Evaluate a training workdir with the figures its task defines.

  python -m xfusion_jax.evaluate --workdir=DIR [--out=DIR]

The task comes from the workdir's checkpoint: an X-Fusion run on
Fashion-MNIST captions gets its generation, captioning and text-invariance
figures (`xfusion_jax.xfusion.evaluate`); results land in `WORKDIR/eval`.
"""

from __future__ import annotations

import json
import sys

from absl import app
from absl import flags

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
    else:
      raise ValueError(f"{values.workdir} holds a run of task {task!r}, "
                       "which has no evaluation; evaluable task: xfusion.")
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
