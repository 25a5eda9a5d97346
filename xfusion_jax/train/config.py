"""Fields that every training config has, with their defaults.

A config file under `configs/` starts from `base_config()` and adds the
fields of its task. Every field here is read by the generic loop.
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """Return the loop's fields with defaults; `task` must still be set."""
  config = ml_collections.ConfigDict()
  # Name of a factory registered with `xfusion_jax.train.tasks.register_task`.
  config.task = ""
  config.seed = 0
  config.total_steps = 1000
  # Global batch size, in examples, summed over all processes.
  config.batch_size = 8
  # Micro-batches per step: the batch is split into this many parts whose
  # gradients are averaged, so activations of only one part are in memory.
  config.grad_accum_steps = 1
  config.learning_rate = 1e-4
  config.warmup_steps = 100
  # Learning rate at the end of the cosine decay, as a fraction of the peak.
  config.final_learning_rate_fraction = 0.1
  config.weight_decay = 0.1
  # Maximum global L2 norm of the gradients; 0 disables clipping.
  config.grad_clip = 1.0
  config.checkpoint_every = 500
  config.keep_checkpoints = 3
  config.log_every = 10
  # Steps between `task.samples` calls; 0 disables samples.
  config.sample_every = 0
  # Mesh axis sizes; -1 takes all remaining devices.
  config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  # Storage and compute dtype of the frozen model.
  config.dtype = "bfloat16"
  return config
