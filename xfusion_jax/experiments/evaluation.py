"""The figures of one checkpoint of an ablation arm, and their judges.

All judges are fixed for a whole study, so every arm and every checkpoint
is scored the same way:
- the reference classifier (`reference_classifier.cached()` unless given);
- EfficientNet-Lite0 with its ImageNet weights, whose mean-pooled patch
  features of generated images are compared with those of the first real
  test images by a Fréchet distance;
- the held-out English text of `evaluate.held_out_english`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

from absl import logging

from xfusion_jax import encoders
from xfusion_jax.autoencoder import interface as autoencoder_lib
from xfusion_jax.metrics import frechet
from xfusion_jax.xfusion import artifacts
from xfusion_jax.xfusion import evaluate
from xfusion_jax.xfusion import reference_classifier


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """Sample sizes of the figures; the same for every arm and checkpoint.

  Attributes:
    images_per_class: images drawn per class prompt; the Fréchet distance
      compares 10 * images_per_class generated images with `real_images`.
    caption_examples: held-out test latents captioned.
    cfg_scale: guidance scale; None takes the run's sample_cfg_scale.
    sampler_steps: Euler steps of the sampler; None takes the run's
      sample_steps.
    seed: sampling seed.
    real_images: real test images whose features the Fréchet distance uses.
    perplexity_windows: windows of held-out text scored for perplexity.
    perplexity_window_tokens: tokens per window.
  """

  images_per_class: int = 5
  caption_examples: int = 200
  cfg_scale: float | None = None
  sampler_steps: int | None = None
  seed: int = 0
  real_images: int = 2000
  perplexity_windows: int = 16
  perplexity_window_tokens: int = 128


@dataclasses.dataclass
class Judges:
  """The models and data that score checkpoints, built once per study run.

  Attributes:
    classifier: judges the class of generated images.
    feature_encoder: EfficientNet-Lite0 for the Fréchet distance.
    real_statistics: Gaussian statistics of the real images' features.
    held_out_text: English text for the perplexity.
  """

  classifier: reference_classifier.ReferenceClassifier
  feature_encoder: encoders.ImageEncoder
  real_statistics: frechet.GaussianStatistics
  held_out_text: str

  @classmethod
  def load(cls, settings: EvalSettings,
           classifier: reference_classifier.ReferenceClassifier | None = None,
           data_dir: str | os.PathLike[str] | None = None) -> Judges:
    """Build the judges; `data_dir` contains the prepared Fashion-MNIST data."""
    classifier = classifier or reference_classifier.cached(data_dir=data_dir)
    encoder = encoders.load_efficientnet_lite0()
    images, _ = reference_classifier.load_split("test", data_dir)
    if settings.real_images > len(images):
      raise ValueError(f"real_images={settings.real_images} exceeds the "
                       f"{len(images)} real test images.")
    features = evaluate.image_features(encoder, images[:settings.real_images])
    logging.info("Fréchet distance reference: EfficientNet-Lite0 features of "
                 "%d real test images.", len(features))
    return cls(classifier, encoder,
               frechet.GaussianStatistics.from_features(features),
               evaluate.held_out_english())


def training_tokens(workdir: str | os.PathLike[str], step: int) -> int:
  """Sum the training tokens of steps 1..`step` from `metrics.jsonl`.

  A resumed run logs again the steps after its last checkpoint; they saw
  the same data, so the last record of each step counts.

  Raises:
    ValueError: when a step up to `step` has no record.
  """
  tokens = {}
  with open(pathlib.Path(workdir) / "metrics.jsonl", encoding="utf-8") as f:
    for line in f:
      record = json.loads(line)
      tokens[record["step"]] = record["perf/tokens"]
  missing = [s for s in range(1, step + 1) if s not in tokens]
  if missing:
    raise ValueError(f"{workdir}/metrics.jsonl has no record of steps "
                     f"{missing[:5]}{'...' if len(missing) > 5 else ''}, so "
                     f"the training tokens up to step {step} are unknown.")
  return int(sum(tokens[s] for s in range(1, step + 1)))


def evaluate_checkpoint(workdir: str | os.PathLike[str], step: int,
                        judges: Judges,
                        settings: EvalSettings) -> dict[str, Any]:
  """Compute the figures of the checkpoint of `step` in `workdir`.

  Returns:
    A flat dict: step, training_tokens, generation_accuracy,
    frechet_distance (on EfficientNet-Lite0 features), caption_accuracy,
    no_class_named, bleu4, bleu1, perplexity_xfusion, perplexity_base_llm,
    and the sample sizes used.
  """
  trained = artifacts.load_workdir(workdir, step)
  run = trained.run_config or {}
  if not run.get("autoencoder"):
    raise ValueError(f"The run in {workdir} has an empty config.autoencoder, "
                     "so generated latents cannot be decoded. Train the arms "
                     "with --config.autoencoder=DIR.")
  autoencoder = autoencoder_lib.load(run["autoencoder"])
  cfg_scale = (run["sample_cfg_scale"] if settings.cfg_scale is None
               else settings.cfg_scale)
  sampler_steps = (run["sample_steps"] if settings.sampler_steps is None
                   else settings.sampler_steps)

  generation, images = evaluate.generation_accuracy(
      trained, autoencoder, judges.classifier,
      images_per_class=settings.images_per_class, cfg_scale=cfg_scale,
      steps=sampler_steps, seed=settings.seed)
  flat_images = images.reshape(-1, *images.shape[2:])
  generated = frechet.GaussianStatistics.from_features(
      evaluate.image_features(judges.feature_encoder, flat_images))
  distance = frechet.frechet_distance(judges.real_statistics, generated)

  captions, _ = evaluate.caption_accuracy(
      trained, run["latent_dataset"], examples=settings.caption_examples,
      max_new_tokens=run["max_caption_tokens"])

  windows = evaluate.text_windows(trained.lm.tokenizer, judges.held_out_text,
                                  settings.perplexity_windows,
                                  settings.perplexity_window_tokens)
  perplexity = evaluate.text_perplexity(trained, windows)

  return {
      "step": step,
      "training_tokens": training_tokens(workdir, step),
      "generation_accuracy": generation["accuracy"],
      "frechet_distance": distance,
      "caption_accuracy": captions["accuracy"],
      "no_class_named": captions["no_class_named"],
      "bleu4": captions["bleu4"],
      "bleu1": captions["bleu1"],
      "perplexity_xfusion": perplexity["xfusion"],
      "perplexity_base_llm": perplexity["base_llm"],
      "generated_images": int(len(flat_images)),
      "real_images": judges.real_statistics.count,
      "captioned_examples": captions["examples"],
      "perplexity_tokens": perplexity["tokens"],
      "cfg_scale": cfg_scale,
      "sampler_steps": sampler_steps,
  }
