"""ROUGE-L and BLEU-1..4 of generated text, for English and Chinese.

Texts are tokenized by `metric_tokens`: every CJK ideograph is one token
(character level, the usual unit for Chinese) and every other run of
letters and digits is one lowercased word; punctuation is dropped. Mixed
text needs no language detection, because each script gets its own unit.

ROUGE-L is the LCS F-measure of `rouge-score` (Google's reimplementation
of ROUGE-1.5.5) per reply. BLEU-n is `sacrebleu`'s corpus BLEU with n-gram
orders 1..n (brevity penalty times the geometric mean of the clipped
precisions), over the pre-tokenized texts.
"""

from __future__ import annotations

import re
from typing import Sequence

from rouge_score import rouge_scorer
from rouge_score import tokenizers
import sacrebleu

# CJK Unified Ideographs, Extension A, Compatibility Ideographs and
# Extensions B-H (the supplementary planes 2 and 3).
_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
_TOKEN = re.compile(f"[{_CJK}]|(?:(?![{_CJK}])[^\\W_])+")

BLEU_ORDERS = (1, 2, 3, 4)


def metric_tokens(text: str) -> list[str]:
  """Split text into CJK characters and lowercased words, without punctuation."""
  return _TOKEN.findall(text.lower())


class _MetricTokenizer(tokenizers.Tokenizer):

  def tokenize(self, text: str) -> list[str]:
    return metric_tokens(text)


_ROUGE = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_MetricTokenizer())
_BLEU = {n: sacrebleu.BLEU(tokenize="none", max_ngram_order=n)
         for n in BLEU_ORDERS}


def rouge_l(hypothesis: str, reference: str) -> float:
  """Return the ROUGE-L F-measure in [0, 1]; 0 when either text has no token."""
  return _ROUGE.score(reference, hypothesis)["rougeL"].fmeasure


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str],
                max_order: int) -> float:
  """Return corpus BLEU with n-gram orders `1..max_order`, in [0, 100]."""
  if len(hypotheses) != len(references):
    raise ValueError(f"Got {len(hypotheses)} hypotheses but "
                     f"{len(references)} references; they must pair up.")
  hyps = [" ".join(metric_tokens(t)) for t in hypotheses]
  refs = [" ".join(metric_tokens(t)) for t in references]
  return _BLEU[max_order].corpus_score(hyps, [refs]).score


def score_replies(hypotheses: Sequence[str],
                  references: Sequence[str]) -> dict[str, float]:
  """Return `rouge_l` (the mean F-measure) and `bleu_1..4`, all in [0, 100]."""
  if not hypotheses:
    raise ValueError("No replies to score.")
  scores = {"rouge_l": 100 * sum(
      rouge_l(h, r) for h, r in zip(hypotheses, references)) / len(hypotheses)}
  for n in BLEU_ORDERS:
    scores[f"bleu_{n}"] = corpus_bleu(hypotheses, references, n)
  return scores
