"""X-Fusion on a 2-core CPU: the real frozen SmolLM2-135M-Instruct learns to
caption and draw Fashion-MNIST.

  python -m xfusion_jax.train --config=configs/cpu_demo.py \
      --workdir=workdirs/cpu_demo
  python -m xfusion_jax.evaluate --workdir=workdirs/cpu_demo

The first run also builds, once, into the asset cache: the captioned
Fashion-MNIST dataset, the demo autoencoder (configs/autoencoder_demo.py)
and its latents. Pass --config.latent_dataset and --config.autoencoder to
train on latents written by `python -m xfusion_jax.data.encode_latents`.

The demo autoencoder maps 28x28 images to 7x7x4 latents, so one latent
pixel is one image token (patch size 1, 49 tokens per image).
"""

from xfusion_jax.data import fashion_mnist
from xfusion_jax.train import config as config_lib
from xfusion_jax.xfusion import task


def get_config():
  config = task.add_fields(config_lib.base_config())
  config.demo_data = True
  # float32: CPUs without native bf16 run it faster.
  config.dtype = "float32"
  config.latent_size = (7, 7)
  config.latent_channels = 4
  config.patch_size = 1
  config.max_caption_tokens = 12
  # About 3 s per step on two otherwise idle cores, so training takes
  # about 53 minutes. Batch 8 buys twice the updates of batch 16 in that
  # time.
  config.total_steps = 1000
  config.batch_size = 8
  config.learning_rate = 3e-4
  config.warmup_steps = 50
  config.weight_decay = 0.0
  config.checkpoint_every = 200
  # Every checkpoint is kept, for learning curves of the evaluation.
  config.keep_checkpoints = 5
  config.log_every = 10
  config.sample_every = 500
  # With the recipe's lambda_ar = 0.2 and 2:1 generation rows, a run of
  # this config still gave every test image the same caption after 600
  # steps, so the demo weighs captioning as much as generation.
  config.lambda_ar = 1.0
  config.generation_fraction = 0.5
  config.sample_prompts = tuple(
      fashion_mnist.caption_for(label, 0) for label in (7, 1, 8, 3))
  config.sample_cfg_scale = 3.0
  config.sample_steps = 20
  return config
