"""Fréchet distance between two sets of feature vectors.

The Fréchet distance between the Gaussians fitted to two samples is
||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)). FID applies this
formula to Inception-v3 features; on other features the value is not FID
and is not comparable with published FID figures. With
fewer samples than feature dimensions the covariances are singular and the
estimate is biased upwards; compare only figures computed with the same
sample sizes.

The trace of (S_1 S_2)^(1/2) is computed from symmetric eigen-decompositions
as the sum of the square roots of the eigenvalues of R S_2 R, R = S_1^(1/2)
(a PSD matrix similar to S_1 S_2). Unlike a general matrix square root of
S_1 S_2, this stays well-defined when the covariances are singular.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class GaussianStatistics:
  """Mean `[dim]` and covariance `[dim, dim]` of a sample, in float64."""

  mean: np.ndarray
  covariance: np.ndarray
  count: int

  @classmethod
  def from_features(cls, features: np.ndarray) -> GaussianStatistics:
    """Fit the statistics of features `[n, dim]` with n >= 2."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
      raise ValueError("Expected features of shape [n, dim] with n >= 2, got "
                       f"shape {features.shape}.")
    return cls(features.mean(axis=0), np.cov(features, rowvar=False),
               features.shape[0])


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
  """Symmetric square root of a PSD matrix, negative rounding clipped."""
  eigenvalues, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
  return (vectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ vectors.T


def frechet_distance(first: GaussianStatistics,
                     second: GaussianStatistics) -> float:
  """Return the Fréchet distance of the two Gaussians (see module docstring)."""
  if first.mean.shape != second.mean.shape:
    raise ValueError(f"Feature dimensions differ: {first.mean.shape} and "
                     f"{second.mean.shape}.")
  difference = first.mean - second.mean
  root_first = _psd_sqrt(first.covariance)
  product = root_first @ second.covariance @ root_first
  # Rounding leaves eigenvalues of the PSD product slightly below zero.
  eigenvalues = np.clip(np.linalg.eigvalsh((product + product.T) / 2), 0, None)
  trace_root = float(np.sum(np.sqrt(eigenvalues)))
  value = (difference @ difference + np.trace(first.covariance) +
           np.trace(second.covariance) - 2.0 * trace_root)
  return float(value)
