"""TFDS builder for Noto Color Emoji glyphs captioned with their Unicode names.

The font comes from the Debian package `fonts-noto-color-emoji`, fetched and
hash-checked by `xfusion_jax.assets`. Its glyphs are CBDT bitmaps, which
Pillow renders only at font size 109 with `embedded_color=True`; each glyph
is drawn on white and resized to `IMAGE_SIZE`.
"""

from __future__ import annotations

import pathlib
import unicodedata
from typing import Iterator

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont
import tensorflow_datasets as tfds

from xfusion_jax import assets

IMAGE_SIZE = 64
# The only size at which this font's bitmaps render; the glyph box is 136x128.
_FONT_SIZE = 109
_CANVAS_SIZE = 136
_FONT_PATH = "usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"

# Code point ranges searched for single-code-point emoji.
_RANGES = ((0x00A9, 0x00AE), (0x2100, 0x2BFF), (0x3000, 0x33FF),
           (0x1F000, 0x1FAFF))
# Regional indicators and skin-tone modifiers draw something on their own
# but their names ("regional indicator symbol letter a") are no captions.
_EXCLUDED = (range(0x1F1E6, 0x1F200), range(0x1F3FB, 0x1F400))

# Every TEST_EVERY-th emoji in code point order goes to the test split.
TEST_EVERY = 10


def default_source() -> pathlib.Path:
  """Fetch the pinned Debian package and return the font file."""
  return assets.fetch(assets.NOTO_EMOJI_DEB) / _FONT_PATH


def render(font: ImageFont.FreeTypeFont, char: str) -> np.ndarray | None:
  """Render one glyph as uint8 RGB [IMAGE_SIZE, IMAGE_SIZE, 3].

  Returns None when the font has no color glyph for `char` (blank canvas).
  """
  canvas = Image.new("RGB", (_CANVAS_SIZE, _CANVAS_SIZE), "white")
  draw = ImageDraw.Draw(canvas)
  try:
    draw.text((0, (_CANVAS_SIZE - 128) // 2), char, font=font,
              embedded_color=True)
  except OSError:
    return None
  pixels = np.asarray(canvas)
  if pixels.min() >= 250:
    return None
  resized = canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
  return np.asarray(resized, dtype=np.uint8)


def emoji_code_points() -> Iterator[int]:
  for start, end in _RANGES:
    for code_point in range(start, end + 1):
      if any(code_point in excluded for excluded in _EXCLUDED):
        continue
      yield code_point


def split_of(index: int) -> str:
  return "test" if index % TEST_EVERY == TEST_EVERY - 1 else "train"


class EmojiCaptions(tfds.core.GeneratorBasedBuilder):
  """Noto Color Emoji glyphs, RGB on white, captioned with Unicode names."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}

  def __init__(self, *, source: str | None = None, **kwargs):
    """Args: source: path of NotoColorEmoji.ttf; default: the package."""
    self._source = source
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            "Noto Color Emoji (OFL-1.1) glyphs from the Debian package "
            "fonts-noto-color-emoji, rendered RGB on white at "
            f"{IMAGE_SIZE}x{IMAGE_SIZE}, captioned with the lower-case "
            "Unicode character name. Every "
            f"{TEST_EVERY}th glyph in code point order is in the test split."),
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "image": tfds.features.Tensor(
                shape=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8),
            "caption": tfds.features.Text(),
            "label": tfds.features.Scalar(dtype=np.int64),
        }),
        homepage="https://github.com/googlefonts/noto-emoji",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The font comes from a pinned package, not a URL.
    source = pathlib.Path(self._source) if self._source else default_source()
    glyphs = list(self._render_all(source))
    return {
        split: self._generate_examples(glyphs, split)
        for split in ("train", "test")
    }

  def _render_all(self, font_path: pathlib.Path):
    font = ImageFont.truetype(str(font_path), _FONT_SIZE)
    for code_point in emoji_code_points():
      char = chr(code_point)
      name = unicodedata.name(char, "")
      if not name:
        continue
      image = render(font, char)
      if image is not None:
        yield code_point, name.lower(), image

  def _generate_examples(self, glyphs, split: str):
    for index, (code_point, name, image) in enumerate(glyphs):
      if split_of(index) != split:
        continue
      record_id = f"U+{code_point:04X}"
      yield record_id, {
          "id": record_id,
          "image": image,
          "caption": name,
          # The code point, so that a glyph can be found again.
          "label": code_point,
      }
