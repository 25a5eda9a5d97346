"""ROUGE-L and BLEU of replies, against hand-worked values and a reference."""

import collections
import math

import pytest

from xfusion_jax.querier import evaluate
from xfusion_jax.metrics import text as metrics


def reference_lcs(a, b):
  table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
  for i, x in enumerate(a):
    for j, y in enumerate(b):
      table[i + 1][j + 1] = (table[i][j] + 1 if x == y else
                             max(table[i][j + 1], table[i + 1][j]))
  return table[-1][-1]


def reference_rouge_l(hyp_tokens, ref_tokens):
  lcs = reference_lcs(hyp_tokens, ref_tokens)
  if lcs == 0:
    return 0.0
  precision, recall = lcs / len(hyp_tokens), lcs / len(ref_tokens)
  return 2 * precision * recall / (precision + recall)


def reference_bleu(hyps, refs, max_order):
  """Corpus BLEU from its definition: clipped n-gram precisions, brevity."""
  matches = [0] * max_order
  totals = [0] * max_order
  hyp_len = ref_len = 0
  for hyp, ref in zip(hyps, refs):
    hyp_len += len(hyp)
    ref_len += len(ref)
    for n in range(1, max_order + 1):
      hyp_ngrams = collections.Counter(
          tuple(hyp[i:i + n]) for i in range(len(hyp) - n + 1))
      ref_ngrams = collections.Counter(
          tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
      matches[n - 1] += sum(min(c, ref_ngrams[g])
                            for g, c in hyp_ngrams.items())
      totals[n - 1] += max(len(hyp) - n + 1, 0)
  if min(matches) == 0:
    return 0.0
  log_precision = sum(math.log(m / t) for m, t in zip(matches, totals))
  brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
  return 100 * brevity * math.exp(log_precision / max_order)


@pytest.mark.parametrize("text,tokens", [
    ("Good my lord, how does your honour?",
     ["good", "my", "lord", "how", "does", "your", "honour"]),
    ("宝玉笑道：“好妹妹。”", ["宝", "玉", "笑", "道", "好", "妹", "妹"]),
    ("OK，宝玉x2！", ["ok", "宝", "玉", "x2"]),
    ("word中文", ["word", "中", "文"]),
    ("…！？", []),
])
def test_metric_tokens(text, tokens):
  assert metrics.metric_tokens(text) == tokens


def test_rouge_l_hand_worked_english():
  # LCS "the cat on the mat" has 5 of 6 tokens in both texts.
  score = metrics.rouge_l("The cat sat on the mat.", "the cat is on the mat")
  assert score == pytest.approx(5 / 6)


def test_rouge_l_hand_worked_chinese():
  # LCS 我爱天安门: precision 5/5, recall 5/7, F = 2 * 5/7 / (1 + 5/7).
  score = metrics.rouge_l("我爱天安门", "我爱北京天安门")
  assert score == pytest.approx(10 / 12)


def test_rouge_l_empty_reply_is_zero():
  assert metrics.rouge_l("", "我爱北京天安门") == 0.0
  assert metrics.rouge_l("……", "words") == 0.0


def test_bleu_hand_worked():
  # Unigrams 5/6 and bigrams 3/5 match, equal lengths: sqrt(1/2).
  hyp, ref = ["the cat sat on the mat"], ["the cat is on the mat"]
  assert metrics.corpus_bleu(hyp, ref, 1) == pytest.approx(100 * 5 / 6)
  assert metrics.corpus_bleu(hyp, ref, 2) == pytest.approx(100 * 0.5**0.5)
  # Chinese: 5 of 5 characters, brevity exp(1 - 7/5).
  assert metrics.corpus_bleu(["我爱天安门"], ["我爱北京天安门"], 1) == (
      pytest.approx(100 * math.exp(-0.4)))


def test_metrics_match_reference_on_mixed_corpus():
  hyps = ["I pray thee, do not mock me, fellow-student.",
          "宝玉笑道：“好妹妹，你别恼，我再不说了。”",
          "Words, words, words and more words.",
          "黛玉冷笑道：“我也不知道。”"]
  refs = ["I pray thee do not mock me fellow student I think it was",
          "宝玉笑道：“好妹妹，千万饶我这一遭，原是我说错了。”",
          "Words, words, words.",
          "黛玉道：“你又来了，我不知道什么金什么玉的。”"]
  hyp_tokens = [metrics.metric_tokens(t) for t in hyps]
  ref_tokens = [metrics.metric_tokens(t) for t in refs]
  for hyp, ref, h, r in zip(hyps, refs, hyp_tokens, ref_tokens):
    assert metrics.rouge_l(hyp, ref) == pytest.approx(reference_rouge_l(h, r))
  for n in metrics.BLEU_ORDERS:
    assert metrics.corpus_bleu(hyps, refs, n) == pytest.approx(
        reference_bleu(hyp_tokens, ref_tokens, n)), n


def test_bleu_rejects_unpaired_lists():
  with pytest.raises(ValueError, match="pair up"):
    metrics.corpus_bleu(["a"], ["a", "b"], 4)


def test_score_table_rows_and_means():
  records = [
      {"input_role": q, "target_role": "R",
       "conversations": [{"from": q, "value": "?"},
                         {"from": "R", "value": ref}]}
      for q, ref in (("A", "我爱北京天安门"), ("A", "好妹妹"),
                     ("B", "the cat is on the mat"))]
  replies = {"x": ["我爱天安门", "好妹妹", "the cat sat on the mat"]}
  table = evaluate.score_table(replies, records)["x"]
  assert table["A"]["rouge_l"] == pytest.approx(100 * (10 / 12 + 1) / 2)
  assert table["B"]["rouge_l"] == pytest.approx(100 * 5 / 6)
  assert table[evaluate.MEAN_OVER_QUERIERS]["rouge_l"] == pytest.approx(
      (table["A"]["rouge_l"] + table["B"]["rouge_l"]) / 2)
  assert table[evaluate.ALL_WINDOWS]["rouge_l"] == pytest.approx(
      100 * (10 / 12 + 1 + 5 / 6) / 3)
  markdown = evaluate.markdown_table(
      {"x": table, "y": table},
      {"A": 2, "B": 1, evaluate.MEAN_OVER_QUERIERS: 3,
       evaluate.ALL_WINDOWS: 3})
  lines = markdown.splitlines()
  assert len(lines[0].split("|")) - 2 == 2 + 2 * 5
  assert len(lines) == 2 + 4
  assert lines[2].startswith("| A | 2 |")
