"""Load a Hugging Face LLM into Flax as frozen weights, run it, export it."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import shutil
from typing import Any

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

from xfusion_jax import sharding as sharding_lib
from xfusion_jax.llm import checkpoint
from xfusion_jax.llm import config as config_lib
from xfusion_jax.llm import model as model_lib
from xfusion_jax.llm import sampling

GENERATION_CONFIG = "generation_config.json"


_WEIGHT_DTYPES = ("float32", "bfloat16", "float16")


def _as_dtype(dtype: Any) -> jnp.dtype:
  try:
    parsed = jnp.dtype(dtype)
  except TypeError:
    parsed = None
  if parsed is None or parsed.name not in _WEIGHT_DTYPES:
    raise ValueError(f"Invalid dtype {dtype!r}; use one of "
                     f"{', '.join(_WEIGHT_DTYPES)}.")
  return parsed


@dataclasses.dataclass
class FrozenLM:
  """A pretrained LLM held as frozen, possibly sharded, Flax weights.

  Attributes:
    module: the Flax module; apply it to `variables`.
    config: the parsed HF config.
    tokenizer: the HF tokenizer of the folder, or None if it has none.
    weights: tree of `jax.Array` for the "frozen" collection.
    mesh: the device mesh the weights are sharded over, or None.
    rules: logical-axis rules used for the weights and activations.
    source_dir: the folder the weights were read from.
    generation_config: contents of generation_config.json (may be empty).
  """

  module: model_lib.CausalLM
  config: config_lib.LMConfig
  tokenizer: Any
  weights: dict[str, Any]
  mesh: Mesh | None = None
  rules: sharding_lib.Rules = sharding_lib.DEFAULT_RULES
  source_dir: str = ""
  generation_config: dict[str, Any] = dataclasses.field(default_factory=dict)
  # init=False: dataclasses.replace() starts these caches afresh, so a copy
  # with other weights never decodes with the old ones.
  _compiled: dict[Any, Any] = dataclasses.field(
      default_factory=dict, repr=False, init=False)
  _per_layer_weights: dict[str, Any] | None = dataclasses.field(
      default=None, repr=False, init=False)

  @property
  def variables(self) -> dict[str, Any]:
    return {model_lib.FROZEN: self.weights}

  @property
  def dtype(self) -> jnp.dtype:
    return jnp.dtype(self.module.param_dtype)

  def _place_batch(self, array: np.ndarray) -> jax.Array:
    """Put a `[batch, ...]` input on the mesh, split over the batch axes."""
    if self.mesh is None:
      return jnp.asarray(array)
    batch_axes = nn.logical_to_mesh_axes(("activation_batch",), self.rules)[0]
    spec = sharding_lib._fit_spec(  # pylint: disable=protected-access
        "input batch", array.shape, PartitionSpec(batch_axes), self.mesh)
    return jax.device_put(array, NamedSharding(self.mesh, spec))

  def _jit(self, key: Any, fn) -> Any:
    if key not in self._compiled:
      self._compiled[key] = jax.jit(fn)
    return self._compiled[key]

  def _run(self, fn, *args):
    """Call a jitted function with the mesh and logical rules in scope."""
    if self.mesh is None:
      return fn(*args)
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return fn(*args)

  def _inputs(self, input_ids, attention_mask):
    input_ids = np.asarray(input_ids, dtype=np.int32)
    if input_ids.ndim != 2 or 0 in input_ids.shape:
      raise ValueError("input_ids must be a non-empty [batch, seq] array, got "
                       f"shape {input_ids.shape}.")
    if attention_mask is None:
      attention_mask = np.ones_like(input_ids)
    attention_mask = np.asarray(attention_mask, dtype=np.int32)
    if attention_mask.shape != input_ids.shape:
      raise ValueError(
          f"attention_mask shape {attention_mask.shape} differs from "
          f"input_ids shape {input_ids.shape}.")
    return self._place_batch(input_ids), self._place_batch(attention_mask)

  def logits(self, input_ids, attention_mask=None) -> jax.Array:
    """Return float32 logits `[batch, seq, vocab]` of a (left-padded) batch.

    The columns of the vocabulary padding (see `LMConfig.vocab_padding`) are
    removed.
    """
    input_ids, attention_mask = self._inputs(input_ids, attention_mask)

    def forward(variables, ids, mask):
      positions = model_lib.positions_from_mask(mask)
      logits, _ = self.module.apply(variables, ids, positions, mask.astype(bool))
      return logits[..., :self.config.vocab_size].astype(jnp.float32)

    fn = self._jit("logits", forward)
    return self._run(fn, self.variables, input_ids, attention_mask)

  def eos_token_ids(self) -> tuple[int, ...]:
    eos = self.generation_config.get("eos_token_id")
    if eos is not None:
      return config_lib._token_ids(eos)  # pylint: disable=protected-access
    if self.config.eos_token_ids:
      return self.config.eos_token_ids
    if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
      return (int(self.tokenizer.eos_token_id),)
    return ()

  def pad_token_id(self) -> int:
    for candidate in (self.generation_config.get("pad_token_id"),
                      self.config.pad_token_id,
                      getattr(self.tokenizer, "pad_token_id", None)):
      if candidate is not None:
        return int(candidate)
    eos = self.eos_token_ids()
    return eos[0] if eos else 0

  def generate(self, input_ids, attention_mask=None, *,
               max_new_tokens: int = 32, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> np.ndarray:
    """Continue left-padded prompts with a KV cache.

    Args:
      input_ids: `[batch, prompt_len]` token ids, left-padded.
      attention_mask: `[batch, prompt_len]`, 0 at padding (default all 1).
      max_new_tokens: the number of tokens to generate at most.
      temperature: 0 for greedy decoding, else the softmax temperature.
      top_k: keep only the k most likely tokens (0 disables).
      top_p: nucleus sampling mass (1 disables).
      seed: random seed for sampling.

    Returns:
      `[batch, max_new_tokens]` int32 tokens; after a row's EOS token the
      rest of the row is the pad id.
    """
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
      raise ValueError(
          f"Invalid sampling settings temperature={temperature}, "
          f"top_k={top_k}, top_p={top_p}: need temperature >= 0, top_k >= 0 "
          "and 0 < top_p <= 1.")
    input_ids, attention_mask = self._inputs(input_ids, attention_mask)
    length = input_ids.shape[1] + max_new_tokens
    if length > self.config.max_position_embeddings:
      logging.warning(
          "Prompt (%d tokens) plus max_new_tokens=%d exceeds the model's "
          "max_position_embeddings=%d; positions beyond it were not trained.",
          input_ids.shape[1], max_new_tokens,
          self.config.max_position_embeddings)
    settings = (max_new_tokens, float(temperature), int(top_k), float(top_p),
                self.eos_token_ids(), self.pad_token_id())
    module, variables = self._decoding_model()
    fn = self._jit(("generate",) + settings,
                   sampling.make_generate_fn(module, *settings))
    tokens = self._run(fn, variables, input_ids, attention_mask,
                       jax.random.key(seed))
    return np.asarray(jax.device_get(tokens))

  def _decoding_model(self) -> tuple[model_lib.CausalLM, dict[str, Any]]:
    """Return the module and variables that `generate` runs.

    On CPU, decoding runs the layers as a Python loop over per-layer
    weights, which a benchmark measured faster than the scan there. The
    per-layer copy of the weights is made once and kept.
    """
    if jax.default_backend() != "cpu":
      return self.module, self.variables
    if self._per_layer_weights is None:
      self._per_layer_weights = model_lib.decoding_weights(self.config,
                                                           self.weights)
    return (self.module.clone(scan_layers=False, untie_head=True),
            {model_lib.FROZEN: self._per_layer_weights})

  def encode_prompts(self, prompts: list[str], chat: bool = False):
    """Tokenize prompts into a left-padded batch `(input_ids, attention_mask)`.

    With `chat`, each prompt becomes one user message of the tokenizer's chat
    template (instruct models expect this); without it the text is used as
    is (plain continuation).
    """
    if self.tokenizer is None:
      raise ValueError(f"{self.source_dir} has no tokenizer files.")
    if not prompts:
      raise ValueError("encode_prompts needs at least one prompt; got none.")
    rows = []
    for prompt in prompts:
      if chat:
        ids = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True,
            tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
          ids = ids["input_ids"]
      else:
        ids = self.tokenizer(prompt)["input_ids"]
      if not len(ids):
        raise ValueError(f"Prompt {prompt!r} has no tokens; give a non-empty "
                         "prompt.")
      rows.append(list(ids))
    width = max(len(r) for r in rows)
    input_ids = np.full((len(rows), width), self.pad_token_id(), np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
      input_ids[i, width - len(row):] = row
      mask[i, width - len(row):] = 1
    return input_ids, mask

  def decode_tokens(self, tokens: np.ndarray) -> list[str]:
    """Detokenize generated rows, cutting each at its first EOS id."""
    eos = set(self.eos_token_ids())
    texts = []
    for row in np.asarray(tokens).tolist():
      cut = next((i for i, t in enumerate(row) if t in eos), len(row))
      texts.append(self.tokenizer.decode(row[:cut], skip_special_tokens=True))
    return texts


def abstract_weights(module: model_lib.CausalLM) -> Any:
  """Return the boxed (logically partitioned) shape tree of the weights."""
  ids = jnp.zeros((1, 1), jnp.int32)
  variables = jax.eval_shape(
      lambda: module.init(jax.random.key(0), ids, ids, ids.astype(bool)))
  return variables[model_lib.FROZEN]


def from_pretrained(path: str | os.PathLike[str], *, dtype: Any = "bfloat16",
                    mesh: Mesh | None = None,
                    rules: sharding_lib.Rules | None = None,
                    allow_pickle: bool = False,
                    load_tokenizer: bool = True) -> FrozenLM:
  """Load a local Hugging Face causal-LM folder as frozen Flax weights.

  Args:
    path: folder with config.json and safetensors weights (single file or
      sharded with model.safetensors.index.json), plus tokenizer files.
    dtype: storage and compute dtype of the weights.
    mesh: device mesh to shard the weights over (default: one device).
    rules: logical-axis rules (default `sharding.DEFAULT_RULES`).
    allow_pickle: accept pickled pytorch_model.bin weights. Unpickling can
      run code; they load with torch's weights_only mode. Needs torch.
    load_tokenizer: also load the folder's tokenizer with transformers.

  Raises:
    ValueError: for an unsupported architecture or a checkpoint that does not
      match its config (each missing, unexpected or mis-shaped tensor named).
  """
  path = pathlib.Path(path)
  config = config_lib.load_config(path)
  dtype = _as_dtype(dtype)
  rules = tuple(rules or sharding_lib.DEFAULT_RULES)
  padding = sharding_lib.vocab_padding(config.vocab_size, mesh, rules)
  if padding:
    logging.info(
        "Padding the vocabulary of %d tokens with %d rows so that its %d "
        "mesh shards are equal; the padded logits are masked.",
        config.vocab_size, padding,
        sharding_lib.axis_size("vocab", mesh, rules))
    config = dataclasses.replace(config, vocab_padding=padding)
  module = model_lib.CausalLM(config, dtype=dtype, param_dtype=dtype)
  boxed = abstract_weights(module)
  abstract = nn.meta.unbox(boxed)
  if mesh is None:
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: single, abstract)
  else:
    shardings = sharding_lib.logical_shardings(boxed, mesh, rules)
  with checkpoint.CheckpointReader(path, allow_pickle=allow_pickle) as reader:
    weights = checkpoint.load_weights(reader, config, abstract, shardings,
                                      dtype)
  generation_config = {}
  if (path / GENERATION_CONFIG).exists():
    with open(path / GENERATION_CONFIG, encoding="utf-8") as f:
      generation_config = json.load(f)
  tokenizer = None
  if load_tokenizer:
    tokenizer = _load_tokenizer(path)
  logging.info("Loaded %s (%s, %d layers) as %s weights from %s",
               config.model_type, _parameter_summary(abstract),
               config.num_hidden_layers, dtype, path)
  return FrozenLM(module=module, config=config, tokenizer=tokenizer,
                  weights=weights, mesh=mesh, rules=rules,
                  source_dir=str(path), generation_config=generation_config)


def _parameter_summary(abstract: Any) -> str:
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
  return f"{count / 1e6:.1f}M parameters"


def _load_tokenizer(path: pathlib.Path):
  has_files = any((path / n).exists() for n in (
      "tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
  if not has_files:
    logging.warning("No tokenizer files in %s; text methods are unavailable.",
                    path)
    return None
  import transformers  # pylint: disable=g-import-not-at-top
  return transformers.AutoTokenizer.from_pretrained(str(path))


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
  """Parse a byte count such as 5000000, "500MB" or "2GiB"."""
  if isinstance(size, int):
    return size
  match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(size))
  if not match or match.group(2).upper() not in _SIZE_UNITS:
    raise ValueError(f"Invalid size {size!r}; use bytes or e.g. '5GB'.")
  return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


def _rope_parameters(rope: config_lib.RopeConfig) -> dict[str, Any]:
  """Build the transformers 5.x `rope_parameters` dict of one RoPE."""
  parameters: dict[str, Any] = {"rope_type": rope.rope_type,
                                "rope_theta": rope.theta}
  if rope.rope_type in ("linear", "llama3"):
    parameters["factor"] = rope.factor
  if rope.rope_type == "llama3":
    parameters.update(
        low_freq_factor=rope.low_freq_factor,
        high_freq_factor=rope.high_freq_factor,
        original_max_position_embeddings=rope.original_max_position_embeddings)
  return parameters


def _rope_scaling(parameters: dict[str, Any]) -> dict[str, Any] | None:
  """Build the transformers 4.x `rope_scaling` dict (None for plain RoPE)."""
  if parameters["rope_type"] == "default":
    return None
  return {k: v for k, v in parameters.items() if k != "rope_theta"}


def _rope_fields(config: config_lib.LMConfig) -> dict[str, Any]:
  """RoPE keys as both transformers 4.x and 5.x read them."""
  parameters = _rope_parameters(config.rope)
  fields = {"rope_theta": config.rope.theta,
            "rope_scaling": _rope_scaling(parameters),
            "rope_parameters": parameters}
  if config.sliding_rope is not None:
    # Gemma 3: 5.x reads one entry per layer type; 4.x reads rope_theta and
    # rope_scaling for global layers and rope_local_base_freq for local ones.
    fields["rope_parameters"] = {
        config_lib.FULL_ATTENTION: parameters,
        config_lib.SLIDING_ATTENTION: _rope_parameters(config.sliding_rope),
    }
    fields["rope_local_base_freq"] = config.sliding_rope.theta
  return fields


def export_config(lm: FrozenLM) -> dict[str, Any]:
  """Return config.json contents for an export of `lm`."""
  exported = dict(lm.config.source)
  dtype_name = str(lm.dtype)
  exported.update(_rope_fields(lm.config))
  exported.update(
      tie_word_embeddings=lm.config.tie_word_embeddings,
      dtype=dtype_name,
      torch_dtype=dtype_name,
      architectures=exported.get("architectures") or [
          {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
           "qwen2": "Qwen2ForCausalLM",
           "gemma3_text": "Gemma3ForCausalLM"}[lm.config.model_type]],
  )
  return exported


def save_pretrained(lm: FrozenLM, out_dir: str | os.PathLike[str],
                    max_shard_size: int | str = "5GB") -> None:
  """Write `lm` as a Hugging Face folder that transformers loads directly.

  Writes safetensors in the stored dtype (bf16 stays BF16), sharded with an
  index above `max_shard_size`, plus config.json, generation_config.json and
  the tokenizer files. Under several processes every process must call this;
  only process 0 writes.
  """
  tensors = checkpoint.hf_state_dict(lm.weights, lm.config)
  if jax.process_index() != 0:
    return
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  checkpoint.write_safetensors(tensors, out, parse_size(max_shard_size))
  with open(out / "config.json", "w", encoding="utf-8") as f:
    json.dump(export_config(lm), f, indent=2, sort_keys=True)
  generation_config = dict(lm.generation_config) or {
      "bos_token_id": lm.config.bos_token_id,
      "eos_token_id": list(lm.eos_token_ids()),
      "pad_token_id": lm.pad_token_id(),
  }
  with open(out / GENERATION_CONFIG, "w", encoding="utf-8") as f:
    json.dump(generation_config, f, indent=2)
  if lm.tokenizer is not None:
    lm.tokenizer.save_pretrained(str(out))
  elif lm.source_dir:
    for name in ("tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "tokenizer.model"):
      if (pathlib.Path(lm.source_dir) / name).exists():
        shutil.copy(pathlib.Path(lm.source_dir) / name, out / name)
  logging.info("Exported %s to %s", lm.config.model_type, out)
