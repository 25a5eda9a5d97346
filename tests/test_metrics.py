"""BLEU and the Fréchet distance against hand-computed and SciPy values."""

import math

import numpy as np
import pytest
import scipy.linalg

from xfusion_jax.metrics import frechet
from xfusion_jax.metrics import text


def test_tokenize_splits_punctuation():
  assert text.tokenize("A Photo, of a T-shirt.") == [
      "a", "photo", ",", "of", "a", "t", "-", "shirt", "."]


def test_bleu_identical_text_is_one():
  caption = "a black and white photo of a bag"
  assert text.corpus_bleu([caption], [[caption]]) == pytest.approx(1.0)


def test_bleu_clips_repeated_words():
  # "the" counts at most twice, as often as in the reference.
  score = text.corpus_bleu(["the the the the the the the"],
                           [["the cat is on the mat"]], max_order=1)
  assert score == pytest.approx(2 / 7)


def test_bleu_brevity_penalty():
  score = text.corpus_bleu(["a photo of"], [["a photo of a bag"]],
                           max_order=1)
  assert score == pytest.approx(math.exp(1 - 5 / 3))


def test_bleu_closest_reference_length_prefers_shorter():
  # References of 2 and 6 words are equally close to 4; the shorter one
  # counts, so there is no brevity penalty.
  score = text.corpus_bleu(["a b c d"], [["a b", "a b c d e f"]],
                           max_order=1)
  assert score == pytest.approx(1.0)


def test_bleu_sums_counts_over_corpus():
  # Unigrams 4/5 and bigrams 2/3 over both sentences; lengths are equal.
  score = text.corpus_bleu(["a b c", "x y"], [["a b c"], ["x z"]],
                           max_order=2)
  assert score == pytest.approx(math.sqrt(0.8 * 2 / 3))


def test_bleu_without_match_is_zero():
  assert text.corpus_bleu(["a b c d"], [["e f g h"]]) == 0.0
  assert text.corpus_bleu([""], [["a bag"]]) == 0.0


def test_bleu_rejects_bad_input():
  with pytest.raises(ValueError, match="2 candidates but 1"):
    text.corpus_bleu(["a", "b"], [["a"]])
  with pytest.raises(ValueError, match="Example 0 has no reference"):
    text.corpus_bleu(["a"], [[]])
  with pytest.raises(ValueError, match="max_order"):
    text.corpus_bleu(["a"], [["a"]], max_order=0)


def _scipy_frechet(a, b):
  root = scipy.linalg.sqrtm(a.covariance @ b.covariance).real
  difference = a.mean - b.mean
  return (difference @ difference + np.trace(a.covariance) +
          np.trace(b.covariance) - 2 * np.trace(root))


def test_frechet_matches_scipy_sqrtm():
  rng = np.random.default_rng(0)
  first = frechet.GaussianStatistics.from_features(
      rng.normal(size=(300, 8)))
  second = frechet.GaussianStatistics.from_features(
      rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8)) + 0.5)
  assert frechet.frechet_distance(first, second) == pytest.approx(
      _scipy_frechet(first, second), rel=1e-8)


def test_frechet_of_one_dimensional_gaussians():
  first = frechet.GaussianStatistics(np.array([1.0]), np.array([[4.0]]), 2)
  second = frechet.GaussianStatistics(np.array([-2.0]), np.array([[9.0]]), 2)
  # (m1 - m2)^2 + (s1 - s2)^2 with standard deviations 2 and 3.
  assert frechet.frechet_distance(first, second) == pytest.approx(10.0)


def test_frechet_of_same_sample_is_zero():
  features = np.random.default_rng(1).normal(size=(50, 6))
  stats = frechet.GaussianStatistics.from_features(features)
  assert frechet.frechet_distance(stats, stats) == pytest.approx(0.0,
                                                                 abs=1e-9)


def test_frechet_with_singular_covariances():
  rng = np.random.default_rng(2)
  # Fewer samples than dimensions, as with few generated images.
  first = frechet.GaussianStatistics.from_features(rng.normal(size=(10, 64)))
  second = frechet.GaussianStatistics.from_features(
      rng.normal(size=(12, 64)) + 1.0)
  forward = frechet.frechet_distance(first, second)
  assert math.isfinite(forward)
  assert forward > 0
  assert frechet.frechet_distance(second, first) == pytest.approx(forward,
                                                                  rel=1e-9)


def test_frechet_rejects_bad_shapes():
  with pytest.raises(ValueError, match="n >= 2"):
    frechet.GaussianStatistics.from_features(np.zeros((1, 3)))
  a = frechet.GaussianStatistics.from_features(np.eye(3))
  b = frechet.GaussianStatistics.from_features(np.eye(4))
  with pytest.raises(ValueError, match="Feature dimensions differ"):
    frechet.frechet_distance(a, b)
