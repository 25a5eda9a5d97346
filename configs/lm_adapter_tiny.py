"""A few-second lm_adapter run for tests; needs --config.model_dir and
--config.text_file."""

from xfusion_jax.train import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.task = "lm_adapter"
  config.model_dir = ""
  config.text_file = ""
  config.seq_len = 32
  config.adapter_rank = 16
  config.sample_tokens = 16
  config.total_steps = 20
  config.batch_size = 8
  config.learning_rate = 1e-2
  config.warmup_steps = 2
  config.weight_decay = 0.0
  config.checkpoint_every = 10
  config.keep_checkpoints = 5
  config.log_every = 5
  config.sample_every = 10
  config.dtype = "float32"
  return config
