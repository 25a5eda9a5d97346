"""Small KL autoencoder trained on Fashion-MNIST, the offline default.

No pretrained image VAE ships in a package that this project can install,
so the demo trains its own: 28x28x1 images -> 7x7x4 latents.

  python -m xfusion_jax.autoencoder.train_demo \
      --config=configs/autoencoder_demo.py --workdir=/tmp/ae_demo
"""

from xfusion_jax.autoencoder import train_demo


def get_config():
  return train_demo.default_config()
