"""The Fréchet distance against hand-computed and SciPy values."""

import math

import numpy as np
import pytest
import scipy.linalg

from xfusion_jax.metrics import frechet


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
