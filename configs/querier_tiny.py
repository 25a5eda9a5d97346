"""A few-second querier run for tests; needs --config.model_dir and
--config.train_file (MQDialog records)."""

from xfusion_jax.querier import task as querier_task
from xfusion_jax.train import config as config_lib


def get_config():
  config = querier_task.add_fields(config_lib.base_config())
  config.seq_len = 48
  config.lora_rank = 4
  config.specific_rank = 8
  config.gated_merge = True
  config.bank_length = 8
  config.projection_dim = 16
  config.projection_hidden_dim = 32
  config.sample_tokens = 8
  config.total_steps = 12
  config.batch_size = 8
  config.learning_rate = 1e-2
  config.warmup_steps = 2
  config.weight_decay = 0.0
  config.checkpoint_every = 6
  config.keep_checkpoints = 2
  config.log_every = 4
  config.sample_every = 6
  config.dtype = "float32"
  return config
