"""Lay out image-caption pairs as X-Fusion training sequences (NumPy).

Two sample types share one fixed length:
- understanding: `[BOI] image [EOI] caption [EOS]`, loss on the caption;
- generation: `caption [BOI] image [EOI]`, flow-matching loss on the image.
Rows are right-padded; every row has exactly one image, so all rows have the
same number of IMAGE slots, which the model relies on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from xfusion_jax.xfusion.model import BOI, EOI, IMAGE, TEXT


def sequence_length(max_caption_tokens: int, tokens_per_image: int) -> int:
  """Slots for one image with BOI/EOI plus a caption and an EOS token."""
  return max_caption_tokens + tokens_per_image + 3


def layout_batch(captions: Sequence[Sequence[int]], is_generation: np.ndarray,
                 tokens_per_image: int, seq_len: int, eos_id: int,
                 pad_id: int) -> dict[str, np.ndarray]:
  """Build the token-side arrays of a batch.

  Args:
    captions: token ids of each caption, without EOS.
    is_generation: `[batch]` bool, True for generation samples.
    tokens_per_image: IMAGE slots per image.
    seq_len: total slots per row.
    eos_id: appended after the caption of understanding samples.
    pad_id: token id at padding slots.

  Returns:
    `[batch, seq_len]` arrays: tokens, kinds, image_ids, positions, valid,
    caption_slots (True at caption tokens, for caption dropout), targets and
    loss_weights (the next token at each slot, and 1 where that prediction
    counts for the AR loss).
  """
  batch = len(captions)
  tokens = np.full((batch, seq_len), pad_id, np.int32)
  kinds = np.full((batch, seq_len), TEXT, np.int32)
  valid = np.zeros((batch, seq_len), bool)
  caption_slots = np.zeros((batch, seq_len), bool)
  targets = np.full((batch, seq_len), pad_id, np.int32)
  weights = np.zeros((batch, seq_len), np.float32)
  image = [BOI] + [IMAGE] * tokens_per_image + [EOI]
  for row, caption in enumerate(captions):
    caption = [int(t) for t in caption]
    if is_generation[row]:
      row_kinds = [TEXT] * len(caption) + image
      row_tokens = caption + [pad_id] * len(image)
      caption_start = 0
    else:
      row_kinds = image + [TEXT] * (len(caption) + 1)
      row_tokens = [pad_id] * len(image) + caption + [eos_id]
      caption_start = len(image)
      # Predict every caption token and the EOS, starting from the EOI slot.
      start = len(image) - 1
      targets[row, start:start + len(caption) + 1] = caption + [eos_id]
      weights[row, start:start + len(caption) + 1] = 1.0
    if len(row_kinds) > seq_len:
      raise ValueError(f"Row {row} needs {len(row_kinds)} slots, more than "
                       f"seq_len={seq_len}; truncate captions first.")
    n = len(row_kinds)
    kinds[row, :n] = row_kinds
    tokens[row, :n] = row_tokens
    valid[row, :n] = True
    caption_slots[row, caption_start:caption_start + len(caption)] = True
  image_ids = (kinds == IMAGE).astype(np.int32)
  positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32),
                              (batch, seq_len)).copy()
  return dict(tokens=tokens, kinds=kinds, image_ids=image_ids,
              positions=positions, valid=valid, caption_slots=caption_slots,
              targets=targets, loss_weights=weights)


def captions_from_tokens(tokens: np.ndarray, token_mask: np.ndarray,
                         eos_id: int) -> list[list[int]]:
  """Caption ids of each row of a data batch, without the trailing EOS."""
  captions = []
  for row, mask in zip(tokens, token_mask):
    ids = [int(t) for t in row[mask.astype(bool)]]
    if ids and ids[-1] == eos_id:
      ids = ids[:-1]
    captions.append(ids)
  return captions


def layout_both(captions: Sequence[Sequence[int]], tokens_per_image: int,
                seq_len: int, eos_id: int, pad_id: int) -> dict[str, np.ndarray]:
  """Lay out every example both ways, keys prefixed "und_" and "gen_".

  The train step picks one layout per row from its step RNG, so the
  understanding/generation mix stays a pure function of (seed, step) and a
  resumed run gets the same samples.
  """
  batch = len(captions)
  both = {}
  for prefix, is_generation in (("und_", False), ("gen_", True)):
    arrays = layout_batch(captions, np.full(batch, is_generation),
                          tokens_per_image, seq_len, eos_id, pad_id)
    both.update({prefix + key: value for key, value in arrays.items()})
  return both
