"""Import of diffusers `AutoencoderKL` folders (config.json + safetensors).

Covers the SD 1.5 VAE family: DownEncoderBlock2D/UpDecoderBlock2D levels,
SiLU, a Gaussian posterior and a scaling factor from the config. Reads the
weights with safetensors' numpy loader, so PyTorch is not needed.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Any

import flax
import jax
import numpy as np
from safetensors import numpy as safetensors_numpy

from xfusion_jax.autoencoder import interface
from xfusion_jax.autoencoder import modules

_WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
# Attention parameter names of checkpoints saved before diffusers 0.14.
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v",
                     "proj_attn": "to_out_0"}


def config_from_diffusers(raw: dict[str, Any]) -> modules.AutoencoderConfig:
  """Map a diffusers AutoencoderKL config.json dict to AutoencoderConfig."""
  for key, expected in (("down_block_types", "DownEncoderBlock2D"),
                        ("up_block_types", "UpDecoderBlock2D")):
    found = set(raw.get(key, [expected]))
    if found != {expected}:
      raise ValueError(f"Unsupported {key} {sorted(found)}; only {expected} "
                       "(the SD-VAE layout) is implemented.")
  if raw.get("act_fn", "silu") != "silu":
    raise ValueError(f"Unsupported act_fn {raw['act_fn']!r}; expected silu.")
  return modules.AutoencoderConfig(
      in_channels=raw.get("in_channels", 3),
      out_channels=raw.get("out_channels", 3),
      block_out_channels=tuple(raw.get("block_out_channels", (64,))),
      layers_per_block=raw.get("layers_per_block", 1),
      latent_channels=raw.get("latent_channels", 4),
      norm_num_groups=raw.get("norm_num_groups", 32),
      mid_block_add_attention=raw.get("mid_block_add_attention", True),
      use_quant_conv=raw.get("use_quant_conv", True),
      use_post_quant_conv=raw.get("use_post_quant_conv", True),
      scaling_factor=float(raw.get("scaling_factor", 0.18215)),
      shift_factor=float(raw.get("shift_factor") or 0.0),
  )


def flax_path(key: str) -> tuple[str, ...]:
  """Map a diffusers parameter name to its path in the Flax params tree.

  "encoder.down_blocks.0.resnets.1.norm1.weight" becomes
  ("encoder", "down_blocks_0_resnets_1", "norm1", "weight"); the last part
  is renamed by `convert_leaf`.
  """
  parts = re.sub(r"\.(\d+)", r"_\1", key).split(".")
  parts = [_LEGACY_ATTENTION.get(part, part) for part in parts]
  merged = []
  i = 0
  while i < len(parts):
    part = parts[i]
    if re.fullmatch(r"(down|up)_blocks_\d+", part):
      child = parts[i + 1]
      if child.startswith(("downsamplers_", "upsamplers_")):
        merged.append(f"{part}_{child}_{parts[i + 2]}")
        i += 3
        continue
      merged.append(f"{part}_{child}")
      i += 2
      continue
    merged.append(part)
    i += 1
  return tuple(merged)


def convert_leaf(path: tuple[str, ...],
                 value: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
  """Rename a weight or bias and transpose it from PyTorch to Flax layout."""
  *module, leaf = path
  if leaf == "bias":
    return tuple(module) + ("bias",), value
  if leaf != "weight":
    raise ValueError(f"Unexpected parameter {'.'.join(path)}.")
  if value.ndim == 1:
    return tuple(module) + ("scale",), value
  is_attention_projection = module[-1] in ("to_q", "to_k", "to_v", "to_out_0")
  if is_attention_projection:
    # Legacy checkpoints may store these as 1x1 convs: [out, in, 1, 1].
    return tuple(module) + ("kernel",), value.reshape(value.shape[:2]).T
  # Conv weights: PyTorch [out, in, kh, kw] -> Flax [kh, kw, in, out].
  return tuple(module) + ("kernel",), value.transpose(2, 3, 1, 0)


def convert_state_dict(state: dict[str, np.ndarray],
                       config: modules.AutoencoderConfig) -> Any:
  """Convert a diffusers state dict and check it against the Flax tree."""
  flat = {}
  for key, value in state.items():
    path, array = convert_leaf(flax_path(key), np.asarray(value, np.float32))
    flat[path] = array
  expected = flax.traverse_util.flatten_dict(
      jax.eval_shape(lambda: interface.init_params(
          config, jax.random.key(0), 2 * config.downsample_factor)))
  missing = sorted("/".join(p) for p in expected.keys() - flat.keys())
  unexpected = sorted("/".join(p) for p in flat.keys() - expected.keys())
  if missing or unexpected:
    raise ValueError(
        "The checkpoint does not match the config: missing "
        f"{missing[:10]}, unexpected {unexpected[:10]}.")
  for path, shape_dtype in expected.items():
    if flat[path].shape != shape_dtype.shape:
      raise ValueError(f"{'/'.join(path)} has shape {flat[path].shape} in "
                       f"the checkpoint, expected {shape_dtype.shape}.")
  return flax.traverse_util.unflatten_dict(flat)


def load_diffusers(
    folder: os.PathLike[str] | str) -> interface.ImageAutoencoder:
  """Load a diffusers AutoencoderKL folder as an ImageAutoencoder."""
  folder = pathlib.Path(folder)
  weights = folder / _WEIGHTS_FILE
  if not weights.exists():
    raise FileNotFoundError(
        f"{weights} not found. Only safetensors weights are read; convert a "
        ".bin checkpoint with diffusers' save_pretrained("
        "safe_serialization=True).")
  config = config_from_diffusers(json.loads((folder / "config.json").read_text()))
  params = convert_state_dict(safetensors_numpy.load_file(weights), config)
  return interface.ImageAutoencoder(config, params)
