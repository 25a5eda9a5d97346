"""Import of transformers `CLIPVisionModel` folders as a frozen Flax encoder.

Reads config.json and safetensors weights (transformers 4 or 5 names, or a
full `CLIPModel` folder, whose text tower is skipped). PyTorch is not needed.
Features are the patch tokens of the last hidden state, without the class
token and before `post_layernorm`, which CLIP applies only to the pooled class
token.
"""

from __future__ import annotations

import os
import re

import transformers

from xfusion_jax.encoders import interface
from xfusion_jax.encoders import vit

# Weights the patch features do not use: post_layernorm normalizes only the
# pooled class token, and position_ids is a buffer some old checkpoints store.
_IGNORED = re.compile(r"post_layernorm\..*|embeddings\.position_ids")


def config_from_hf(hf_config: transformers.PretrainedConfig) -> vit.ViTConfig:
  """Map a transformers CLIP or CLIP vision config to ViTConfig."""
  if isinstance(hf_config, transformers.CLIPConfig):
    hf_config = hf_config.vision_config
  if not isinstance(hf_config, transformers.CLIPVisionConfig):
    raise ValueError(
        f"Expected a CLIP config (model_type clip or clip_vision_model), got "
        f"model_type {hf_config.model_type!r}.")
  return vit.config_from_vision_config(
      hf_config, class_token=True, pre_layernorm=True,
      post_layernorm=False, patch_bias=False)


def load_clip_vision(
    folder: os.PathLike[str] | str) -> vit.VisionTransformerEncoder:
  """Load a CLIP vision tower from a local transformers folder.

  Args:
    folder: contains config.json and model.safetensors (or a sharded
      safetensors index). preprocessor_config.json, if present, sets the
      normalization, otherwise OpenAI CLIP's mean and std are used.

  Returns:
    An encoder whose `features` are [batch, (image_size / patch_size)**2,
    hidden_size].
  """
  config = config_from_hf(transformers.AutoConfig.from_pretrained(folder))
  tensors = vit.read_vision_tensors(folder, _IGNORED)
  params = vit.convert_tensors(tensors, config, folder)
  mean, std = vit.read_statistics(folder, interface.CLIP_MEAN,
                                  interface.CLIP_STD)
  # CLIPImageProcessor resizes with bicubic resampling.
  preprocessing = interface.Preprocessing(
      (config.image_size, config.image_size), mean, std, "bicubic")
  return vit.VisionTransformerEncoder(config, params, preprocessing)
