"""Small KL autoencoder trained on Fashion-MNIST, the offline default.

No pretrained image VAE ships in a package that this project can install,
so the demo trains its own: 28x28x1 images -> 7x7x4 latents.

  python -m xfusion_jax.autoencoder.train_demo \
      --config=configs/autoencoder_demo.py --workdir=/tmp/ae_demo
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.dataset = "fashion_mnist_captions"
  config.data_dir = ml_collections.FieldReference(None, field_type=str)
  config.image_size = 28
  config.image_channels = 1

  config.model = ml_collections.ConfigDict()
  config.model.block_out_channels = (16, 32, 32)
  config.model.layers_per_block = 1
  config.model.latent_channels = 4
  config.model.norm_num_groups = 8
  config.model.mid_block_add_attention = True
  # Set after training from the latents' standard deviation, so that the
  # diffusion model sees latents of about unit variance.
  config.model.scaling_factor = 1.0

  config.seed = 0
  config.batch_size = 32
  config.num_steps = 1500
  config.learning_rate = 1e-3
  config.warmup_steps = 100
  # Weight of the KL term against the per-pixel MSE; small, as in the SD-VAE,
  # so that latents stay informative.
  config.kl_weight = 1e-6
  config.log_every = 100
  config.eval_examples = 2000
  return config
