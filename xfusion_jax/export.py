"""Export a trained model; the task comes from the workdir's checkpoint.

  python -m xfusion_jax.export --workdir=DIR --out=EXPORT_DIR

An X-Fusion run becomes the LLM as an HF folder plus its towers
(`xfusion_jax.xfusion.artifacts`). A querier run becomes the LLM as an HF
folder, the general tower's LoRA in PEFT format, and the specific tower and
heads in safetensors (`xfusion_jax.querier.artifacts`).
"""

import json
import sys

from absl import app
from absl import flags

from xfusion_jax.train import checkpointing
from xfusion_jax.xfusion import cli


def main(argv: list[str]) -> None:
  values = flags.FLAGS
  task = None
  if values.workdir:
    try:
      _, metadata = checkpointing.read_metadata(values.workdir)
    except FileNotFoundError as e:
      sys.exit(f"error: {e}")
    task = json.loads(metadata["config"]).get("task")
  if task != "querier":
    cli.export_main(argv)
    return
  from xfusion_jax.querier import artifacts  # pylint: disable=g-import-not-at-top
  if not values.out:
    raise app.UsageError("export requires --out.")
  try:
    artifacts.export(artifacts.load_workdir(values.workdir), values.out)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  print(values.out)


if __name__ == "__main__":
  app.run(main)
