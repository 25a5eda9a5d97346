"""X-Fusion trains through the generic loop on real emoji latents."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

import hf_models
import latent_data
from xfusion_jax.data import datasets
from xfusion_jax.train import loop
from xfusion_jax.xfusion import artifacts
from xfusion_jax.xfusion import sequences

CONFIG_FILE = "configs/xfusion_tiny.py"


@pytest.fixture(name="latent_dataset", scope="module")
def fixture_latent_dataset(tmp_path_factory):
  """Real emoji images through a random autoencoder with 8x downsampling."""
  return latent_data.emoji_latents(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(name="model_dir", scope="module")
def fixture_model_dir(tmp_path_factory):
  """A tiny random Llama with SmolLM2's real tokenizer and vocabulary."""
  return hf_models.save_tiny_llama_with_smollm2_tokenizer(
      tmp_path_factory.mktemp("lm"))


def _config(model_dir, latent_dataset, **overrides):
  from configs import xfusion_tiny  # pylint: disable=g-import-not-at-top
  config = xfusion_tiny.get_config()
  config.model_dir = str(model_dir)
  config.latent_dataset = str(latent_dataset[0])
  config.autoencoder = str(latent_dataset[1])
  for key, value in overrides.items():
    config[key] = value
  return config


@pytest.mark.parametrize("architecture,xfuse", [
    ("dual_tower", False),
    ("dual_tower", True),
    ("dual_projection", False),
    ("gated", False),
    ("single_tower", False),
])
def test_architecture_trains(tmp_path, model_dir, latent_dataset, architecture,
                             xfuse):
  config = _config(model_dir, latent_dataset, architecture=architecture,
                   xfuse=xfuse, total_steps=3, checkpoint_every=3)
  result = loop.train(config, str(tmp_path / "run"))
  losses = [result.history[step]["train/loss"] for step in sorted(result.history)]
  assert len(losses) == 3
  assert np.isfinite(losses).all()
  params = jax.tree_util.tree_flatten_with_path(result.state.params)[0]
  names = {jax.tree_util.keystr(path) for path, _ in params}
  if architecture == "single_tower":
    assert any("'text'" in name for name in names)
  else:
    assert any("'vision'" in name for name in names)
    assert not any("'text'" in name for name in names)


def test_no_frozen_leaf_in_state(tmp_path, model_dir, latent_dataset):
  config = _config(model_dir, latent_dataset, total_steps=2,
                   checkpoint_every=2)
  result = loop.train(config, str(tmp_path / "run"))
  for tree_name in ("params", "opt_state"):
    tree = getattr(result.state, tree_name)
    for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
      key = jax.tree_util.keystr(path)
      assert "'text'" not in key, f"frozen leaf {key} in {tree_name}"
      assert "embed_tokens" not in key, f"frozen leaf {key} in {tree_name}"
      assert "lm_head" not in key, f"frozen leaf {key} in {tree_name}"


def test_resume_bit_exact(tmp_path, model_dir, latent_dataset):
  config = _config(model_dir, latent_dataset, total_steps=4,
                   checkpoint_every=2)
  full = loop.train(config, str(tmp_path / "full"))
  partial_config = _config(model_dir, latent_dataset, total_steps=2,
                           checkpoint_every=2)
  loop.train(partial_config, str(tmp_path / "resumed"))
  resumed = loop.train(config, str(tmp_path / "resumed"))
  expected = {s: e["train/loss"] for s, e in full.history.items()}
  actual = {s: e["train/loss"] for s, e in resumed.history.items()}
  assert set(actual) == {3, 4}
  for step, loss in actual.items():
    assert loss == expected[step], f"step {step}: {loss} != {expected[step]}"
  metrics = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
  assert any("loss_dm" in key for key in json.loads(metrics[-1]))


def test_workdir_export_roundtrip(tmp_path, model_dir, latent_dataset):
  config = _config(model_dir, latent_dataset, architecture="dual_tower",
                   xfuse=True, total_steps=2, checkpoint_every=2)
  workdir = tmp_path / "run"
  result = loop.train(config, str(workdir))
  trained = artifacts.load_workdir(workdir)
  for expected, actual in zip(jax.tree.leaves(result.state.params),
                              jax.tree.leaves(trained.params)):
    np.testing.assert_array_equal(np.asarray(expected), np.asarray(actual))

  artifacts.export(trained, tmp_path / "export")
  loaded = artifacts.load_export(tmp_path / "export")
  rng = np.random.default_rng(0)
  rows = sequences.layout_batch([[5, 6, 7], [8, 9]], np.array([False, True]),
                                16, 16 + 8, eos_id=2, pad_id=2)
  latents = rng.standard_normal((2, 1, 8, 8, 4)).astype(np.float32)
  t = np.array([[0.0], [0.5]], np.float32)
  outputs = []
  for model in (trained, loaded):
    outputs.append(model.module.apply(
        {"frozen": model.frozen, "params": model.params}, rows["tokens"],
        rows["kinds"], rows["image_ids"], rows["positions"], rows["valid"],
        latents, t))
  np.testing.assert_array_equal(np.asarray(outputs[0].text_logits),
                                np.asarray(outputs[1].text_logits))
  np.testing.assert_array_equal(np.asarray(outputs[0].velocity),
                                np.asarray(outputs[1].velocity))

  png = tmp_path / "generated.png"
  env = dict(os.environ, XLA_FLAGS="")
  subprocess.run(
      [sys.executable, "-m", "xfusion_jax.generate",
       f"--export_dir={tmp_path / 'export'}", "--prompt=duck",
       "--num_images=2", "--steps=2", f"--out={png}"],
      check=True, env=env, capture_output=True)
  assert Image.open(png).size == (2 * 64, 64)
  emoji = datasets.data_source("emoji_captions", "test",
                               latent_dataset[1].parent)[0]["image"]
  Image.fromarray(emoji).save(tmp_path / "emoji.png")
  caption = subprocess.run(
      [sys.executable, "-m", "xfusion_jax.generate", f"--workdir={workdir}",
       "--task=caption", f"--image={tmp_path / 'emoji.png'}",
       "--max_new_tokens=4"],
      check=True, env=env, capture_output=True, text=True)
