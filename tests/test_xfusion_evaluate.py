"""The X-Fusion acceptance evaluation on real Fashion-MNIST data."""

import json

import numpy as np
from PIL import Image
import pytest
import transformers

import hf_models
import latent_data
from xfusion_jax.data import datasets
from xfusion_jax.data import encode_latents
from xfusion_jax.data import fashion_mnist
from xfusion_jax.train import loop
from xfusion_jax.xfusion import evaluate
from xfusion_jax.xfusion import reference_classifier


@pytest.mark.parametrize("caption,label", [
    ("a photo of a t-shirt", 0),
    ("a shirt", 6),
    ("two tshirts", 0),
    ("a pair of trousers", 1),
    ("a black and white photo of an ankle boot", 9),
    ("boots", 9),
    ("a bag next to a coat", 8),
    ("a coat next to a bag", 4),
    ("Dresses", 3),
    ("a photo of a cat", None),
    ("", None),
])
def test_class_named(caption, label):
  assert evaluate.class_named(caption) == label


@pytest.fixture(name="data_dir", scope="module")
def fixture_data_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  datasets.prepare("fashion_mnist_captions", data_dir)
  return data_dir


@pytest.fixture(name="classifier", scope="module")
def fixture_classifier(data_dir):
  return reference_classifier.train(
      reference_classifier.ClassifierConfig(epochs=1), data_dir)


def test_reference_classifier_learns_real_classes(data_dir, classifier):
  # Published small CNNs reach about 90% on the test split; chance is 10%.
  assert classifier.test_accuracy >= 0.85
  images, labels = reference_classifier.load_split("test", data_dir)
  predicted = classifier.predict(images[:500])
  assert np.mean(predicted == labels[:500]) >= 0.85
  with pytest.raises(ValueError, match="28, 28, 1"):
    classifier.predict(np.zeros((2, 32, 32, 1)))


def test_cached_classifier_reloads(tmp_path, data_dir, monkeypatch):
  config = reference_classifier.ClassifierConfig(epochs=1, batch_size=1024)
  first = reference_classifier.cached(config, data_dir, tmp_path)
  # A second call must load, not train: training would fail without data.
  monkeypatch.setattr(reference_classifier, "train", None)
  second = reference_classifier.cached(config, data_dir, tmp_path)
  assert second.test_accuracy == first.test_accuracy
  images, _ = reference_classifier.load_split("test", data_dir)
  np.testing.assert_array_equal(first.predict(images[:200]),
                                second.predict(images[:200]))


def test_evaluate_workdir(tmp_path, data_dir, classifier):
  autoencoder = latent_data.random_autoencoder(
      tmp_path / "autoencoder", levels=3, image_size=28, in_channels=1)
  latents = encode_latents.encode_latents(
      "fashion_mnist_captions", autoencoder, data_dir=data_dir,
      output_dir=tmp_path / "latents", batch_size=2000)
  from configs import xfusion_tiny  # pylint: disable=g-import-not-at-top
  config = xfusion_tiny.get_config()
  config.model_dir = str(hf_models.save_tiny_llama_with_smollm2_tokenizer(
      tmp_path / "lm"))
  config.latent_dataset = str(latents)
  config.autoencoder = str(tmp_path / "autoencoder")
  config.latent_size = (7, 7)
  config.patch_size = 1
  config.total_steps = 2
  config.checkpoint_every = 2
  workdir = tmp_path / "run"
  loop.train(config, str(workdir))

  results = evaluate.evaluate_workdir(
      str(workdir), evaluate.EvalConfig(images_per_class=2,
                                        caption_examples=6, steps=2),
      classifier=classifier)
  assert results["step"] == 2
  assert results["text_logits_max_abs_difference"] <= 1e-6
  assert results["generation"]["images"] == 20
  assert set(results["generation"]["per_class"]) == set(
      fashion_mnist.CLASS_NAMES)
  out = workdir / "eval"
  assert json.loads((out / evaluate.RESULTS_FILE).read_text()) == results
  lines = (out / evaluate.CAPTIONS_FILE).read_text().splitlines()
  assert len(lines) == 6
  assert results["captions"]["accuracy"] == pytest.approx(
      sum(line.startswith("ok") for line in lines) / 6)
  with Image.open(out / evaluate.GRID_FILE) as grid:
    assert grid.size == (120 + 2 * 84, 10 * 84)



def test_held_out_english_is_hamlet():
  text = evaluate.held_out_english()
  assert "To be, or not to be" in text
  # Speeches only: no markdown speaker lines or headings.
  assert "**HAMLET**" not in text
  assert not any(line.startswith("#") for line in text.splitlines())


def test_text_windows_shape_and_short_text():
  from xfusion_jax.llm import gguf_convert  # pylint: disable=g-import-not-at-top
  tokenizer = transformers.AutoTokenizer.from_pretrained(
      gguf_convert.smollm2_135m_instruct())
  text = "Who's there? Nay, answer me. Stand and unfold yourself."
  ids = tokenizer(text)["input_ids"]
  assert len(ids) < 16
  windows = evaluate.text_windows(tokenizer, text, windows=2, window_tokens=4)
  np.testing.assert_array_equal(windows, np.reshape(ids[:8], (2, 4)))
  with pytest.raises(ValueError, match="fewer than 4 windows of 4"):
    evaluate.text_windows(tokenizer, text, windows=4, window_tokens=4)
