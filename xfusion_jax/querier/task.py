"""Task "querier": the querier-aware responder beside a frozen LLM.

Trains `QuerierLM` (LoRA general tower plus querier-specific tower) with
next-token cross-entropy on the responder's reply plus
`contrastive_weight * min(contrastive loss, contrastive_clip)`. The memory
bank of the prototype loss is the task's auxiliary train state.

Each MQDialog record becomes one window: the turns as "NAME: TEXT" lines,
then "RESPONDER: " and the reply. The prompt is cut from the left to fit
`seq_len + 1` tokens; only reply tokens are predicted and pooled.

Config fields (besides the loop's): `model_dir`, `train_file` (MQDialog JSON
list or JSON Lines), `seq_len`, `lora_rank`, `lora_alpha`, `lora_dropout`,
`specific_rank`, `gated_merge`, `gate_init_bias`, `remat_policy`,
`contrastive_mode` ("prototype" or "instance"), `second_view` ("heads",
"token_dropout" or "span_deletion"), `token_dropout_rate`,
`span_deletion_fraction`, `contrastive_weight`, `contrastive_temperature`,
`contrastive_clip`, `bank_length`, `projection_dim`, `projection_hidden_dim`,
`sample_tokens`, `specific_tower`, `length_buckets`,
`length_group_batches`.

`specific_tower = False` trains the plain LoRA fine-tune (FT) that the
evaluation compares against: the general tower alone, on the same data,
with the LM loss only (no specific tower, no heads, no memory bank).
"""

from __future__ import annotations

import math
import pathlib
from typing import Any

from absl import logging
import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import numpy as np
import optax

from xfusion_jax import llm
from xfusion_jax.data import length_groups
from xfusion_jax.querier import contrastive
from xfusion_jax.querier import data as querier_data
from xfusion_jax.querier import model as querier_model
from xfusion_jax.train import checkpointing
from xfusion_jax.train import lm_adapter
from xfusion_jax.train.task import Batch, FlopCount, Metrics, PyTree

BATCH_AXES = ("data", "fsdp")
CONTRASTIVE_MODES = ("prototype", "instance")
SECOND_VIEWS = ("heads", "token_dropout", "span_deletion")


def read_mqdialog_records(path: str | pathlib.Path) -> list[dict[str, Any]]:
  """Read and validate MQDialog records as JSON dictionaries."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ValueError(f"config.train_file={str(path)!r} is not a file; set it "
                     "to an MQDialog JSON or JSON Lines file.")
  return [record.to_json() for record in querier_data.read_mqdialog(path)]


def prompt_text(record: dict[str, Any]) -> str:
  """Return the context turns as "NAME: TEXT" lines, then "RESPONDER: "."""
  turns = record["conversations"]
  prompt = "".join(f"{t['from']}: {t['value']}\n" for t in turns[:-1])
  return prompt + f"{record['target_role']}: "


def encode_record(record: dict[str, Any], tokenizer: lm_adapter.TextTokenizer,
                  seq_len: int) -> dict[str, np.ndarray]:
  """Encode one record as a right-padded window of `seq_len + 1` tokens.

  Returns `tokens` and `valid` (`[seq_len + 1]`) and `response` (`[seq_len
  + 1]`, True at the reply's tokens). The reply ends with a newline, so a
  trained model ends its replies with one.
  """
  reply = tokenizer.encode(record["conversations"][-1]["value"] +
                           "\n")[:seq_len]
  prompt_ids = tokenizer.encode(prompt_text(record))
  prompt_ids = prompt_ids[max(0, len(prompt_ids) - (seq_len + 1 - len(reply))):]
  ids = np.concatenate([prompt_ids, reply]).astype(np.int32)
  window = np.zeros(seq_len + 1, np.int32)
  window[:len(ids)] = ids
  valid = np.arange(seq_len + 1) < len(ids)
  response = valid & (np.arange(seq_len + 1) >= len(prompt_ids))
  return {"tokens": window, "valid": valid, "response": response}


def augment_window(example: dict[str, np.ndarray], mode: str, rate: float,
                   rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Return the text-level second view of an encoded window.

  "token_dropout" removes each token with probability `rate`;
  "span_deletion" removes one random span of `rate` of the tokens. At
  least one reply token is always kept, so the view has something to pool.
  """
  length = int(example["valid"].sum())
  keep = np.ones(length, bool)
  if mode == "token_dropout":
    keep = rng.random(length) >= rate
  elif mode == "span_deletion":
    span = int(round(rate * length))
    start = int(rng.integers(0, length - span + 1))
    keep[start:start + span] = False
  response = example["response"][:length]
  if not (keep & response).any():
    keep[np.flatnonzero(response)[-1]] = True
  size = example["tokens"].shape[0]
  kept = np.flatnonzero(keep)
  tokens = np.zeros(size, np.int32)
  tokens[:len(kept)] = example["tokens"][kept]
  mask = np.zeros(size, bool)
  mask[:len(kept)] = response[kept]
  return {"tokens_2": tokens, "valid_2": np.arange(size) < len(kept),
          "response_2": mask}


def make_dataset(examples: list[dict[str, np.ndarray]],
                 config: ml_collections.ConfigDict, seed: int,
                 process_index: int, process_count: int) -> grain.IterDataset:
  """Endless batches of encoded windows for one process.

  Windows are grouped by length over pools of `config.length_group_batches`
  global batches, and each batch is cut to the smallest of
  `config.length_buckets` lengths up to `seq_len` that fits its longest
  window (see `xfusion_jax.data.length_groups`). Cutting drops only right
  padding, which a causal model and the masked losses ignore.

  Global batch `i` and its text-level second views depend on `seed` and
  `i` only; process `p` reads rows `[p * B, (p + 1) * B)` of it (B = the
  per-process batch), so a run can resume with another process count.
  """
  per_process = config.batch_size // process_count
  lengths = [int(example["valid"].sum()) for example in examples]
  plan = length_groups.grouped_batches(lengths, config.batch_size, seed,
                                       config.length_group_batches)
  mode = config.second_view
  augment = bool(config.specific_tower) and mode != "heads"
  rate = (config.token_dropout_rate if mode == "token_dropout" else
          config.span_deletion_fraction)
  first_row = process_index * per_process

  def load(item: tuple[int, np.ndarray]) -> dict[str, np.ndarray]:
    index, rows = item
    # A window of n tokens feeds n - 1 of them to the model.
    length = length_groups.bucket_length(
        max(lengths[r] for r in rows) - 1, config.seq_len,
        config.length_buckets)
    batch = []
    for row in range(first_row, first_row + per_process):
      example = examples[rows[row]]
      if augment:
        rng = np.random.default_rng([seed, index, row])
        example = {**example, **augment_window(example, mode, rate, rng)}
      batch.append(example)
    stacked = {name: np.stack([e[name] for e in batch]) for name in batch[0]}
    # Only the [batch, seq_len + 1] arrays are cut; cluster and querier ids
    # are one value per window.
    return {name: value[:, :length + 1] if value.ndim == 2 else value
            for name, value in stacked.items()}

  return plan.map(load).to_iter_dataset(
      grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))


def masked_cross_entropy(logits: jax.Array, targets: jax.Array,
                         mask: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy over positions where `mask` is set."""
  losses = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), targets)
  mask = mask.astype(jnp.float32)
  return (losses * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def _check_choice(config: ml_collections.ConfigDict, name: str,
                  choices: tuple[str, ...]) -> None:
  if config[name] not in choices:
    raise ValueError(f"config.{name}={config[name]!r} is invalid; choose one "
                     f"of {', '.join(choices)}.")


class QuerierTask:
  """Trains `QuerierLM` and its contrastive heads on MQDialog records."""

  # See `make_dataset`: global batches and iterator states do not depend on
  # the process count.
  process_count_invariant_data = True

  def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh):
    if not config.model_dir:
      raise ValueError("config.model_dir is empty; set it to a Hugging Face "
                       "model folder, e.g. --config.model_dir=PATH.")
    _check_choice(config, "contrastive_mode", CONTRASTIVE_MODES)
    _check_choice(config, "second_view", SECOND_VIEWS)
    if not 1 <= config.length_buckets <= config.seq_len:
      raise ValueError(f"config.length_buckets={config.length_buckets} must "
                       f"be between 1 and config.seq_len={config.seq_len}; "
                       "1 keeps every batch at seq_len.")
    if config.length_group_batches < 1:
      raise ValueError(
          f"config.length_group_batches={config.length_group_batches} must "
          "be at least 1; 1 keeps the batches in shuffled order.")
    self._config = config
    self.mesh = mesh
    self.lm = llm.from_pretrained(config.model_dir, dtype=config.dtype,
                                  mesh=mesh)
    self.frozen = self.lm.variables
    self.frozen_source = {
        "path": str(pathlib.Path(config.model_dir).resolve()),
        "weights_sha256": checkpointing.hash_weight_files(config.model_dir),
    }
    self.tokenizer = lm_adapter.TextTokenizer(self.lm)
    self.records = read_mqdialog_records(config.train_file)
    self.queriers = sorted({r["input_role"] for r in self.records})
    self.num_clusters = 1 + max(int(r.get("cluster_id", 0))
                                for r in self.records)
    self.examples = [self._encode(r) for r in self.records]
    self.specific_tower = bool(config.specific_tower)
    self.model = build_model(self.lm.config, config)
    self.train_model = self.model.clone(deterministic=False)
    self.heads = contrastive.ContrastiveHeads(
        self.num_clusters, config.projection_hidden_dim,
        config.projection_dim, eps=self.lm.config.rms_norm_eps)
    self._sample_fn = None
    logging.info("Querier data %s: %d windows, %d queriers, %d clusters.",
                 config.train_file, len(self.records), len(self.queriers),
                 self.num_clusters)

  def _encode(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
    example = encode_record(record, self.tokenizer, self._config.seq_len)
    example["cluster"] = np.int32(record.get("cluster_id", 0))
    example["querier"] = np.int32(self.queriers.index(record["input_role"]))
    return example

  def init_trainable(self, rng: jax.Array) -> PyTree:
    model_rng, heads_rng = jax.random.split(rng)
    ids = jnp.zeros((1, 2), jnp.int32)
    valid = jnp.ones((1, 2), bool)
    # init also creates zero "frozen" weights; only "params" is returned, so
    # XLA drops them.
    model_params = self.model.init(model_rng, ids, ids, valid)["params"]
    if not self.specific_tower:
      return {"model": model_params}
    # The specific tower's final norm starts as a copy of the frozen one.
    frozen_scale = self.frozen["frozen"]["model"]["norm"]["scale"]
    box = model_params["model"]["specific_norm"]["scale"]
    model_params["model"]["specific_norm"]["scale"] = box.replace_boxed(
        frozen_scale.astype(jnp.float32))
    states = jnp.zeros((1, 1, self.lm.config.hidden_size), jnp.float32)
    heads_params = self.heads.init(heads_rng, states, valid[:, :1],
                                   jnp.zeros((1,), jnp.int32))["params"]
    return {"model": model_params, "heads": heads_params}

  def init_aux_state(self) -> contrastive.MemoryBank | dict[str, Any]:
    if not self.specific_tower:
      return {}
    return contrastive.init_bank(self.num_clusters, len(self.queriers),
                                 self._config.bank_length,
                                 self._config.projection_dim)

  def forward(self, trainable: PyTree, frozen: PyTree, tokens: jax.Array,
              valid: jax.Array, rng: jax.Array | None = None):
    """Return `(logits, TowerOutputs)` of right-padded `[batch, seq]` tokens.

    With `rng`, LoRA dropout is on.
    """
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    variables = {**frozen, "params": trainable["model"]}
    if rng is None:
      return self.model.apply(variables, tokens, positions, valid)
    return self.train_model.apply(variables, tokens, positions, valid,
                                  rngs={"dropout": rng})

  def loss_fn(self, trainable: PyTree, frozen: PyTree, batch: Batch,
              rng: jax.Array, bank: contrastive.MemoryBank
              ) -> tuple[jax.Array, tuple[Metrics, contrastive.MemoryBank]]:
    first_rng, second_rng = jax.random.split(rng)
    tokens, valid = batch["tokens"], batch["valid"]
    logits, outputs = self.forward(trainable, frozen, tokens[:, :-1],
                                   valid[:, :-1], first_rng)
    lm_loss = masked_cross_entropy(logits, tokens[:, 1:],
                                   batch["response"][:, 1:])
    if not self.specific_tower:
      return lm_loss, ({"lm_loss": lm_loss}, bank)
    views = self._views(trainable, frozen, batch, outputs, second_rng)
    contrastive_loss, bank = self._contrastive(views, batch, bank)
    clipped = jnp.minimum(contrastive_loss, self._config.contrastive_clip)
    loss = lm_loss + self._config.contrastive_weight * clipped
    metrics = {"lm_loss": lm_loss, "contrastive_loss": contrastive_loss}
    return loss, (metrics, bank)

  def _views(self, trainable: PyTree, frozen: PyTree, batch: Batch,
             outputs: querier_model.TowerOutputs,
             rng: jax.Array) -> jax.Array:
    """Return both normalized views `[2, batch, projection_dim]`."""
    second_states = second_mask = None
    if self._config.second_view != "heads":
      _, second = self.forward(trainable, frozen, batch["tokens_2"][:, :-1],
                               batch["valid_2"][:, :-1], rng)
      second_states = second.specific_last_layer
      second_mask = batch["response_2"][:, :-1]
    return self.heads.apply(
        {"params": trainable["heads"]}, outputs.specific_last_layer,
        batch["response"][:, :-1], batch["cluster"], second_states,
        second_mask)

  def _contrastive(self, views: jax.Array, batch: Batch,
                   bank: contrastive.MemoryBank):
    """Return `(contrastive loss, updated bank)`."""
    cluster, querier = batch["cluster"], batch["querier"]
    temperature = self._config.contrastive_temperature
    gathered_views, gathered_cluster, gathered_querier = (
        contrastive.all_gather_batch(
            (jnp.swapaxes(jax.lax.stop_gradient(views), 0, 1), cluster,
             querier), self.mesh, BATCH_AXES))
    bank = contrastive.enqueue(bank, jnp.swapaxes(gathered_views, 0, 1),
                               gathered_cluster, gathered_querier)
    if self._config.contrastive_mode == "instance":
      return contrastive.instance_loss(views, cluster, temperature), bank
    return contrastive.cross_view_prototype_loss(
        views, bank, cluster, querier, temperature), bank

  def train_data(self, seed: int) -> grain.DatasetIterator:
    return iter(make_dataset(self.examples, self._config, seed,
                             jax.process_index(), jax.process_count()))

  def tokens_per_batch(self, batch: Batch) -> int:
    return int(np.asarray(batch["valid"])[:, :-1].sum())

  def flop_count(self) -> FlopCount:
    """Trainable 6N, frozen layers 4N (gradients pass through), head 4N.

    NOTE: an estimate. Attention weights run on both towers' rows and the
    frozen MLP on the general rows only; both are counted once per token.
    """
    cfg = self.lm.config
    trainable = jax.eval_shape(self.init_trainable, jax.random.key(0))
    layers = _count(self.lm.weights["model"]["layers"])
    width = cfg.num_attention_heads * cfg.head_dim
    attention = 2 * 4 * cfg.num_hidden_layers * self._config.seq_len * width
    return FlopCount(
        trainable_params=_count(nn.meta.unbox(trainable)),
        frozen_backprop_params=layers + cfg.vocab_size * cfg.hidden_size,
        frozen_forward_params=0,
        attention_flops_per_token=attention)

  def samples(self, trainable: PyTree, step: int,
              workdir: str) -> dict[str, Any]:
    """Greedy reply of the merged model to the first record's prompt."""
    del step, workdir
    count = self._config.sample_tokens
    if count < 1:
      return {}
    example = self.examples[0]
    prompt_length = int(np.argmax(example["response"]))
    prompt = example["tokens"][:prompt_length]
    if self._sample_fn is None:
      self._sample_fn = jax.jit(self._greedy_tokens, static_argnums=2)
    new_tokens = self._sample_fn(trainable, jnp.asarray(prompt), count)
    record = self.records[0]
    return {"reply": f"[{record['input_role']} → {record['target_role']}] "
                     f"{self.tokenizer.decode(prompt)}[→]"
                     f"{self.tokenizer.decode(np.asarray(new_tokens))}"}

  def _greedy_tokens(self, trainable: PyTree, prompt: jax.Array,
                     count: int) -> jax.Array:
    # The model is causal, so the zeros after the written tokens do not
    # change the logits of the positions before them.
    length = prompt.shape[0] + count
    buffer = jnp.zeros((1, length), jnp.int32).at[0, :prompt.shape[0]].set(
        prompt)
    valid = jnp.ones((1, length), bool)

    def write_next(index, tokens):
      logits, _ = self.forward(trainable, self.frozen, tokens, valid)
      return tokens.at[0, index].set(jnp.argmax(logits[0, index - 1]))

    buffer = jax.lax.fori_loop(prompt.shape[0], length, write_next, buffer)
    return buffer[0, prompt.shape[0]:]


def _count(tree: PyTree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def build_model(lm_config: Any, config: ml_collections.ConfigDict | dict[str, Any]
                ) -> querier_model.QuerierLM:
  """Build the deterministic `QuerierLM` that a querier config describes.

  `config` is the run's config, or its JSON form from a checkpoint or an
  export; the key `specific_tower` may be missing (runs without it had the
  specific tower).
  """
  lora = querier_model.LoraConfig(config["lora_rank"], config["lora_alpha"],
                                  config["lora_dropout"])
  dtype = jnp.dtype(config["dtype"])
  specific_tower = bool(config.get("specific_tower", True))
  return querier_model.QuerierLM(
      lm_config, lora=lora, specific_rank=config["specific_rank"],
      gated_merge=config["gated_merge"] and specific_tower,
      gate_init_bias=float(config.get("gate_init_bias", 0.0)), dtype=dtype,
      param_dtype=dtype, remat_policy=config["remat_policy"],
      deterministic=True, specific_tower=specific_tower)


def make_task(config: ml_collections.ConfigDict, mesh: Mesh) -> QuerierTask:
  return QuerierTask(config, mesh)


def add_fields(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Add the querier fields, at the published defaults, to a loop config."""
  config.task = "querier"
  config.model_dir = ""
  config.train_file = ""
  config.seq_len = 256
  config.lora_rank = 16
  config.lora_alpha = 8.0
  config.lora_dropout = 0.05
  config.specific_rank = 64
  config.gated_merge = False
  config.gate_init_bias = 0.0
  config.remat_policy = "none"
  config.contrastive_mode = "prototype"
  config.second_view = "heads"
  config.token_dropout_rate = 0.1
  config.span_deletion_fraction = 0.15
  config.contrastive_weight = 0.5
  config.contrastive_temperature = 0.1
  config.contrastive_clip = 10.0
  config.bank_length = 512
  config.projection_dim = 128
  config.projection_hidden_dim = 512
  config.sample_tokens = 32
  config.specific_tower = True
  config.length_buckets = 4
  config.length_group_batches = 8
  return config
