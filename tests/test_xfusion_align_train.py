"""The alignment loss wired into X-Fusion training on real emoji latents."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

import hf_models
import latent_data
from xfusion_jax import encoders
from xfusion_jax import llm
from xfusion_jax.data import datasets
from xfusion_jax.data import encode_latents
from xfusion_jax.train import loop
from xfusion_jax.xfusion import alignment
from xfusion_jax.xfusion import model as xf
from xfusion_jax.xfusion import objective
from xfusion_jax.xfusion import sequences

# EfficientNet-Lite0 at 64 x 64 input (a 2 x 2 grid) keeps the encoding of
# all emoji within seconds on a CPU.
FEATURE_IMAGE_SIZE = 64


@pytest.fixture(name="latent_datasets", scope="module")
def fixture_latent_datasets(tmp_path_factory):
  """Emoji latents without and with EfficientNet-Lite0 features."""
  data_dir = tmp_path_factory.mktemp("tfds")
  plain, _ = latent_data.emoji_latents(data_dir)
  encoder = encoders.load_efficientnet_lite0(FEATURE_IMAGE_SIZE)
  with_features, _ = latent_data.emoji_latents(
      data_dir, feature_encoder=encoder,
      feature_encoder_name="efficientnet_lite0")
  return plain, with_features, data_dir, encoder


def test_features_take_two_bytes_per_value(latent_datasets):
  _, with_features, _, _ = latent_datasets
  split = tfds.builder_from_directory(str(with_features)).info.splits["train"]
  values = 4 * encoders.efficientnet_lite.FEATURE_DIM

  # float16 as raw bytes, plus 2 KiB of latents, the text and the framing.
  # A float_list would take 4 bytes per value and more than 20 KiB.
  assert split.num_bytes / split.num_examples < 2 * values + 4096


@pytest.fixture(name="model_dir", scope="module")
def fixture_model_dir(tmp_path_factory):
  """A tiny random Llama with SmolLM2's real tokenizer and vocabulary."""
  return hf_models.save_tiny_llama_with_smollm2_tokenizer(
      tmp_path_factory.mktemp("lm"))


def _config(model_dir, latent_folder, data_dir, **overrides):
  from configs import xfusion_tiny  # pylint: disable=g-import-not-at-top
  config = xfusion_tiny.get_config()
  config.model_dir = str(model_dir)
  config.latent_dataset = str(latent_folder)
  config.autoencoder = str(data_dir / "autoencoder")
  config.total_steps = 2
  config.checkpoint_every = 2
  for key, value in overrides.items():
    config[key] = value
  return config


def test_stored_features_match_encoder(latent_datasets):
  plain, with_features, data_dir, encoder = latent_datasets
  images = datasets.data_source("emoji_captions", "test", data_dir)
  stored = datasets.data_source(with_features, "test")
  by_id = {stored[i]["id"]: stored[i] for i in range(len(stored))}

  assert plain != with_features
  assert "encoder_features" not in datasets.data_source(plain, "test")[0]
  assert encode_latents.feature_metadata(plain) is None
  assert encode_latents.feature_metadata(with_features) == {
      "feature_encoder": "efficientnet_lite0", "feature_grid": [2, 2]}
  for index in (0, 70, 134):
    record = images[index]
    pixels = record["image"][None].astype(np.float32) / 127.5 - 1.0
    expected = np.asarray(encoder.features(pixels))[0]
    features = by_id[record["id"]]["encoder_features"]
    assert features.dtype == np.float16
    assert features.shape == (4, encoders.efficientnet_lite.FEATURE_DIM)
    np.testing.assert_allclose(features.astype(np.float32), expected,
                               rtol=2e-3, atol=2e-3)


def test_zero_weight_training_bit_identical(tmp_path, model_dir,
                                            latent_datasets):
  plain, with_features, data_dir, _ = latent_datasets
  off = loop.train(_config(model_dir, plain, data_dir),
                   str(tmp_path / "off"))
  zero = loop.train(
      _config(model_dir, with_features, data_dir, lambda_align=0.0,
              feature_encoder="efficientnet_lite0", align_projector="mlp"),
      str(tmp_path / "zero"))

  assert sorted(off.history) == sorted(zero.history) == [1, 2]
  for step in off.history:
    assert zero.history[step]["train/loss"] == off.history[step]["train/loss"]
    assert not any("loss_align" in key for key in zero.history[step])
  expected = jax.tree_util.tree_flatten_with_path(off.state.params)[0]
  actual = jax.tree_util.tree_flatten_with_path(zero.state.params)[0]
  assert [path for path, _ in actual] == [path for path, _ in expected]
  for (path, want), (_, got) in zip(expected, actual):
    assert np.asarray(got).tobytes() == np.asarray(want).tobytes(), (
        jax.tree_util.keystr(path))


def test_positive_weight_trains_projector(tmp_path, model_dir,
                                          latent_datasets):
  _, with_features, data_dir, _ = latent_datasets
  config = _config(model_dir, with_features, data_dir, lambda_align=0.5,
                   feature_encoder="efficientnet_lite0")
  result = loop.train(config, str(tmp_path / "run"))

  for step in (1, 2):
    loss_align = [value for key, value in result.history[step].items()
                  if key.endswith("loss_align")]
    assert len(loss_align) == 1, result.history[step]
    assert 0.0 < loss_align[0] < 2.0
  projector = result.state.params["align_projector"]["linear"]
  assert projector["kernel"].shape == (
      64, encoders.efficientnet_lite.FEATURE_DIM)
  assert np.all(np.isfinite(np.asarray(projector["kernel"])))


def test_missing_features_raise(tmp_path, model_dir, latent_datasets):
  plain, _, data_dir, _ = latent_datasets
  config = _config(model_dir, plain, data_dir, lambda_align=0.5,
                   feature_encoder="efficientnet_lite0")
  with pytest.raises(ValueError, match="needs encoder features"):
    loop.train(config, str(tmp_path / "run"))


def test_wrong_encoder_name_raises(tmp_path, model_dir, latent_datasets):
  _, with_features, data_dir, _ = latent_datasets
  config = _config(model_dir, with_features, data_dir, lambda_align=0.5,
                   feature_encoder="clip")
  with pytest.raises(ValueError, match="stores efficientnet_lite0 features"):
    loop.train(config, str(tmp_path / "run"))


# ----------------------------------------------------------------------------
# The objective's alignment term against a direct computation.


@pytest.fixture(name="tiny_lm", scope="module")
def fixture_tiny_lm(tmp_path_factory):
  model = hf_models.build_model(
      hf_models.tiny_config("llama", num_key_value_heads=2, vocab_size=128))
  path = hf_models.save_model(model, tmp_path_factory.mktemp("lm"))
  return llm.from_pretrained(path, dtype="float32", load_tokenizer=False)


def _understanding_batch(features_per_row: int, encoder_dim: int):
  """Two understanding-layout rows with 4 x 4 latents and random features."""
  rng = np.random.default_rng(0)
  captions = [list(rng.integers(3, 128, 5)), list(rng.integers(3, 128, 3))]
  seq_len = sequences.sequence_length(6, 4)
  batch = sequences.layout_both(captions, 4, seq_len, 2, 0)
  batch["latents"] = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
  batch["encoder_features"] = rng.standard_normal(
      (2, features_per_row, encoder_dim)).astype(np.float32)
  return batch


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_objective_term_matches_direct(tiny_lm, kind):
  layer = 1
  config = xf.XFusionConfig(latent_size=(4, 4), patch_size=2)
  module = xf.XFusion(tiny_lm.config, config, align_layer=layer)
  frozen = xf.frozen_from_lm(tiny_lm.weights)
  params = nn.meta.unbox(xf.init_trainable(module, frozen, jax.random.key(0)))
  projector = alignment.make_projector(kind, tiny_lm.config.hidden_size, 6)
  params["align_projector"] = projector.init(
      jax.random.key(1), jnp.zeros((1, 1, tiny_lm.config.hidden_size)))[
          "params"]
  # A 3 x 3 feature grid, resampled to the 2 x 2 token grid.
  batch = _understanding_batch(9, 6)
  # Clean understanding images only, so the inputs below are known.
  base = objective.ObjectiveConfig(generation_fraction=0.0,
                                   understanding_noise_cap=0.0)
  weighted = objective.ObjectiveConfig(generation_fraction=0.0,
                                       understanding_noise_cap=0.0,
                                       lambda_align=0.25)
  rng = jax.random.key(2)

  total_off, metrics_off = objective.loss_fn(module, base, params, frozen,
                                             batch, rng)
  total, metrics = objective.loss_fn(module, weighted, params, frozen, batch,
                                     rng, projector=projector)

  out = module.apply({"frozen": frozen, "params": params},
                     batch["und_tokens"], batch["und_kinds"],
                     batch["und_image_ids"], batch["und_positions"],
                     batch["und_valid"], batch["latents"][:, None],
                     np.zeros((2, 1), np.float32))
  target = jax.image.resize(
      batch["encoder_features"].reshape(2, 3, 3, 6), (2, 2, 2, 6),
      "bilinear").reshape(2, 4, 6)
  projected = projector.apply({"params": params["align_projector"]},
                              out.image_hidden)
  projected, target = np.asarray(projected), np.asarray(target)
  cosine = np.sum(projected * target, -1) / (
      np.linalg.norm(projected, axis=-1) * np.linalg.norm(target, axis=-1))
  expected = float(np.mean(1.0 - cosine))

  assert "loss_align" not in metrics_off
  np.testing.assert_allclose(float(metrics["loss_align"]), expected,
                             rtol=1e-5)
  np.testing.assert_allclose(float(total),
                             float(total_off) + 0.25 * expected, rtol=1e-5)


def test_objective_gradient_reaches_projector(tiny_lm):
  config = xf.XFusionConfig(latent_size=(4, 4), patch_size=2)
  module = xf.XFusion(tiny_lm.config, config, align_layer=2)
  frozen = xf.frozen_from_lm(tiny_lm.weights)
  params = nn.meta.unbox(xf.init_trainable(module, frozen, jax.random.key(0)))
  projector = alignment.make_projector("linear", tiny_lm.config.hidden_size,
                                       6)
  params["align_projector"] = projector.init(
      jax.random.key(1), jnp.zeros((1, 1, tiny_lm.config.hidden_size)))[
          "params"]
  batch = _understanding_batch(4, 6)
  weighted = objective.ObjectiveConfig(lambda_align=1.0)

  grads = jax.grad(lambda p: objective.loss_fn(
      module, weighted, p, frozen, batch, jax.random.key(3),
      projector=projector)[0])(params)

  kernel_grad = np.asarray(grads["align_projector"]["linear"]["kernel"])
  assert np.abs(kernel_grad).max() > 0
  vision_grad = jax.tree.leaves(grads["layers"]["vision"])
  assert max(float(np.abs(np.asarray(g)).max()) for g in vision_grad) > 0


def test_objective_without_features_raises(tiny_lm):
  config = xf.XFusionConfig(latent_size=(4, 4), patch_size=2)
  module = xf.XFusion(tiny_lm.config, config, align_layer=1)
  frozen = xf.frozen_from_lm(tiny_lm.weights)
  params = nn.meta.unbox(xf.init_trainable(module, frozen, jax.random.key(0)))
  projector = alignment.make_projector("linear", tiny_lm.config.hidden_size,
                                       6)
  params["align_projector"] = projector.init(
      jax.random.key(1), jnp.zeros((1, 1, tiny_lm.config.hidden_size)))[
          "params"]
  batch = _understanding_batch(4, 6)
  del batch["encoder_features"]
  weighted = objective.ObjectiveConfig(lambda_align=1.0)
  with pytest.raises(ValueError, match="needs batch\\['encoder_features'\\]"):
    objective.loss_fn(module, weighted, params, frozen, batch,
                      jax.random.key(3), projector=projector)
