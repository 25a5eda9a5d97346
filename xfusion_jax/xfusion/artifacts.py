"""Load a trained X-Fusion model from a workdir, and export it.

An export folder has three parts:
- `llm/`: the frozen LLM as a standard Hugging Face folder;
- `vision_tower.safetensors`: the trainable blocks in Llama state-dict names
  (`model.layers.{i}.self_attn.q_proj.weight`, ...) plus `model.norm.weight`
  for the vision final norm ("single_tower" exports its fine-tuned text
  blocks under the same names);
- `heads.safetensors` and `xfusion_config.json`: patchify, unpatchify,
  timestep MLP, BOI/EOI embeddings, X-Fuse or gate scalars, flattened as
  `path/to/leaf`, and the settings needed to rebuild the model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import safetensors.numpy

from xfusion_jax import llm
from xfusion_jax.llm import checkpoint as hf_checkpoint
from xfusion_jax.train import checkpointing
from xfusion_jax.xfusion import model as model_lib
from xfusion_jax.xfusion import task as task_lib

LLM_DIR = "llm"
VISION_FILE = "vision_tower.safetensors"
HEADS_FILE = "heads.safetensors"
CONFIG_FILE = "xfusion_config.json"

# Keys of the training config that describe the model (not the run).
_MODEL_KEYS = ("architecture", "xfuse", "latent_channels", "latent_size",
               "patch_size", "dtype", "param_dtype", "max_caption_tokens",
               "autoencoder")


@dataclasses.dataclass
class TrainedXFusion:
  """A trained X-Fusion model ready for inference.

  Attributes:
    lm: the frozen LLM (tokenizer included).
    module: the X-Fusion module.
    frozen: its "frozen" collection.
    params: its "params" collection.
    settings: model settings (architecture, latent shape, autoencoder, ...).
    run_config: the whole training config, when loaded from a workdir.
    step: the checkpoint's step, when loaded from a workdir.
  """

  lm: llm.FrozenLM
  module: model_lib.XFusion
  frozen: Any
  params: Any
  settings: dict[str, Any]
  run_config: dict[str, Any] | None = None
  step: int | None = None


def _settings_config(settings: dict[str, Any]) -> ml_collections.ConfigDict:
  config = task_lib.add_fields(ml_collections.ConfigDict())
  for key in _MODEL_KEYS:
    if key in settings:
      config[key] = settings[key]
  return config


def _build(lm: llm.FrozenLM, settings: dict[str, Any]):
  config = _settings_config(settings)
  module = model_lib.XFusion(lm.config, task_lib.xfusion_config(config),
                             frozen_dtype=jnp.dtype(config.dtype))
  frozen = model_lib.frozen_from_lm(lm.weights)
  return module, frozen


def load_workdir(workdir: str | os.PathLike[str],
                 step: int | None = None) -> TrainedXFusion:
  """Load the latest (or the given) checkpoint of a training workdir.

  Raises:
    FileNotFoundError: when the workdir has no complete checkpoint.
    ValueError: when the workdir contains a run of another task.
    checkpointing.FrozenSourceMismatchError: when the frozen LLM the run
      trained beside has changed since.
  """
  run = checkpointing.load_saved_run(workdir, step, task="xfusion")
  settings = run.config
  lm = llm.from_pretrained(run.frozen_source["path"], dtype=settings["dtype"])
  module, frozen = _build(lm, settings)
  return TrainedXFusion(lm, module, frozen, run.state["params"],
                        {k: settings[k] for k in _MODEL_KEYS if k in settings},
                        run_config=settings, step=run.step)


def _tower_key(params: Any) -> str:
  return "text" if "text" in params["layers"] else "vision"


def export(trained: TrainedXFusion, out_dir: str | os.PathLike[str]) -> None:
  """Write the export folder described in the module docstring."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  llm.save_pretrained(trained.lm, out / LLM_DIR)
  params = trained.params
  tower = params["layers"][_tower_key(params)]
  weights = {"model": {"layers": tower, "norm": params["vision_norm"]}}
  tensors = hf_checkpoint.hf_state_dict(weights, trained.lm.config)
  safetensors.numpy.save_file(tensors, out / VISION_FILE, {"format": "pt"})
  heads = {k: v for k, v in params.items()
           if k not in ("layers", "vision_norm")}
  layer_scalars = {k: v for k, v in params["layers"].items()
                   if k not in ("text", "vision")}
  if layer_scalars:
    heads["layers"] = layer_scalars
  safetensors.numpy.save_file(hf_checkpoint.flatten_named(heads),
                              out / HEADS_FILE)
  settings = dict(trained.settings, tower=_tower_key(params))
  with open(out / CONFIG_FILE, "w", encoding="utf-8") as f:
    json.dump(settings, f, indent=2)


def load_export(export_dir: str | os.PathLike[str]) -> TrainedXFusion:
  """Load an export folder back for inference."""
  folder = pathlib.Path(export_dir)
  with open(folder / CONFIG_FILE, encoding="utf-8") as f:
    settings = json.load(f)
  lm = llm.from_pretrained(folder / LLM_DIR, dtype=settings["dtype"])
  module, frozen = _build(lm, settings)
  param_dtype = jnp.dtype(settings["param_dtype"])
  abstract = nn.meta.unbox(jax.eval_shape(
      lambda: module.init({model_lib.TRAINABLE: jax.random.key(0)},
                          **model_lib.example_inputs(module.config))))
  tower_shapes = abstract[model_lib.TRAINABLE]["layers"][settings["tower"]]
  stack_shapes = {"model": {"layers": tower_shapes,
                            "norm": abstract[model_lib.TRAINABLE][
                                "vision_norm"]}}
  with safetensors.safe_open(folder / VISION_FILE, "np") as f:
    hf_tensors = {name: f.get_tensor(name) for name in f.keys()}
  stack = _from_hf(hf_tensors, stack_shapes, lm.config, param_dtype)
  with safetensors.safe_open(folder / HEADS_FILE, "np") as f:
    params = hf_checkpoint.unflatten_named(
        {name: f.get_tensor(name) for name in f.keys()})
  layer_scalars = params.pop("layers", {})
  params["layers"] = dict(layer_scalars,
                          **{settings["tower"]: stack["model"]["layers"]})
  params["vision_norm"] = stack["model"]["norm"]
  return TrainedXFusion(lm, module, frozen, params, settings)


def _from_hf(tensors, shapes, config, dtype):
  """Rebuild Flax leaves of `shapes` from HF-named tensors (in memory)."""
  out = {}
  for path, shape in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    keys = tuple(k.key for k in path)
    plan = hf_checkpoint.leaf_plan(keys, config)
    full = tuple(shape.shape)
    per_layer = full[1:] if plan.stacked else full
    index = (slice(None),) * len(per_layer)
    blocks = [hf_checkpoint.read_flax_block(tensors[name], plan.layout,
                                            per_layer, index)
              for name in plan.hf_names]
    value = np.stack(blocks) if plan.stacked else blocks[0]
    out[keys] = jnp.asarray(value, dtype)
  return hf_checkpoint.unflatten_paths(out)
