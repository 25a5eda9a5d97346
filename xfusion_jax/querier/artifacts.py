"""Load a trained querier model from a workdir, and export it with PEFT LoRA.

An export folder contains:
- `llm/`: the frozen LLM as a Hugging Face folder;
- `adapter_config.json` and `adapter_model.safetensors`: the general
  tower's LoRA in the `peft` library's format, so
  `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(
  EXPORT/"llm"), EXPORT)` is the general tower (and the whole plain LoRA
  fine-tune);
- `specific_tower.safetensors` (querier-aware models only): every
  `SpecificMLP` as `model.layers.{i}.specific_mlp.{gate,up,down}_proj.weight`
  in PyTorch `Linear` layout (`[out, in]`), and the tower's final norm as
  `model.specific_norm.weight`;
- `heads.safetensors` (querier-aware models only): the contrastive heads
  under `heads/...` and the merge gate under `gate/...`, flattened
  parameter paths;
- `querier_config.json`: the settings that rebuild the model.
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
import numpy as np
import safetensors.numpy

from xfusion_jax import llm
from xfusion_jax.llm import checkpoint as hf_checkpoint
from xfusion_jax.querier import model as querier_model
from xfusion_jax.querier import task as querier_task
from xfusion_jax.train import checkpointing

LLM_DIR = "llm"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SPECIFIC_FILE = "specific_tower.safetensors"
HEADS_FILE = "heads.safetensors"
CONFIG_FILE = "querier_config.json"

# Keys of the training config that rebuild the model.
MODEL_KEYS = ("lora_rank", "lora_alpha", "lora_dropout", "specific_rank",
              "gated_merge", "specific_tower", "dtype", "remat_policy",
              "seq_len")
_LORA_MODULES = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
                 "mlp": ("gate_proj", "up_proj", "down_proj")}
_SPECIFIC_NAMES = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
# PEFT's LoraModel wraps the transformers model as `base_model.model`.
_PEFT_PREFIX = "base_model.model.model.layers"


@dataclasses.dataclass
class TrainedQuerier:
  """A trained querier model ready for inference.

  Attributes:
    lm: the frozen LLM (tokenizer included).
    module: the deterministic `QuerierLM`.
    params: its "params" collection (unboxed).
    heads: the contrastive heads' parameters, or None for a plain LoRA run.
    settings: the `MODEL_KEYS` of the run's config.
    run_config: the whole training config, when loaded from a workdir.
    frozen_source: path and weight hash of the frozen LLM, when loaded from
      a workdir.
  """

  lm: llm.FrozenLM
  module: querier_model.QuerierLM
  params: Any
  heads: Any
  settings: dict[str, Any]
  run_config: dict[str, Any] | None = None
  frozen_source: dict[str, str] | None = None

  @property
  def specific_tower(self) -> bool:
    return bool(self.settings.get("specific_tower", True))

  @property
  def variables(self) -> dict[str, Any]:
    return {**self.lm.variables, "params": self.params}


def _model_settings(config: dict[str, Any]) -> dict[str, Any]:
  settings = {k: config[k] for k in MODEL_KEYS if k in config}
  settings.setdefault("specific_tower", True)
  return settings


def load_workdir(workdir: str | os.PathLike[str],
                 step: int | None = None) -> TrainedQuerier:
  """Load the latest (or the given) checkpoint of a querier training workdir.

  Raises:
    FileNotFoundError: when the workdir has no complete checkpoint.
    ValueError: when the workdir contains a run of another task.
    checkpointing.FrozenSourceMismatchError: when the frozen LLM the run
      trained beside has changed since.
  """
  run = checkpointing.load_saved_run(workdir, step, task="querier")
  lm = llm.from_pretrained(run.frozen_source["path"],
                           dtype=run.config["dtype"])
  settings = _model_settings(run.config)
  module = querier_task.build_model(lm.config, settings)
  trainable = nn.meta.unbox(run.state["params"])
  return TrainedQuerier(lm, module, trainable["model"],
                        trainable.get("heads"), settings,
                        run_config=run.config, frozen_source=run.frozen_source)


def peft_state_dict(params: Any) -> dict[str, np.ndarray]:
  """Return the LoRA leaves of `QuerierLM` params under PEFT's names and layout.

  PEFT stores `lora_A.weight` as `[rank, in_features]` and `lora_B.weight`
  as `[out_features, rank]`. Our `lora_a` is `[layers, *in_axes, rank]` and
  `lora_b` `[layers, rank, *out_axes]`, and the head axes flatten in the
  order of the frozen kernels' HF layout.
  """
  layers = params["model"]["layers"]
  tensors = {}
  for block, names in _LORA_MODULES.items():
    for name in names:
      lora_a = np.asarray(layers[block][name]["lora_a"], np.float32)
      lora_b = np.asarray(layers[block][name]["lora_b"], np.float32)
      rank = lora_a.shape[-1]
      for i in range(lora_a.shape[0]):
        prefix = f"{_PEFT_PREFIX}.{i}.{block}.{name}"
        tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(
            lora_a[i].reshape(-1, rank).T)
        tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(
            lora_b[i].reshape(rank, -1).T)
  return tensors


def peft_adapter_config(settings: dict[str, Any],
                        base_model_dir: str) -> dict[str, Any]:
  """Return the `adapter_config.json` contents of the general tower's LoRA."""
  return {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_model_dir,
      "r": int(settings["lora_rank"]),
      "lora_alpha": float(settings["lora_alpha"]),
      "lora_dropout": float(settings["lora_dropout"]),
      "target_modules": [n for names in _LORA_MODULES.values()
                         for n in names],
      "bias": "none",
      "fan_in_fan_out": False,
      "use_rslora": False,
      "use_dora": False,
      "init_lora_weights": True,
      "inference_mode": True,
  }


def _specific_state_dict(params: Any) -> dict[str, np.ndarray]:
  stack = params["model"]
  tensors = {"model.specific_norm.weight": np.asarray(
      stack["specific_norm"]["scale"], np.float32)}
  for leaf, name in _SPECIFIC_NAMES.items():
    weights = np.asarray(stack["layers"]["specific_mlp"][leaf], np.float32)
    for i in range(weights.shape[0]):
      tensors[f"model.layers.{i}.specific_mlp.{name}.weight"] = (
          np.ascontiguousarray(weights[i].T))
  return tensors


def export(trained: TrainedQuerier, out_dir: str | os.PathLike[str]) -> None:
  """Write the export folder described in the module docstring."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  llm.save_pretrained(trained.lm, out / LLM_DIR)
  params = trained.params
  safetensors.numpy.save_file(peft_state_dict(params), out / ADAPTER_WEIGHTS,
                              {"format": "pt"})
  with open(out / ADAPTER_CONFIG, "w", encoding="utf-8") as f:
    # NOTE: the absolute path lets `AutoPeftModelForCausalLM` find the base
    # model; after moving the folder, load EXPORT/llm explicitly.
    json.dump(peft_adapter_config(trained.settings,
                                  str((out / LLM_DIR).resolve())), f, indent=2)
  if trained.specific_tower:
    safetensors.numpy.save_file(_specific_state_dict(params),
                                out / SPECIFIC_FILE, {"format": "pt"})
    extra = {}
    if "gate" in trained.params:
      extra.update(
          hf_checkpoint.flatten_named(trained.params["gate"], "gate"))
    if trained.heads is not None:
      extra.update(hf_checkpoint.flatten_named(trained.heads, "heads"))
    safetensors.numpy.save_file(extra, out / HEADS_FILE)
  with open(out / CONFIG_FILE, "w", encoding="utf-8") as f:
    json.dump(trained.settings, f, indent=2)


def _read(path: pathlib.Path) -> dict[str, np.ndarray]:
  with safetensors.safe_open(path, "np") as f:
    return {name: f.get_tensor(name) for name in f.keys()}


def _restore_leaf(keys: tuple[str, ...], shape: tuple[int, ...],
                  tensors: dict[str, np.ndarray]) -> np.ndarray:
  """Rebuild one Flax leaf of the querier model from exported tensors."""
  if keys[:2] == ("model", "layers") and keys[-1] in ("lora_a", "lora_b"):
    block, name = keys[2], keys[3]
    suffix = "lora_A" if keys[-1] == "lora_a" else "lora_B"
    blocks = [tensors[f"{_PEFT_PREFIX}.{i}.{block}.{name}.{suffix}.weight"]
              for i in range(shape[0])]
    return np.stack([b.T.reshape(shape[1:]) for b in blocks])
  if keys[:3] == ("model", "layers", "specific_mlp"):
    name = _SPECIFIC_NAMES[keys[3]]
    return np.stack([
        tensors[f"model.layers.{i}.specific_mlp.{name}.weight"].T
        for i in range(shape[0])])
  if keys == ("model", "specific_norm", "scale"):
    return tensors["model.specific_norm.weight"]
  if keys[0] == "gate":
    return tensors["/".join(keys)]
  raise ValueError(f"The export has no rule for parameter {'/'.join(keys)}.")


def load_export(export_dir: str | os.PathLike[str]) -> TrainedQuerier:
  """Load an export folder back; the model gives the trained outputs.

  Raises:
    ValueError: when a tensor is missing or has the wrong shape.
  """
  folder = pathlib.Path(export_dir)
  with open(folder / CONFIG_FILE, encoding="utf-8") as f:
    settings = json.load(f)
  lm = llm.from_pretrained(folder / LLM_DIR, dtype=settings["dtype"])
  module = querier_task.build_model(lm.config, settings)
  ids = jnp.zeros((1, 2), jnp.int32)
  abstract = nn.meta.unbox(jax.eval_shape(
      lambda: module.init(jax.random.key(0), ids, ids,
                          jnp.ones((1, 2), bool))["params"]))
  tensors = _read(folder / ADAPTER_WEIGHTS)
  heads = None
  if settings.get("specific_tower", True):
    tensors.update(_read(folder / SPECIFIC_FILE))
    extra = _read(folder / HEADS_FILE)
    tensors.update({k: v for k, v in extra.items() if k.startswith("gate/")})
    heads_flat = {k[len("heads/"):]: v for k, v in extra.items()
                  if k.startswith("heads/")}
    heads = hf_checkpoint.unflatten_named(heads_flat) if heads_flat else None

  def restore(path, leaf):
    keys = tuple(k.key for k in path)
    try:
      value = _restore_leaf(keys, leaf.shape, tensors)
    except KeyError as e:
      raise ValueError(f"{folder} lacks tensor {e} of parameter "
                       f"{'/'.join(keys)}; re-export the model.") from e
    if value.shape != leaf.shape:
      raise ValueError(f"{folder}: parameter {'/'.join(keys)} has shape "
                       f"{value.shape}, expected {leaf.shape}.")
    return jnp.asarray(value, leaf.dtype)

  params = jax.tree_util.tree_map_with_path(restore, abstract)
  return TrainedQuerier(lm, module, params, heads, settings)


