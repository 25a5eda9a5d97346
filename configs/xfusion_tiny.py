"""A seconds-long X-Fusion run for tests.

Needs --config.model_dir (a small HF folder with tokenizer files) and
--config.latent_dataset (a latent dataset of 8x8x4 latents).
"""

from xfusion_jax.train import config as config_lib
from xfusion_jax.xfusion import task


def get_config():
  config = task.add_fields(config_lib.base_config())
  config.dtype = "float32"
  config.total_steps = 4
  config.batch_size = 8
  config.learning_rate = 1e-3
  config.warmup_steps = 1
  config.checkpoint_every = 2
  config.log_every = 1
  config.sample_every = 0
  config.max_caption_tokens = 8
  config.sample_steps = 2
  return config
