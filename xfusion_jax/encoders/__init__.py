"""Frozen pretrained image encoders: images in [-1, 1] to patch features."""

from xfusion_jax.encoders.clip import load_clip_vision
from xfusion_jax.encoders.efficientnet_lite import load_efficientnet_lite0
from xfusion_jax.encoders.interface import ImageEncoder
from xfusion_jax.encoders.interface import Preprocessing
from xfusion_jax.encoders.siglip import load_siglip_vision
