"""Command lines for trained X-Fusion models: generate/caption and export."""

from __future__ import annotations

import sys

from absl import app
from absl import flags
import jax
import numpy as np
from PIL import Image

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Training workdir (its latest checkpoint is used).")
_EXPORT_DIR = flags.DEFINE_string(
    "export_dir", None, "Export folder, instead of --workdir.")
_TASK = flags.DEFINE_enum("task", "generate", ["generate", "caption"],
                          "generate: images from --prompt; caption: text "
                          "for --image.")
_PROMPT = flags.DEFINE_string("prompt", None, "Caption to draw.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 4,
                                   "Images generated for the prompt.")
_CFG_SCALE = flags.DEFINE_float("cfg_scale", 5.5,
                                "Classifier-free guidance scale.")
_STEPS = flags.DEFINE_integer("steps", 30, "Euler steps of the sampler.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_IMAGE = flags.DEFINE_string("image", None, "Image file to caption.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 24,
                                       "Caption length limit in tokens.")
_OUT = flags.DEFINE_string("out", None,
                           "Output PNG (generate) or export folder (export).")


def _load():
  from xfusion_jax.xfusion import artifacts  # pylint: disable=g-import-not-at-top
  if bool(_WORKDIR.value) == bool(_EXPORT_DIR.value):
    raise app.UsageError("Give exactly one of --workdir and --export_dir.")
  if _WORKDIR.value:
    return artifacts.load_workdir(_WORKDIR.value)
  return artifacts.load_export(_EXPORT_DIR.value)


def _autoencoder(trained):
  from xfusion_jax.autoencoder import interface  # pylint: disable=g-import-not-at-top
  path = trained.settings.get("autoencoder")
  if not path:
    raise ValueError("The model records no autoencoder (config.autoencoder), "
                     "so latents cannot be turned into images or back.")
  return interface.load(path)


def _generate(trained) -> None:
  from xfusion_jax.xfusion import inference  # pylint: disable=g-import-not-at-top
  if not _PROMPT.value or not _OUT.value:
    raise app.UsageError("--task=generate requires --prompt and --out.")
  caption = trained.lm.tokenizer(_PROMPT.value)["input_ids"]
  latents = inference.generate_latents(
      trained.module, trained.frozen, trained.params,
      [caption] * _NUM_IMAGES.value, cfg_scale=_CFG_SCALE.value,
      steps=_STEPS.value, rng=jax.random.key(_SEED.value),
      pad_id=trained.lm.pad_token_id())
  images = np.asarray(_autoencoder(trained).decode(latents))
  grid = np.concatenate(list(images), axis=1)
  grid = np.clip((grid + 1.0) * 127.5, 0, 255).astype(np.uint8)
  if grid.shape[-1] == 1:
    grid = grid[..., 0]
  Image.fromarray(grid).save(_OUT.value)
  print(_OUT.value)


def _caption(trained) -> None:
  from xfusion_jax.xfusion import inference  # pylint: disable=g-import-not-at-top
  if not _IMAGE.value:
    raise app.UsageError("--task=caption requires --image.")
  autoencoder = _autoencoder(trained)
  h, w = trained.module.config.latent_size
  channels = 1 if autoencoder.config.in_channels == 1 else 3
  image = Image.open(_IMAGE.value).convert("L" if channels == 1 else "RGB")
  factor = autoencoder.config.downsample_factor
  image = image.resize((w * factor, h * factor), Image.BILINEAR)
  pixels = np.asarray(image, np.float32).reshape(h * factor, w * factor,
                                                 channels)
  latents = autoencoder.encode(pixels[None] / 127.5 - 1.0)
  tokens = inference.caption_latents(
      trained.module, trained.frozen, trained.params, latents,
      max_new_tokens=_MAX_NEW_TOKENS.value,
      eos_ids=trained.lm.eos_token_ids(), pad_id=trained.lm.pad_token_id())
  print(trained.lm.decode_tokens(tokens)[0])


def generate_main(argv: list[str]) -> None:
  del argv
  try:
    trained = _load()
    (_generate if _TASK.value == "generate" else _caption)(trained)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")


def export_main(argv: list[str]) -> None:
  del argv
  from xfusion_jax.xfusion import artifacts  # pylint: disable=g-import-not-at-top
  if not _OUT.value:
    raise app.UsageError("export requires --out.")
  try:
    artifacts.export(_load(), _OUT.value)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  print(_OUT.value)
