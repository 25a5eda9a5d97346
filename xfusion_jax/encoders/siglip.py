"""Import of transformers `SiglipVisionModel` folders as a frozen Flax encoder.

Reads config.json and safetensors weights (transformers 4 or 5 names, or a
full `SiglipModel` folder, whose text tower is skipped). PyTorch is not
needed. Features are the last hidden state, after `post_layernorm`, as
`SiglipVisionModel` returns it. SigLIP has no class token.
"""

from __future__ import annotations

import os
import re

import transformers

from xfusion_jax.encoders import interface
from xfusion_jax.encoders import vit

# The attention-pooling head makes one pooled vector, which patch features do
# not use. position_ids is a buffer that some old checkpoints store.
_IGNORED = re.compile(r"head\..*|embeddings\.position_ids")
# SiglipImageProcessor's default statistics map [0, 1] to [-1, 1].
_SIGLIP_MEAN = (0.5, 0.5, 0.5)
_SIGLIP_STD = (0.5, 0.5, 0.5)


def config_from_hf(hf_config: transformers.PretrainedConfig) -> vit.ViTConfig:
  """Map a transformers SigLIP or SigLIP vision config to ViTConfig."""
  if isinstance(hf_config, transformers.SiglipConfig):
    hf_config = hf_config.vision_config
  if not isinstance(hf_config, transformers.SiglipVisionConfig):
    raise ValueError(
        f"Expected a SigLIP config (model_type siglip or "
        f"siglip_vision_model), got model_type {hf_config.model_type!r}.")
  return vit.config_from_vision_config(
      hf_config, class_token=False, pre_layernorm=False,
      post_layernorm=True, patch_bias=True)


def load_siglip_vision(
    folder: os.PathLike[str] | str) -> vit.VisionTransformerEncoder:
  """Load a SigLIP vision tower from a local transformers folder.

  Args:
    folder: contains config.json and model.safetensors (or a sharded
      safetensors index). preprocessor_config.json, if present, sets the
      normalization, otherwise mean and std 0.5.

  Returns:
    An encoder whose `features` are [batch, (image_size / patch_size)**2,
    hidden_size].
  """
  config = config_from_hf(transformers.AutoConfig.from_pretrained(folder))
  tensors = vit.read_vision_tensors(folder, _IGNORED)
  params = vit.convert_tensors(tensors, config, folder)
  mean, std = vit.read_statistics(folder, _SIGLIP_MEAN, _SIGLIP_STD)
  # SiglipImageProcessor resizes with bicubic resampling.
  preprocessing = interface.Preprocessing(
      (config.image_size, config.image_size), mean, std, "bicubic")
  return vit.VisionTransformerEncoder(config, params, preprocessing)
