"""Caption tokenization with the frozen LLM's Hugging Face tokenizer."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from xfusion_jax.data import bad_records


class Tokenizer(Protocol):
  """The part of a Hugging Face tokenizer that captions need."""

  pad_token_id: int | None
  eos_token_id: int | None

  def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]:
    ...


def pad_id(tokenizer: Any) -> int:
  """Pad id of `tokenizer`, falling back to its EOS id (as SmolLM2 has)."""
  for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
    if candidate is not None:
      return int(candidate)
  raise ValueError("The tokenizer has neither a pad nor an EOS token id.")


def decode_caption(raw: bytes | str) -> str:
  """Return the caption as text; raise BadRecordError if unusable."""
  if isinstance(raw, bytes):
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise bad_records.BadRecordError(
          bad_records.BadRecordKind.INVALID_UTF8,
          f"caption is not valid UTF-8 ({e.reason} at byte {e.start})") from e
  else:
    text = raw
  text = text.strip()
  if not text:
    raise bad_records.BadRecordError(bad_records.BadRecordKind.EMPTY_CAPTION,
                                     "caption is empty")
  return text


def tokenize_caption(tokenizer: Tokenizer, text: str,
                     max_tokens: int) -> np.ndarray:
  """Token ids of `text` followed by EOS, int32 [n] with n <= max_tokens.

  No BOS is added: the caption continues a sequence that the model builds.
  Captions that do not fit are rejected instead of truncated, because a cut
  caption may describe something the image does not show.
  """
  ids = list(tokenizer.encode(text, add_special_tokens=False))
  if tokenizer.eos_token_id is not None:
    ids.append(int(tokenizer.eos_token_id))
  if len(ids) > max_tokens:
    raise bad_records.BadRecordError(
        bad_records.BadRecordKind.CAPTION_TOO_LONG,
        f"caption has {len(ids)} tokens with EOS, more than the "
        f"{max_tokens} allowed")
  return np.asarray(ids, dtype=np.int32)
