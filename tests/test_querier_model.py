"""The querier-aware responder: towers, gradients, mesh and training."""

import json
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_models
from xfusion_jax import llm
from xfusion_jax import sharding
from xfusion_jax.querier import model as querier_model
from xfusion_jax.querier import task as querier_task
from xfusion_jax.train import loop

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "configs"))
import querier_tiny  # pylint: disable=g-import-not-at-top,wrong-import-position

# Lines from Hamlet (public domain): the responder HAMLET replies to queriers
# who ask similar things in two query clusters.
DIALOGUES = [
    ("HORATIO", "My lord, I came to see your father's funeral.",
     "I pray thee, do not mock me, fellow-student; I think it was to see "
     "my mother's wedding.", 0),
    ("HORATIO", "Indeed, my lord, it followed hard upon.",
     "Thrift, thrift, Horatio! the funeral baked meats did coldly furnish "
     "forth the marriage tables.", 0),
    ("HORATIO", "Where, my lord?", "In my mind's eye, Horatio.", 0),
    ("HORATIO", "My lord, I think I saw him yesternight.",
     "Saw? who? For God's love, let me hear.", 0),
    ("OPHELIA", "Good my lord, how does your honour for this many a day?",
     "I humbly thank you; well, well, well.", 0),
    ("OPHELIA", "My lord, I have remembrances of yours.",
     "No, not I; I never gave you aught.", 0),
    ("OPHELIA", "What means your lordship?",
     "That if you be honest and fair, your honesty should admit no "
     "discourse to your beauty.", 0),
    ("OPHELIA", "I was the more deceived.",
     "Get thee to a nunnery: why wouldst thou be a breeder of sinners?", 0),
    ("POLONIUS", "What do you read, my lord?", "Words, words, words.", 1),
    ("POLONIUS", "What is the matter, my lord?", "Between who?", 1),
    ("POLONIUS", "Will you walk out of the air, my lord?",
     "Into my grave.", 1),
    ("POLONIUS", "My lord, I will take my leave of you.",
     "You cannot, sir, take from me any thing that I will more willingly "
     "part withal: except my life.", 1),
    ("GERTRUDE", "Hamlet, thou hast thy father much offended.",
     "Mother, you have my father much offended.", 1),
    ("GERTRUDE", "Come, come, you answer with an idle tongue.",
     "Go, go, you question with a wicked tongue.", 1),
    ("GERTRUDE", "Have you forgot me?",
     "No, by the rood, not so: you are the queen, your husband's brother's "
     "wife.", 1),
    ("GERTRUDE", "What shall I do?",
     "Not this, by no means, that I bid you do.", 1),
]
QUERIERS = sorted({d[0] for d in DIALOGUES})


def make_records():
  return [{
      "conversations": [{"from": querier, "value": query},
                        {"from": "HAMLET", "value": reply}],
      "target_role": "HAMLET",
      "input_role": querier,
      "role_pair_id": QUERIERS.index(querier),
      "cluster_id": cluster,
  } for querier, query, reply, cluster in DIALOGUES]


@pytest.fixture(name="model_dir", scope="module")
def fixture_model_dir(tmp_path_factory):
  # A vocabulary of 256 lets the task use UTF-8 bytes as tokens.
  config = hf_models.tiny_config("llama", vocab_size=256)
  return hf_models.save_model(hf_models.build_model(config),
                              tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(name="train_file", scope="module")
def fixture_train_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("data") / "dialogues.json"
  path.write_text(json.dumps(make_records()), encoding="utf-8")
  return path


def make_config(model_dir, train_file, **overrides):
  config = querier_tiny.get_config()
  config.model_dir = str(model_dir)
  config.train_file = str(train_file)
  config.update(overrides)
  return config


def test_general_tower_equals_base_llm(model_dir):
  lm = llm.from_pretrained(model_dir, dtype="float32", load_tokenizer=False)
  module = querier_model.QuerierLM(lm.config, specific_rank=8)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)))
  positions = jnp.broadcast_to(jnp.arange(16), ids.shape)
  valid = jnp.ones(ids.shape, bool)
  params = nn.meta.unbox(
      module.init(jax.random.key(0), ids, positions, valid)["params"])
  lora_b = [v for p, v in jax.tree_util.tree_leaves_with_path(params) if "lora_b" in jax.tree_util.keystr(p)]
  assert len(lora_b) == 7

  def general_logits(mod, *args):
    return mod.project_to_vocab(mod.towers(*args).general)

  got = module.apply({**lm.variables, "params": params}, ids, positions,
                     valid, method=general_logits)
  want, _ = lm.module.apply(lm.variables, ids, positions, valid)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6,
                             rtol=0)


@pytest.mark.parametrize("bias", [0.0, 3.0])
def test_gate_starts_at_its_bias(model_dir, bias):
  lm = llm.from_pretrained(model_dir, dtype="float32", load_tokenizer=False)
  module = querier_model.QuerierLM(lm.config, specific_rank=8,
                                   gated_merge=True, gate_init_bias=bias)
  ids = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 12)))
  positions = jnp.broadcast_to(jnp.arange(12), ids.shape)
  valid = jnp.ones(ids.shape, bool)
  params = module.init(jax.random.key(0), ids, positions, valid)["params"]
  outputs = module.apply({**lm.variables, "params": nn.meta.unbox(params)},
                         ids, positions, valid, method="towers")
  weight = 1 / (1 + np.exp(-bias))
  want = (weight * np.asarray(outputs.general) +
          (1 - weight) * np.asarray(outputs.specific))
  np.testing.assert_allclose(np.asarray(outputs.merged), want, atol=1e-6)
  np.testing.assert_allclose(np.asarray(outputs.general_weight),
                             np.full((2, 12, 1), weight), rtol=1e-6)
  assert not np.allclose(outputs.general, outputs.specific, atol=1e-3)


@pytest.mark.parametrize("overrides", [
    {},
    {"contrastive_mode": "instance", "second_view": "span_deletion"},
])
def test_every_trainable_leaf_gets_gradient(model_dir, train_file, overrides):
  # Without warm-up the first step already moves LoRA B.
  config = make_config(model_dir, train_file, warmup_steps=0, **overrides)
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  task = querier_task.make_task(config, mesh)
  program = loop.build_program(config, task, mesh)
  data = task.train_data(config.seed)
  state = program.init_state()
  batch = program.global_batch(next(data))
  grad_fn = jax.jit(program.loss_grads_and_aux)
  with program.context():
    (loss, task_metrics), grads, bank = grad_fn(
        state.params, task.frozen, batch, jax.random.key(0), state.aux)
  assert np.isfinite(float(loss))
  assert float(task_metrics["contrastive_loss"]) > 0
  assert int(bank.count.sum()) == config.batch_size
  names = [jax.tree_util.keystr(p)
           for p, _ in jax.tree_util.tree_leaves_with_path(grads)]
  assert any("head_1" in n for n in names)
  assert any("head_2" in n for n in names)
  assert any("gate" in n for n in names)
  # LoRA B starts at zero, so A gets its first gradient only after B has
  # moved; every other leaf must get one at once.
  for name, grad in zip(names, jax.tree.leaves(grads)):
    if "lora_a" not in name:
      assert float(jnp.abs(grad).max()) > 0, name

  state, _ = program.train_step(state, batch)
  with program.context():
    _, grads, _ = grad_fn(state.params, task.frozen,
                          program.global_batch(next(data)),
                          jax.random.key(1), state.aux)
  for name, grad in zip(names, jax.tree.leaves(grads)):
    assert float(jnp.abs(grad).max()) > 0, name


def test_mesh_matches_single_device(model_dir, train_file):
  config = make_config(model_dir, train_file)
  results = []
  for shape, devices in (({"data": 1}, jax.devices()[:1]),
                         ({"data": 4, "fsdp": 2}, jax.devices())):
    mesh = sharding.make_mesh(shape, devices)
    task = querier_task.make_task(config, mesh)
    program = loop.build_program(config, task, mesh)
    data = task.train_data(config.seed)
    state = program.init_state()
    for _ in range(2):
      state, step_metrics = program.train_step(
          state, program.global_batch(next(data)))
    results.append((jax.device_get(state.aux), jax.device_get(step_metrics)))
  (bank_one, metrics_one), (bank_mesh, metrics_mesh) = results
  np.testing.assert_array_equal(bank_mesh.count, bank_one.count)
  np.testing.assert_array_equal(bank_mesh.next_slot, bank_one.next_slot)
  np.testing.assert_allclose(bank_mesh.embeddings, bank_one.embeddings,
                             atol=1e-5)
  for name in ("loss", "lm_loss", "contrastive_loss"):
    np.testing.assert_allclose(metrics_mesh[name], metrics_one[name],
                               rtol=1e-5, err_msg=name)


def test_train_loss_decreases(model_dir, train_file, tmp_path):
  config = make_config(model_dir, train_file)
  result = loop.train(config, tmp_path)
  losses = [result.history[s]["train/loss"] for s in sorted(result.history)]
  assert len(losses) == config.total_steps
  assert all(np.isfinite(losses))
  assert np.mean(losses[-3:]) < np.mean(losses[:3])
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()
                if p.name.isdigit()) == ["12", "6"]


def _first_batches(task, config, process_index=0, process_count=1, count=4):
  data = iter(querier_task.make_dataset(task.examples, config, config.seed,
                                        process_index, process_count))
  return [next(data) for _ in range(count)]


def test_length_buckets_cut_only_padding(model_dir, train_file):
  # At 160 tokens (UTF-8 bytes) the Hamlet windows fill 50 to 170 of them,
  # so batches land in several of the buckets 40, 80, 120 and 160. Without
  # dropout the loss does not depend on the random key.
  config = make_config(model_dir, train_file, seq_len=160, lora_dropout=0.0)
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  task = querier_task.make_task(config, mesh)
  uncut = make_config(model_dir, train_file, seq_len=160, lora_dropout=0.0,
                      length_buckets=1)
  cut_batches = _first_batches(task, config)
  assert len({b["tokens"].shape[1] for b in cut_batches}) > 1
  loss_fn = jax.jit(task.loss_fn)
  bank = task.init_aux_state()
  params = task.init_trainable(jax.random.key(0))
  bank_cut = bank_full = bank
  for cut, full in zip(cut_batches, _first_batches(task, uncut)):
    width = cut["tokens"].shape[1]
    assert full["tokens"].shape[1] == 161
    for name, value in cut.items():
      np.testing.assert_array_equal(value, full[name][:, :width]
                                    if value.ndim == 2 else full[name])
    assert not full["valid"][:, width:].any()
    (loss_cut, (metrics_cut, bank_cut)) = loss_fn(
        params, task.frozen, cut, jax.random.key(1), bank_cut)
    (loss_full, (metrics_full, bank_full)) = loss_fn(
        params, task.frozen, full, jax.random.key(1), bank_full)
    np.testing.assert_allclose(loss_cut, loss_full, rtol=1e-5)
    np.testing.assert_allclose(metrics_cut["contrastive_loss"],
                               metrics_full["contrastive_loss"], rtol=1e-5)
    np.testing.assert_allclose(bank_cut.embeddings, bank_full.embeddings,
                               atol=1e-5)


def test_batches_do_not_depend_on_process_count(model_dir, train_file):
  config = make_config(model_dir, train_file, seq_len=160,
                       second_view="token_dropout")
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  task = querier_task.make_task(config, mesh)
  assert task.process_count_invariant_data
  whole = _first_batches(task, config)
  halves = [_first_batches(task, config, p, 2) for p in range(2)]
  for index, batch in enumerate(whole):
    assert set(batch) >= {"tokens_2", "valid_2", "response_2"}
    for name, value in batch.items():
      np.testing.assert_array_equal(
          value, np.concatenate([h[index][name] for h in halves]))
