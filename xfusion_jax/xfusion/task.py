"""Task "xfusion": train X-Fusion's vision side beside a frozen LLM.

Data is a latent dataset written by `xfusion_jax.data.encode_latents` (the
train step never runs the image encoder). Each batch of (latent, caption)
pairs is laid out both as understanding and as generation samples, and the
step RNG picks one per row (see `objective`).

Config fields (besides the loop's): `model_dir` (HF folder; empty means the
cached SmolLM2-135M-Instruct), `latent_dataset` (folder of a latent
dataset), `autoencoder` (folder used to render samples; optional),
`demo_data` (with no latent_dataset: build the Fashion-MNIST demo
latents and autoencoder in the asset cache and use them),
`max_caption_tokens`, `latent_size`, `latent_channels`, `patch_size`,
`architecture`, `xfuse`, `lambda_ar`, `lambda_dm`, `generation_fraction`,
`caption_dropout`, `understanding_noise_cap`, `param_dtype`,
`remat_policy`, `sample_prompts`, `sample_cfg_scale`, `sample_steps`, and
for the alignment loss `lambda_align` (0 turns it off), `align_layer` (-1
picks `alignment.default_alignment_layer`), `align_projector` ("linear" or
"mlp") and `feature_encoder` (the encoder whose features the latent dataset
stores, as written by `encode_latents --feature_encoder`).
"""

from __future__ import annotations

import math
import pathlib
from typing import Any

from absl import logging
import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import numpy as np

from xfusion_jax import llm
from xfusion_jax.data import datasets as datasets_lib
from xfusion_jax.data import decode as decode_lib
from xfusion_jax.data import encode_latents
from xfusion_jax.data import pipeline as pipeline_lib
from xfusion_jax.train import checkpointing
from xfusion_jax.train.task import Batch, FlopCount, Metrics, PyTree
from xfusion_jax.xfusion import alignment
from xfusion_jax.xfusion import demo_data
from xfusion_jax.xfusion import inference
from xfusion_jax.xfusion import model as model_lib
from xfusion_jax.xfusion import objective
from xfusion_jax.xfusion import sequences


def _model_dir(config: ml_collections.ConfigDict) -> str:
  if config.model_dir:
    return config.model_dir
  from xfusion_jax.llm import gguf_convert  # pylint: disable=g-import-not-at-top
  return str(gguf_convert.smollm2_135m_instruct())


def xfusion_config(config: ml_collections.ConfigDict) -> model_lib.XFusionConfig:
  return model_lib.XFusionConfig(
      architecture=config.architecture,
      xfuse=config.xfuse,
      latent_channels=config.latent_channels,
      latent_size=tuple(config.latent_size),
      patch_size=config.patch_size,
      dtype=jnp.dtype(config.dtype),
      param_dtype=jnp.dtype(config.param_dtype),
      remat_policy=config.remat_policy,
  )


def objective_config(
    config: ml_collections.ConfigDict) -> objective.ObjectiveConfig:
  return objective.ObjectiveConfig(
      lambda_ar=config.lambda_ar,
      lambda_dm=config.lambda_dm,
      generation_fraction=config.generation_fraction,
      caption_dropout=config.caption_dropout,
      understanding_noise_cap=config.understanding_noise_cap,
      lambda_align=config.lambda_align,
  )


def align_layer(config: ml_collections.ConfigDict, num_layers: int) -> int:
  """Return the aligned layer, counted from 1, from `config.align_layer`."""
  if config.align_layer == -1:
    return alignment.default_alignment_layer(num_layers)
  if not 1 <= config.align_layer <= num_layers:
    raise ValueError(
        f"config.align_layer={config.align_layer} is outside the "
        f"{num_layers}-layer stack. Pass a layer from 1 to {num_layers}, or "
        "-1 for the default.")
  return config.align_layer


class XFusionTask:
  """X-Fusion on a frozen LLM, trained on pre-encoded image latents."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh):
    self._config = config
    if config.demo_data and not config.latent_dataset:
      latents, autoencoder = demo_data.prepare()
      # Written into the config, so that checkpoints record the folders.
      config.latent_dataset = str(latents)
      config.autoencoder = config.autoencoder or str(autoencoder)
    model_dir = _model_dir(config)
    self.lm = llm.from_pretrained(model_dir, dtype=config.dtype, mesh=mesh)
    if self.lm.tokenizer is None:
      raise ValueError(f"{model_dir} has no tokenizer files; X-Fusion needs "
                       "them to tokenize captions.")
    self.frozen = model_lib.frozen_from_lm(self.lm.weights)
    self.frozen_source = {
        "path": str(pathlib.Path(model_dir).resolve()),
        "weights_sha256": checkpointing.hash_weight_files(model_dir),
    }
    self.objective = objective_config(config)
    if self.objective.lambda_align < 0:
      raise ValueError(f"config.lambda_align={config.lambda_align} is "
                       "negative. Pass 0 to turn alignment off.")
    self.aligned = self.objective.lambda_align > 0
    self.module = model_lib.XFusion(
        self.lm.config, xfusion_config(config),
        frozen_dtype=jnp.dtype(config.dtype),
        align_layer=(align_layer(config, self.lm.config.num_hidden_layers)
                     if self.aligned else None))
    # Set by `_check_latents` when alignment is on.
    self.projector: alignment.AlignmentProjector | None = None
    self.feature_grid: tuple[int, int] | None = None
    self.eos_id = int(self.lm.eos_token_ids()[0])
    self.pad_id = self.lm.pad_token_id()
    self.seq_len = sequences.sequence_length(
        config.max_caption_tokens, self.module.config.tokens_per_image)
    self._check_latents()

  def _check_latents(self) -> None:
    folder = self._config.latent_dataset
    if not folder or not pathlib.Path(folder).is_dir():
      raise ValueError(
          f"config.latent_dataset={folder!r} is not a folder. Write one with "
          "`python -m xfusion_jax.data.encode_latents --dataset=NAME "
          "--autoencoder=DIR` and pass the folder it prints.")
    record = datasets_lib.data_source(folder, "train")[0]
    expected = (*self.module.config.latent_size,
                self.module.config.latent_channels)
    if tuple(record["latent_mean"].shape) != expected:
      raise ValueError(
          f"Latents in {folder} have shape {record['latent_mean'].shape}, but "
          f"config.latent_size and latent_channels give {expected}.")
    if self.aligned:
      self._check_features(folder, record)

  def _check_features(self, folder: str, record: dict[str, Any]) -> None:
    """Build the projector for the encoder features the dataset stores."""
    config = self._config
    metadata = encode_latents.feature_metadata(folder)
    if metadata is None or "encoder_features" not in record:
      raise ValueError(
          f"config.lambda_align={config.lambda_align} needs encoder features, "
          f"but {folder} has none. Write the latent dataset with "
          "`python -m xfusion_jax.data.encode_latents "
          f"--feature_encoder={config.feature_encoder or 'efficientnet_lite0'}"
          " ...` and pass the folder it prints.")
    if metadata["feature_encoder"] != config.feature_encoder:
      raise ValueError(
          f"{folder} stores {metadata['feature_encoder']} features, but "
          f"config.feature_encoder={config.feature_encoder!r}. Set "
          "config.feature_encoder to the dataset's encoder or write the "
          "latent dataset again with the other encoder.")
    self.feature_grid = tuple(metadata["feature_grid"])
    self.projector = alignment.make_projector(
        config.align_projector, self.lm.config.hidden_size,
        int(record["encoder_features"].shape[-1]))

  def init_trainable(self, rng: jax.Array) -> PyTree:
    params = model_lib.init_trainable(self.module, self.frozen, rng)
    if self.projector is None:
      return params
    # A key derived from `rng` leaves the model's own initialization as it
    # is without alignment.
    hidden = jnp.zeros((1, 1, self.lm.config.hidden_size), jnp.float32)
    projector_params = self.projector.init(jax.random.fold_in(rng, 1),
                                           hidden)["params"]
    return dict(params, align_projector=projector_params)

  def loss_fn(self, trainable: PyTree, frozen: PyTree, batch: Batch,
              rng: jax.Array) -> tuple[jax.Array, Metrics]:
    return objective.loss_fn(self.module, self.objective, trainable, frozen,
                             batch, rng, projector=self.projector,
                             feature_grid=self.feature_grid)

  def _pipeline_config(self, split: str, batch_size: int, seed: int,
                       shuffle: bool = True) -> pipeline_lib.PipelineConfig:
    return pipeline_lib.PipelineConfig(
        dataset=self._config.latent_dataset, split=split,
        batch_size=batch_size, seed=seed, shuffle=shuffle,
        decode=decode_lib.DecodeConfig(
            max_caption_tokens=self._config.max_caption_tokens + 1))

  def _to_sequences(self, batch: Batch) -> Batch:
    captions = sequences.captions_from_tokens(batch["tokens"],
                                              batch["token_mask"], self.eos_id)
    arrays = sequences.layout_both(captions,
                                   self.module.config.tokens_per_image,
                                   self.seq_len, self.eos_id, self.pad_id)
    arrays["latents"] = batch["latents"].astype(np.float32)
    if self.aligned:
      arrays["encoder_features"] = batch["encoder_features"]
    return arrays

  def train_data(self, seed: int) -> grain.DatasetIterator:
    per_process = self._config.batch_size // jax.process_count()
    dataset = pipeline_lib.make_dataset(
        self._pipeline_config("train", per_process, seed), self.lm.tokenizer)
    return iter(dataset.map(self._to_sequences))

  def tokens_per_batch(self, batch: Batch) -> int:
    return int(np.sum(batch["und_valid"]))

  def flop_count(self) -> FlopCount:
    return flop_count(self.module, self.frozen, self.seq_len)

  def samples(self, trainable: PyTree, step: int,
              workdir: str) -> dict[str, Any]:
    """Generated latents for fixed prompts and captions of held-out latents."""
    del step, workdir
    config = self._config
    out = {}
    prompts = list(config.sample_prompts)
    if prompts:
      captions = [self.lm.tokenizer(p)["input_ids"] for p in prompts]
      latents = inference.generate_latents(
          self.module, self.frozen, trainable, captions,
          cfg_scale=config.sample_cfg_scale, steps=config.sample_steps,
          rng=jax.random.key(0), pad_id=self.pad_id)
      out["generated"] = self._render(np.asarray(latents))
    held_out = next(iter(pipeline_lib.make_dataset(
        self._pipeline_config("test", 4, 0, shuffle=False),
        self.lm.tokenizer)))
    tokens = inference.caption_latents(
        self.module, self.frozen, trainable, held_out["latents"],
        max_new_tokens=config.max_caption_tokens,
        eos_ids=self.lm.eos_token_ids(), pad_id=self.pad_id)
    texts = self.lm.decode_tokens(tokens)
    references = self.lm.tokenizer.batch_decode(
        [row[mask] for row, mask in zip(held_out["tokens"],
                                        held_out["token_mask"])],
        skip_special_tokens=True)
    out["captions"] = "\n".join(
        f"{got!r} (reference {want!r})" for got, want in zip(texts,
                                                              references))
    return out

  def _render(self, latents: np.ndarray) -> np.ndarray:
    """Decode latents to a uint8 image grid `[h, n * w, c]`."""
    if self._config.autoencoder:
      from xfusion_jax.autoencoder import interface  # pylint: disable=g-import-not-at-top
      images = np.asarray(interface.load(self._config.autoencoder).decode(
          jnp.asarray(latents)))
    else:
      # Without a decoder, show the first latent channels as a picture.
      images = latents[..., :3] / max(float(np.abs(latents).max()), 1e-6)
    images = np.clip((images + 1.0) * 127.5, 0, 255).astype(np.uint8)
    if images.shape[-1] == 1:
      images = np.repeat(images, 3, axis=-1)
    return np.concatenate(list(images), axis=1)


def flop_count(module: model_lib.XFusion, frozen: PyTree,
               seq_len: int) -> FlopCount:
  """Frozen-aware FLOPs per token, averaged over text and image tokens.

  Weights count 6N per token when trainable and 4N when frozen with
  gradients passing through. Which tokens pass which weights depends on the
  architecture:
  - "dual_tower": image tokens pass the vision blocks, text tokens the
    frozen blocks, and both towers compute keys and values of every token.
    X-Fuse also passes image tokens through the frozen blocks.
  - "dual_projection": each token passes its own modality's weights only.
  - "gated": every token passes both the frozen and the trainable blocks.
  - "single_tower": every token passes the trainable blocks.

  NOTE: this is an estimate that ignores the LM head's share and attends
  over the full square of the sequence.
  """
  cfg = module.lm_config
  layers = frozen["layers"]["text"]
  layer_params = sum(math.prod(x.shape) for x in jax.tree.leaves(layers))
  kv = 2 * cfg.num_hidden_layers * cfg.hidden_size * (
      cfg.num_key_value_heads * cfg.head_dim)
  image_fraction = module.config.tokens_per_image / seq_len
  image_params = image_fraction * layer_params
  text_params = (1 - image_fraction) * layer_params
  architecture = module.config.architecture
  if architecture == "single_tower":
    trainable, frozen_backprop = layer_params, 0
  elif architecture == "gated":
    trainable, frozen_backprop = layer_params, layer_params
  elif architecture == "dual_projection":
    trainable, frozen_backprop = image_params, text_params
  else:
    trainable, frozen_backprop = image_params + kv, text_params + kv
    if module.config.xfuse:
      frozen_backprop += image_params
  width = cfg.num_attention_heads * cfg.head_dim
  attention = 4 * cfg.num_hidden_layers * seq_len * width
  return FlopCount(
      trainable_params=int(trainable),
      frozen_backprop_params=int(frozen_backprop),
      frozen_forward_params=0,
      attention_flops_per_token=attention)


def make_task(config: ml_collections.ConfigDict, mesh: Mesh) -> XFusionTask:
  return XFusionTask(config, mesh)


def add_fields(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Add the X-Fusion fields with their defaults to a loop config."""
  config.task = "xfusion"
  config.model_dir = ""
  config.latent_dataset = ""
  config.autoencoder = ""
  config.demo_data = False
  config.max_caption_tokens = 16
  config.latent_size = (8, 8)
  config.latent_channels = 4
  config.patch_size = 2
  config.architecture = "dual_tower"
  config.xfuse = False
  config.lambda_ar = 0.2
  config.lambda_dm = 1.0
  config.generation_fraction = 2.0 / 3.0
  config.caption_dropout = 0.1
  config.understanding_noise_cap = 0.0
  config.lambda_align = 0.0
  config.align_layer = -1
  config.align_projector = "linear"
  config.feature_encoder = ""
  config.param_dtype = "float32"
  config.remat_policy = "none"
  config.sample_prompts = ("a photo of a sneaker",)
  config.sample_cfg_scale = 5.5
  config.sample_steps = 20
  return config
