"""The REPA-style alignment loss against a NumPy reference, and lambda = 0."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xfusion_jax.xfusion import alignment

BATCH = 3
D_MODEL = 12
D_ENC = 10


def _bilinear_matrix(source: int, target: int) -> np.ndarray:
  """[target, source] weights of 1-D bilinear resampling, half-pixel centers.

  When shrinking, the triangle kernel is widened by the scale factor
  (antialiasing). Weights are renormalized to sum to 1 at the borders.
  """
  scale = source / target
  width = max(scale, 1.0)
  matrix = np.zeros((target, source))
  for i in range(target):
    center = (i + 0.5) * scale - 0.5
    for j in range(source):
      matrix[i, j] = max(0.0, 1.0 - abs(j - center) / width)
    matrix[i] /= matrix[i].sum()
  return matrix


def _reference_loss(hidden, features, params, token_grid, feature_grid,
                    mlp: bool, sample_weights=None) -> float:
  hidden = hidden.astype(np.float64)
  batch, _, dim = features.shape
  grid = features.astype(np.float64).reshape(batch, *feature_grid, dim)
  rows = _bilinear_matrix(feature_grid[0], token_grid[0])
  cols = _bilinear_matrix(feature_grid[1], token_grid[1])
  target = np.einsum("ah,bw,nhwd->nabd", rows, cols, grid).reshape(
      batch, -1, dim)
  if mlp:
    h = hidden @ params["fc1"]["kernel"] + params["fc1"]["bias"]
    h = h / (1.0 + np.exp(-h))
    projected = h @ params["fc2"]["kernel"] + params["fc2"]["bias"]
  else:
    projected = hidden @ params["linear"]["kernel"] + params["linear"]["bias"]
  cosine = np.sum(projected * target, axis=-1) / (
      np.linalg.norm(projected, axis=-1) * np.linalg.norm(target, axis=-1))
  per_row = np.mean(1.0 - cosine, axis=-1)
  if sample_weights is None:
    return float(per_row.mean())
  return float(np.sum(sample_weights * per_row) / np.sum(sample_weights))


def _inputs(token_grid, feature_grid, seed=0):
  rng = np.random.default_rng(seed)
  hidden = rng.normal(size=(BATCH, token_grid[0] * token_grid[1], D_MODEL))
  features = rng.normal(size=(BATCH, feature_grid[0] * feature_grid[1],
                              D_ENC))
  return hidden.astype(np.float32), features.astype(np.float32)


def _projector_and_params(mlp: bool, seed: int = 1):
  projector = alignment.AlignmentProjector(D_ENC, 16 if mlp else None)
  params = projector.init(jax.random.key(seed),
                          jnp.zeros((1, 1, D_MODEL)))["params"]
  # Non-zero biases, so that a dropped bias changes the loss.
  params = jax.tree.map(
      lambda p: p + 0.1 * jax.random.normal(jax.random.key(seed + 1),
                                            p.shape), params)
  return projector, params


@pytest.mark.parametrize("mlp", [False, True])
@pytest.mark.parametrize(
    "token_grid,feature_grid",
    [((4, 4), (4, 4)),  # same grid: no resampling
     ((4, 4), (7, 7)),  # EfficientNet-Lite0's 7 x 7 shrunk: antialiased
     ((6, 6), (3, 3)),  # enlarged
     ((4, 6), (7, 5))])  # rectangular grids, one axis each way
def test_loss_matches_numpy_reference(mlp, token_grid, feature_grid):
  hidden, features = _inputs(token_grid, feature_grid)
  projector, params = _projector_and_params(mlp)
  square = token_grid[0] == token_grid[1] and feature_grid[0] == feature_grid[1]

  loss = alignment.alignment_loss(
      hidden, features, projector, params,
      token_grid=None if square else token_grid,
      feature_grid=None if square else feature_grid)

  expected = _reference_loss(hidden, features,
                             jax.tree.map(np.asarray, params), token_grid,
                             feature_grid, mlp)
  assert float(loss) == pytest.approx(expected, abs=1e-5)


def test_sample_weights_average_weighted_rows():
  hidden, features = _inputs((4, 4), (7, 7))
  projector, params = _projector_and_params(mlp=False)
  weights = np.array([1.0, 0.0, 1.0], np.float32)

  loss = alignment.alignment_loss(hidden, features, projector, params,
                                  sample_weights=weights)

  expected = _reference_loss(hidden, features,
                             jax.tree.map(np.asarray, params), (4, 4), (7, 7),
                             mlp=False, sample_weights=weights)
  assert float(loss) == pytest.approx(expected, abs=1e-5)


def test_all_zero_weights_give_zero():
  hidden, features = _inputs((4, 4), (4, 4))
  projector, params = _projector_and_params(mlp=False)
  weights = np.zeros((BATCH,), np.float32)

  def loss_fn(p):
    return alignment.alignment_loss(hidden, features, projector, p,
                                    sample_weights=weights)

  loss, grads = jax.value_and_grad(loss_fn)(params)

  assert float(loss) == 0.0
  for leaf in jax.tree.leaves(grads):
    assert np.all(np.asarray(leaf) == 0.0)


def test_identity_projection_gives_zero_and_two():
  hidden, _ = _inputs((4, 4), (4, 4))
  projector = alignment.AlignmentProjector(D_MODEL)
  params = {"linear": {"kernel": jnp.eye(D_MODEL),
                       "bias": jnp.zeros((D_MODEL,))}}

  same = alignment.alignment_loss(hidden, hidden, projector, params)
  opposite = alignment.alignment_loss(hidden, -hidden, projector, params)

  assert float(same) == pytest.approx(0.0, abs=1e-6)
  assert float(opposite) == pytest.approx(2.0, abs=1e-6)


def _toy_losses(params, inputs, features, projector, weight):
  """A base loss and the weighted alignment term sharing one hidden state."""
  hidden = jnp.tanh(inputs @ params["tower"])
  base = jnp.mean((hidden - 0.3)**2)
  align = alignment.alignment_loss(hidden, features, projector,
                                   params["projector"])
  return base, base + weight * align


@pytest.mark.parametrize("mlp", [False, True])
def test_zero_weight_is_bit_identical_to_alignment_off(mlp):
  rng = np.random.default_rng(3)
  inputs = rng.normal(size=(BATCH, 16, 5)).astype(np.float32)
  _, features = _inputs((4, 4), (7, 7), seed=4)
  projector, projector_params = _projector_and_params(mlp)
  params = {"tower": jnp.asarray(rng.normal(size=(5, D_MODEL)), jnp.float32),
            "projector": projector_params}

  @jax.jit
  def off(p):
    return jax.value_and_grad(
        lambda q: _toy_losses(q, inputs, features, projector, 0.0)[0])(p)

  # The weight is traced, so XLA cannot fold the product away.
  @jax.jit
  def weighted(p, weight):
    return jax.value_and_grad(
        lambda q: _toy_losses(q, inputs, features, projector, weight)[1])(p)

  base_loss, base_grads = off(params)
  loss, grads = weighted(params, jnp.float32(0.0))

  assert np.asarray(loss).tobytes() == np.asarray(base_loss).tobytes()
  assert (np.asarray(grads["tower"]).tobytes() ==
          np.asarray(base_grads["tower"]).tobytes())
  for leaf in jax.tree.leaves(grads["projector"]):
    assert np.all(np.asarray(leaf) == 0.0)


def test_positive_weight_trains_tower_and_projector_only():
  rng = np.random.default_rng(5)
  inputs = rng.normal(size=(BATCH, 16, 5)).astype(np.float32)
  _, features = _inputs((4, 4), (7, 7), seed=6)
  projector, projector_params = _projector_and_params(mlp=False)
  params = {"tower": jnp.asarray(rng.normal(size=(5, D_MODEL)), jnp.float32),
            "projector": projector_params}

  def align_only(p, f):
    hidden = jnp.tanh(inputs @ p["tower"])
    return alignment.alignment_loss(hidden, f, projector, p["projector"])

  param_grads, feature_grads = jax.grad(align_only, argnums=(0, 1))(
      params, jnp.asarray(features))

  assert np.abs(np.asarray(param_grads["tower"])).max() > 0
  assert np.abs(np.asarray(param_grads["projector"]["linear"]["kernel"])).max(
  ) > 0
  assert np.all(np.asarray(feature_grads) == 0.0)


def test_non_square_tokens_need_a_grid():
  hidden, features = _inputs((4, 6), (4, 4))
  projector, params = _projector_and_params(mlp=False)

  with pytest.raises(ValueError, match="do not form a square grid"):
    alignment.alignment_loss(hidden, features, projector, params)


def test_grid_must_match_token_count():
  hidden, features = _inputs((4, 4), (4, 4))
  projector, params = _projector_and_params(mlp=False)

  with pytest.raises(ValueError, match="Grid 3x5 has 15 cells"):
    alignment.alignment_loss(hidden, features, projector, params,
                             token_grid=(3, 5))


def test_projector_width_must_match_features():
  hidden, features = _inputs((4, 4), (4, 4))
  projector = alignment.AlignmentProjector(D_ENC + 1)
  params = projector.init(jax.random.key(0), hidden)["params"]

  with pytest.raises(ValueError, match="projector outputs 11 channels"):
    alignment.alignment_loss(hidden, features, projector, params)


@pytest.mark.parametrize("num_layers,expected", [(1, 1), (4, 2), (12, 6),
                                                 (16, 8), (30, 8)])
def test_default_alignment_layer(num_layers, expected):
  assert alignment.default_alignment_layer(num_layers) == expected
