"""A Fashion-MNIST classifier that judges generated images.

The X-Fusion demo counts a generated image as right when this classifier,
trained only on the real training split, assigns it the prompted class. The
network is a small CNN: 89% test accuracy after two epochs, about 70 s
on a 2-core CPU. A trained classifier is cached (by training
settings) so that every evaluation uses the same judge.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from xfusion_jax import assets
from xfusion_jax.data import datasets

DATASET = "fashion_mnist_captions"
_RESULT_FILE = "result.json"
_PARAMS_DIR = "params"


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
  epochs: int = 2
  batch_size: int = 128
  learning_rate: float = 2e-3
  seed: int = 0

  def cache_name(self) -> str:
    return (f"fashion_mnist_cnn_e{self.epochs}_b{self.batch_size}_"
            f"lr{self.learning_rate:g}_s{self.seed}")


class FashionCNN(nn.Module):
  """Two convolutions and two dense layers over 28x28 grey images."""

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """Return logits `[batch, 10]` of images `[batch, 28, 28, 1]` in [0, 1]."""
    x = images
    for features in (32, 64):
      x = nn.relu(nn.Conv(features, (3, 3))(x))
      x = nn.avg_pool(x, (2, 2), (2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(128)(x))
    return nn.Dense(10)(x)


@dataclasses.dataclass
class ReferenceClassifier:
  """A trained `FashionCNN` with its held-out accuracy."""

  params: dict
  test_accuracy: float

  def __post_init__(self):
    self._logits = jax.jit(lambda p, x: FashionCNN().apply({"params": p}, x))

  def predict(self, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Return the class ids of images `[n, 28, 28, 1]` with values in [0, 1]."""
    images = np.asarray(images, np.float32)
    if images.shape[1:] != (28, 28, 1):
      raise ValueError(f"Invalid image shape {images.shape}: the reference "
                       "classifier expects [n, 28, 28, 1] images. Decode "
                       "latents of 28x28 Fashion-MNIST images.")
    out = [np.asarray(self._logits(self.params, images[i:i + batch_size]))
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out).argmax(-1)


def load_split(split: str, data_dir: str | os.PathLike[str] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
  """Return the images `[n, 28, 28, 1]` in [0, 1] and labels `[n]` of a split."""
  source = datasets.data_source(DATASET, split, data_dir)
  records = source.__getitems__(range(len(source)))
  images = np.stack([r["image"] for r in records]).astype(np.float32) / 255.0
  labels = np.asarray([r["label"] for r in records], np.int32)
  return images, labels


def train(config: ClassifierConfig = ClassifierConfig(),
          data_dir: str | os.PathLike[str] | None = None
          ) -> ReferenceClassifier:
  """Train on the real training split; report accuracy on the test split."""
  images, labels = load_split("train", data_dir)
  rng = np.random.default_rng(config.seed)
  module = FashionCNN()
  params = module.init(jax.random.key(config.seed), images[:1])["params"]
  steps_per_epoch = len(images) // config.batch_size
  schedule = optax.cosine_decay_schedule(config.learning_rate,
                                         config.epochs * steps_per_epoch)
  optimizer = optax.adam(schedule)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(p):
      logits = module.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  for epoch in range(config.epochs):
    order = rng.permutation(len(images))
    for i in range(steps_per_epoch):
      index = order[i * config.batch_size:(i + 1) * config.batch_size]
      params, opt_state, loss = step(params, opt_state, images[index],
                                     labels[index])
    logging.info("Reference classifier: epoch %d, loss %.4f.", epoch + 1,
                 float(loss))
  classifier = ReferenceClassifier(params, 0.0)
  test_images, test_labels = load_split("test", data_dir)
  classifier.test_accuracy = float(
      np.mean(classifier.predict(test_images) == test_labels))
  logging.info("Reference classifier: test accuracy %.4f.",
               classifier.test_accuracy)
  return classifier


def cached(config: ClassifierConfig = ClassifierConfig(),
           data_dir: str | os.PathLike[str] | None = None,
           cache_dir: str | os.PathLike[str] | None = None
           ) -> ReferenceClassifier:
  """Load the classifier of `config` from the cache, training it if absent."""
  root = pathlib.Path(cache_dir or assets.cache_dir() / "reference_classifiers")
  folder = (root / config.cache_name()).absolute()
  result_file = folder / _RESULT_FILE
  abstract = jax.eval_shape(lambda: FashionCNN().init(
      jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"])
  checkpointer = ocp.StandardCheckpointer()
  # The result file is written last, so its presence marks a whole save.
  if result_file.exists():
    params = checkpointer.restore(folder / _PARAMS_DIR, abstract)
    accuracy = json.loads(result_file.read_text())["test_accuracy"]
    return ReferenceClassifier(params, accuracy)
  classifier = train(config, data_dir)
  folder.mkdir(parents=True, exist_ok=True)
  checkpointer.save(folder / _PARAMS_DIR, classifier.params, force=True)
  checkpointer.wait_until_finished()
  result_file.write_text(json.dumps(
      {"test_accuracy": classifier.test_accuracy,
       "config": dataclasses.asdict(config)}, indent=2))
  return classifier
