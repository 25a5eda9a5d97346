"""The querier-aware responder on a Llama-3-8B-Instruct-class model, TPU v4.

  python -m xfusion_jax.train --config=configs/querier_tpu_v4.py \
      --config.model_dir=HF_FOLDER --config.train_file=DIALOGUES.json \
      --workdir=gs://BUCKET/querier

The mesh puts every device on FSDP, which shards the frozen weights' hidden
dimension. 8B bfloat16 weights take 16 GB of a v4 chip's 32 GiB HBM, so
unsharded they would leave little room for the activations of two towers.
NOTE: this config has not been run on a TPU; batch size and remat policy
are starting points.
"""

from xfusion_jax.querier import task as querier_task
from xfusion_jax.train import config as config_lib


def get_config():
  config = querier_task.add_fields(config_lib.base_config())
  # Starts the merge at 0.95 on the general tower, which equals the frozen
  # LLM before training; the plain average starts far worse (docs/querier.md).
  config.gated_merge = True
  config.gate_init_bias = 3.0
  config.seq_len = 512
  config.remat_policy = "dots_with_no_batch_dims"
  config.sample_tokens = 64
  config.total_steps = 3000
  # Global batch; must be divisible by the number of devices.
  config.batch_size = 32
  config.learning_rate = 1e-4
  config.warmup_steps = 100
  config.weight_decay = 0.0
  config.checkpoint_every = 500
  config.log_every = 10
  config.sample_every = 500
  config.mesh.data = 1
  config.mesh.fsdp = -1
  config.dtype = "bfloat16"
  return config
