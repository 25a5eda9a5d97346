"""Corpus BLEU of generated captions against reference captions.

Standard corpus BLEU: clipped n-gram precisions for n = 1..max_order,
summed over the corpus before dividing, are combined by a geometric mean
with uniform weights. The result is multiplied by the brevity penalty
exp(1 - r / c) when the candidate length c is below the reference length r.
The reference length of a sentence is the one of its references closest in
length to the candidate (the shorter on ties). No smoothing is applied, so
a corpus without a single matching n-gram of some order scores 0.

Text is lower-cased and split into words and single punctuation marks.
That tokenization is this module's own, so scores are comparable with each
other but not with figures from sacrebleu or other tools.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
import math
import re

_TOKEN = re.compile(r"\w+|[^\w\s]")


def tokenize(text: str) -> list[str]:
  """Split lower-cased text into words and single punctuation marks."""
  return _TOKEN.findall(text.lower())


def _ngrams(tokens: Sequence[str], order: int) -> collections.Counter:
  return collections.Counter(
      tuple(tokens[i:i + order]) for i in range(len(tokens) - order + 1))


def _closest_length(references: Sequence[Sequence[str]],
                    candidate_length: int) -> int:
  return min((abs(len(r) - candidate_length), len(r)) for r in references)[1]


def corpus_bleu(candidates: Sequence[str],
                references: Sequence[Sequence[str]],
                max_order: int = 4) -> float:
  """Compute corpus BLEU in [0, 1].

  Args:
    candidates: one generated text per example.
    references: for each example, one or more reference texts.
    max_order: the maximum n-gram length counted.

  Returns:
    The BLEU score; 0 when some n-gram order has no match in the corpus or
    every candidate is empty.

  Raises:
    ValueError: when the two lists differ in length, an example has no
      reference, or `max_order` is below 1.
  """
  if len(candidates) != len(references):
    raise ValueError(f"Got {len(candidates)} candidates but "
                     f"{len(references)} reference lists; pass one list of "
                     "references per candidate.")
  if max_order < 1:
    raise ValueError(f"max_order must be at least 1, got {max_order}.")
  matches = [0] * max_order
  totals = [0] * max_order
  candidate_length = 0
  reference_length = 0
  for index, (candidate, refs) in enumerate(zip(candidates, references)):
    if not refs:
      raise ValueError(f"Example {index} has no reference text.")
    tokens = tokenize(candidate)
    ref_tokens = [tokenize(r) for r in refs]
    candidate_length += len(tokens)
    reference_length += _closest_length(ref_tokens, len(tokens))
    for order in range(1, max_order + 1):
      counts = _ngrams(tokens, order)
      # Each n-gram counts at most as often as in the reference where it is
      # most frequent (the "clipped" count).
      ceiling = collections.Counter()
      for ref in ref_tokens:
        ceiling |= _ngrams(ref, order)
      matches[order - 1] += sum((counts & ceiling).values())
      totals[order - 1] += sum(counts.values())
  if candidate_length == 0 or min(matches) == 0:
    return 0.0
  log_precision = sum(math.log(m / t) for m, t in zip(matches, totals))
  log_precision /= max_order
  brevity = min(0.0, 1.0 - reference_length / candidate_length)
  return math.exp(log_precision + brevity)
