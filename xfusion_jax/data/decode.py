"""Per-record decoding and checks: stored record -> model-ready example.

An example is a dict of numpy arrays:
  "image": float32 [H, W, C] in [-1, 1] (image datasets), or
  "latents": float32 [h, w, c], a sample of the scaled autoencoder posterior
    (latent datasets written by `encode_latents`);
  "encoder_features": float32 [patches, dim], a frozen encoder's features of
    the clean image (latent datasets written with a feature encoder);
  "tokens": int32 [L] caption ids then EOS, padded with the pad id;
  "token_mask": bool [L], True on caption ids and EOS;
  "label": int32 [], class label, or -1 where the dataset has none.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import numpy as np
from PIL import Image

from xfusion_jax.data import bad_records
from xfusion_jax.data import tokenize

_Kind = bad_records.BadRecordKind

# Pillow modes and their channel counts. Palette, CMYK and 16-bit images are
# converted first, and transparency is composited on white. A grayscale image
# where RGB is expected, or the reverse, is a wrong channel count.
_MODE_CHANNELS = {"L": 1, "RGB": 3}
_CONVERTIBLE = {"P": "RGBA", "PA": "RGBA", "CMYK": "RGB", "I;16": "L",
                "1": "L"}


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """Options of the record-to-example step.

  Attributes:
    image_size: output height and width; None keeps the stored size (raw
      tensors only, because encoded images vary in size).
    image_channels: expected channel count, 1 or 3.
    max_caption_tokens: token budget L, including EOS.
    random_flip: flip images left-right with probability 1/2.
    pad_tokens: pad "tokens" to L; False keeps them variable length, which
      packing needs.
  """

  image_size: int | None = None
  image_channels: int = 3
  max_caption_tokens: int = 32
  random_flip: bool = False
  pad_tokens: bool = True


def _to_channels(image: Image.Image, channels: int) -> Image.Image:
  if image.mode in _CONVERTIBLE:
    image = image.convert(_CONVERTIBLE[image.mode])
  if image.mode in ("RGBA", "LA"):
    # Alpha is not a color channel, so it is dropped by compositing on
    # white, and the color mode stays (LA -> L, RGBA -> RGB).
    background = Image.new("RGBA", image.size, "white")
    composite = Image.alpha_composite(background, image.convert("RGBA"))
    image = composite.convert(image.mode[:-1])
  if _MODE_CHANNELS.get(image.mode) != channels:
    raise bad_records.BadRecordError(
        _Kind.WRONG_CHANNELS,
        f"image mode {image.mode} cannot give {channels} channels")
  return image


def _center_square(image: Image.Image) -> Image.Image:
  width, height = image.size
  side = min(width, height)
  left, top = (width - side) // 2, (height - side) // 2
  return image.crop((left, top, left + side, top + side))


def decode_image_bytes(data: bytes, config: DecodeConfig) -> np.ndarray:
  """Decode encoded image bytes to uint8 [S, S, C]; S = config.image_size."""
  if config.image_size is None:
    raise ValueError("image_size must be set for datasets of encoded images.")
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    # Pillow raises OSError for truncated files and unknown formats and
    # SyntaxError for some broken headers.
    raise bad_records.BadRecordError(_Kind.CORRUPT_IMAGE,
                                     f"cannot decode image: {e}") from e
  image = _to_channels(image, config.image_channels)
  image = _center_square(image).resize(
      (config.image_size, config.image_size), Image.Resampling.BICUBIC)
  pixels = np.asarray(image, dtype=np.uint8)
  return pixels.reshape(config.image_size, config.image_size,
                        config.image_channels)


def check_image_tensor(pixels: np.ndarray, config: DecodeConfig) -> np.ndarray:
  """Check a stored uint8 [H, W, C] image and resize it to image_size."""
  if pixels.ndim != 3 or pixels.dtype != np.uint8:
    raise bad_records.BadRecordError(
        _Kind.WRONG_SHAPE,
        f"image has shape {pixels.shape} and dtype {pixels.dtype}; expected "
        "uint8 [H, W, C]")
  if pixels.shape[-1] != config.image_channels:
    raise bad_records.BadRecordError(
        _Kind.WRONG_CHANNELS,
        f"image has {pixels.shape[-1]} channels, expected "
        f"{config.image_channels}")
  size = config.image_size
  if size is None or pixels.shape[:2] == (size, size):
    return pixels
  image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
  resized = _center_square(image).resize((size, size),
                                         Image.Resampling.BICUBIC)
  return np.asarray(resized, dtype=np.uint8).reshape(size, size, -1)


def _latents(record: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
  mean = np.asarray(record["latent_mean"], dtype=np.float32)
  logvar = np.asarray(record["latent_logvar"], dtype=np.float32)
  noise = rng.standard_normal(mean.shape, dtype=np.float32)
  return mean + np.exp(0.5 * logvar) * noise


def _tokens(raw_caption: bytes | str, tokenizer: tokenize.Tokenizer,
            config: DecodeConfig) -> dict[str, np.ndarray]:
  text = tokenize.decode_caption(raw_caption)
  ids = tokenize.tokenize_caption(tokenizer, text, config.max_caption_tokens)
  if not config.pad_tokens:
    return {"tokens": ids}
  length = config.max_caption_tokens
  tokens = np.full((length,), tokenize.pad_id(tokenizer), dtype=np.int32)
  tokens[:len(ids)] = ids
  mask = np.zeros((length,), dtype=bool)
  mask[:len(ids)] = True
  return {"tokens": tokens, "token_mask": mask}


def decode_record(record: dict[str, Any], rng: np.random.Generator,
                  tokenizer: tokenize.Tokenizer | None,
                  config: DecodeConfig) -> dict[str, np.ndarray]:
  """Turn one stored record into an example; raise BadRecordError if bad.

  Args:
    record: a record as `tfds.data_source` returns it.
    rng: generator for the augmentation and the latent sample, seeded from
      the record's position in the stream so that a restored iterator
      repeats them.
    tokenizer: the LLM's tokenizer; None checks the caption but leaves out
      "tokens" and "token_mask", as autoencoder training needs.
    config: decode options.
  """
  if tokenizer is None:
    tokenize.decode_caption(record["caption"])
    example = {}
  else:
    example = _tokens(record["caption"], tokenizer, config)
  if "latent_mean" in record:
    example["latents"] = _latents(record, rng)
    if "encoder_features" in record:
      example["encoder_features"] = np.asarray(record["encoder_features"],
                                               dtype=np.float32)
  else:
    if "image_bytes" in record:
      pixels = decode_image_bytes(record["image_bytes"], config)
    else:
      pixels = check_image_tensor(np.asarray(record["image"]), config)
    if config.random_flip and rng.random() < 0.5:
      pixels = pixels[:, ::-1]
    example["image"] = pixels.astype(np.float32) / 127.5 - 1.0
  example["label"] = np.asarray(record.get("label", -1), dtype=np.int32)
  return example
