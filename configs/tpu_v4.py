"""X-Fusion on a TPU v4 slice with the published recipe.

Set --config.model_dir to a Hugging Face folder of Llama-3.2-1B or
Llama-3.1-8B, --config.latent_dataset to latents of the Stable Diffusion
VAE (4 channels, 8x downsampling: 256x256 images give 32x32 latents) and
--config.autoencoder to that VAE's diffusers folder.
"""

import ml_collections

from xfusion_jax.train import config as config_lib
from xfusion_jax.xfusion import task


def get_config():
  config = task.add_fields(config_lib.base_config())
  config.dtype = "bfloat16"
  config.param_dtype = "float32"
  config.latent_size = (32, 32)
  config.latent_channels = 4
  config.patch_size = 2
  config.max_caption_tokens = 77
  # 256 image tokens + BOI/EOI + caption + EOS = 336 slots per example; a
  # global batch of 2,400 examples is about 0.8M tokens per step.
  config.batch_size = 2400
  # 25 micro-batches of 96 examples: the activations of 96 examples fit a
  # v4 chip's HBM with Llama-3.2-1B on v4-8 (docs/aot.md), those of 2,400
  # do not.
  config.grad_accum_steps = 25
  config.learning_rate = 1e-4
  config.warmup_steps = 1000
  config.total_steps = 100_000
  config.weight_decay = 0.0
  config.grad_clip = 1.0
  # Generation : understanding = 2 : 1, understanding images kept clean.
  config.generation_fraction = 2.0 / 3.0
  config.understanding_noise_cap = 0.0
  config.caption_dropout = 0.1
  config.sample_cfg_scale = 5.5
  config.sample_steps = 50
  config.checkpoint_every = 1000
  config.keep_checkpoints = 3
  config.log_every = 50
  config.sample_every = 5000
  config.remat_policy = "dots_with_no_batch_dims"
  # A v4-32 slice has 16 chips: FSDP over 16, no tensor parallelism.
  config.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1,
                                           "tensor": 1})
  return config
