"""Image autoencoders (KL, SD-VAE layout) that map images to latents."""

from xfusion_jax.autoencoder.interface import ImageAutoencoder
from xfusion_jax.autoencoder.interface import load
from xfusion_jax.autoencoder.modules import AutoencoderConfig
