"""Querier export (PEFT LoRA), KV-cache replies and the evaluation CLI."""

import json
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

import hf_models
from xfusion_jax import llm
from xfusion_jax.querier import artifacts
from xfusion_jax.querier import contrastive
from xfusion_jax.querier import evaluate
from xfusion_jax.querier import inference
from xfusion_jax.querier import model as querier_model
from xfusion_jax.querier import task as querier_task
from xfusion_jax.train import lm_adapter
from xfusion_jax.train import loop

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "configs"))
sys.path.insert(0, str(REPO / "tests"))
import querier_tiny  # pylint: disable=g-import-not-at-top,wrong-import-position
import test_querier_model  # pylint: disable=g-import-not-at-top,wrong-import-position

SETTINGS = {"lora_rank": 4, "lora_alpha": 8.0, "lora_dropout": 0.05,
            "specific_rank": 8, "gated_merge": True, "specific_tower": True,
            "dtype": "float32", "remat_policy": "none", "seq_len": 48}
SEQ = 24


@pytest.fixture(name="model_dirs", scope="module")
def fixture_model_dirs(tmp_path_factory):
  # A vocabulary of 256 lets the task use UTF-8 bytes as tokens.
  root = tmp_path_factory.mktemp("models")
  return {
      "llama": hf_models.save_model(
          hf_models.build_model(hf_models.tiny_config("llama",
                                                      vocab_size=256)),
          root / "llama"),
      "gemma3": hf_models.save_model(
          hf_models.build_model(hf_models.tiny_gemma3_config(vocab_size=256)),
          root / "gemma3"),
  }


def random_trained(model_dir, specific_tower=True, seed=0):
  """A querier model whose every trainable leaf is random, LoRA B included."""
  lm = llm.from_pretrained(model_dir, dtype="float32")
  settings = dict(SETTINGS, specific_tower=specific_tower)
  module = querier_task.build_model(lm.config, settings)
  ids = jnp.zeros((1, 2), jnp.int32)
  params = nn.meta.unbox(module.init(jax.random.key(seed), ids, ids,
                                     jnp.ones((1, 2), bool))["params"])
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  params = jax.tree.unflatten(tree, [
      leaf + 0.1 * jax.random.normal(k, leaf.shape)
      for leaf, k in zip(leaves, keys)])
  heads = None
  if specific_tower:
    module_heads = contrastive.ContrastiveHeads(2, 16, 8)
    heads = nn.meta.unbox(module_heads.init(
        jax.random.key(seed + 2), jnp.zeros((1, 1, lm.config.hidden_size)),
        jnp.ones((1, 1), bool), jnp.zeros((1,), jnp.int32))["params"])
  return artifacts.TrainedQuerier(lm, module, params, heads, settings)


def token_ids(seed=0):
  return np.random.default_rng(seed).integers(3, 256, (2, SEQ))


def apply(trained, method=None, seed=0):
  ids = jnp.asarray(token_ids(seed))
  positions = jnp.broadcast_to(jnp.arange(SEQ), ids.shape)
  valid = jnp.ones(ids.shape, bool)
  if method is None:
    return np.asarray(trained.module.apply(trained.variables, ids, positions,
                                           valid)[0])
  return np.asarray(trained.module.apply(trained.variables, ids, positions,
                                         valid, method=method))


def general_logits(module, *args):
  return module.project_to_vocab(module.towers(*args).general)


@pytest.mark.parametrize("model_type", ["llama", "gemma3"])
def test_peft_logits_equal_general_tower(model_dirs, model_type, tmp_path):
  trained = random_trained(model_dirs[model_type])
  artifacts.export(trained, tmp_path)
  assert (tmp_path / "adapter_config.json").is_file()
  assert (tmp_path / "adapter_model.safetensors").is_file()

  base = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / "llm", dtype=torch.float32, attn_implementation="eager")
  model = peft.PeftModel.from_pretrained(base, tmp_path).eval()
  assert isinstance(model.peft_config["default"], peft.LoraConfig)
  with torch.no_grad():
    got = model(torch.as_tensor(token_ids())).logits.numpy()
    with model.disable_adapter():
      without_lora = model(torch.as_tensor(token_ids())).logits.numpy()
  want = apply(trained, general_logits)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
  # The adapters change the output, so the equality above tests them.
  assert np.abs(without_lora - want).max() > 1e-2


def test_plain_lora_equals_general_tower(model_dirs):
  trained = random_trained(model_dirs["llama"])
  plain = random_trained(model_dirs["llama"], specific_tower=False)
  shared = {k: v for k, v in trained.params["model"]["layers"].items()
            if k != "specific_mlp"}
  assert (jax.tree.structure(plain.params) ==
          jax.tree.structure({"model": {"layers": shared}}))
  plain.params = {"model": {"layers": shared}}
  np.testing.assert_allclose(apply(plain), apply(trained, general_logits),
                             atol=1e-6, rtol=0)


@pytest.mark.parametrize("specific_tower", [True, False])
def test_export_round_trip_identical(model_dirs, specific_tower, tmp_path):
  trained = random_trained(model_dirs["gemma3"], specific_tower)
  artifacts.export(trained, tmp_path)
  loaded = artifacts.load_export(tmp_path)
  assert loaded.settings == trained.settings
  assert (jax.tree.structure(loaded.params) ==
          jax.tree.structure(trained.params))
  for got, want in zip(jax.tree.leaves(loaded.params),
                       jax.tree.leaves(trained.params)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  if specific_tower:
    for got, want in zip(jax.tree.leaves(loaded.heads),
                         jax.tree.leaves(trained.heads)):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  else:
    assert not (tmp_path / artifacts.SPECIFIC_FILE).exists()
  np.testing.assert_array_equal(apply(loaded), apply(trained))


def greedy_without_cache(forward, prompt, count, stop_ids):
  """Append argmax tokens by re-running the whole sequence each step."""
  tokens = list(prompt)
  new = []
  for _ in range(count):
    ids = jnp.asarray([tokens])
    logits = forward(ids, jnp.arange(len(tokens))[None],
                     jnp.ones(ids.shape, bool))
    token = int(jnp.argmax(logits[0, -1]))
    new.append(token)
    tokens.append(token)
    if token in stop_ids:
      break
  return new


@pytest.mark.parametrize("system,model_type", [
    ("frozen", "gemma3"), ("plain", "llama"), ("querier", "llama"),
    ("querier", "gemma3")])
def test_cached_replies_match_full_forward(model_dirs, system, model_type):
  trained = random_trained(model_dirs[model_type],
                           specific_tower=system == "querier")
  records = test_querier_model.make_records()[:3]
  if system == "frozen":
    generator = inference.ReplyGenerator(trained.lm, prompt_tokens=40,
                                         max_new_tokens=6, batch_size=2)

    def forward(*args):
      return trained.lm.module.apply(trained.lm.variables, *args)[0]
  else:
    generator = inference.ReplyGenerator(
        trained.lm, trained.module, trained.params, prompt_tokens=40,
        max_new_tokens=6, batch_size=2)

    def forward(*args):
      return trained.module.apply(trained.variables, *args)[0]
  # Prompts of different lengths share a batch, so left padding is tested.
  assert len({len(generator.prompt_ids(r)) for r in records}) > 1
  for record, tokens in zip(records, generator.tokens(records)):
    want = greedy_without_cache(forward, generator.prompt_ids(record), 6,
                                generator.stop_ids)
    assert tokens[:len(want)].tolist() == want


def train_run(model_dir, train_file, workdir, specific_tower):
  config = querier_tiny.get_config()
  config.update(model_dir=str(model_dir), train_file=str(train_file),
                specific_tower=specific_tower, total_steps=2,
                checkpoint_every=2, sample_every=0)
  loop.train(config, workdir)


def test_querier_swaps():
  records = [
      {"conversations": [{"from": "A", "value": "hi"},
                         {"from": "R", "value": "yes"},
                         {"from": "A", "value": "why?"},
                         {"from": "R", "value": "because"}],
       "target_role": "R", "input_role": "A"},
      {"conversations": [{"from": "C", "value": "who?"},
                         {"from": "R", "value": "me"}],
       "target_role": "R", "input_role": "C"},
      {"conversations": [{"from": "D", "value": "and?"},
                         {"from": "S", "value": "so"}],
       "target_role": "S", "input_role": "D"},
      {"conversations": [{"from": "E", "value": "now?"},
                         {"from": "A", "value": "wait"},
                         {"from": "R", "value": "soon"}],
       "target_role": "R", "input_role": "E"},
  ]
  swaps = evaluate.querier_swaps(records, 5)
  # S replies to one querier only, so its window is skipped.
  assert [i for i, _ in swaps] == [0, 1, 3]
  first = swaps[0][1]
  assert first["input_role"] == "C"
  assert [t["from"] for t in first["conversations"]] == ["C", "R", "C", "R"]
  assert [t["value"] for t in first["conversations"]] == [
      t["value"] for t in records[0]["conversations"]]
  assert swaps[1][1]["input_role"] == "E"
  assert records[0]["input_role"] == "A"
  # A, next after E, already speaks in window 3, so C takes E's turns.
  assert [t["from"] for t in swaps[2][1]["conversations"]] == ["C", "A", "R"]
  assert evaluate.querier_swaps(records, 1)[0][0] == 0
  assert not evaluate.querier_swaps(records, 0)
  with pytest.raises(ValueError, match="--swap_windows=-1"):
    evaluate.evaluate_workdir("/nonexistent",
                              evaluate.EvalConfig(swap_windows=-1))


def _rouge_table(values: dict[str, list[float]]) -> dict:
  """A `score_table`-shaped table with only ROUGE-L, one value per querier."""
  table = {}
  for system, column in values.items():
    rows = {f"q{i}": {"rouge_l": v} for i, v in enumerate(column)}
    rows[evaluate.MEAN_OVER_QUERIERS] = {"rouge_l": float(np.mean(column))}
    rows[evaluate.ALL_WINDOWS] = {"rouge_l": -1.0}
    table[system] = rows
  return table


def test_paired_rouge_l_matches_direct_bootstrap():
  rng = np.random.default_rng(3)
  base = rng.uniform(0, 30, 40)
  diffs = rng.normal(0.5, 2.0, 40)
  diffs[:5] = 0.0
  table = _rouge_table({"A": list(base + diffs), "B": list(base)})
  got = evaluate.paired_rouge_l(table, "A", "B", resamples=20000)
  assert got["mean"] == pytest.approx(
      table["A"][evaluate.MEAN_OVER_QUERIERS]["rouge_l"] -
      table["B"][evaluate.MEAN_OVER_QUERIERS]["rouge_l"])
  assert (got["queriers"], got["equal"]) == (40, 5)
  assert got["higher"] == int(((base + diffs) > base).sum())
  assert got["higher"] + got["lower"] == 35
  # A direct percentile bootstrap: means of queriers drawn with replacement.
  actual = (base + diffs) - base
  means = actual[rng.integers(0, 40, (20000, 40))].mean(axis=1)
  low, high = np.percentile(means, [2.5, 97.5])
  assert got["low"] == pytest.approx(low, abs=0.03)
  assert got["high"] == pytest.approx(high, abs=0.03)
  assert got["low"] < got["mean"] < got["high"]

  shifted = evaluate.paired_rouge_l(
      _rouge_table({"A": list(base + 2.0), "B": list(base)}), "A", "B", 1000)
  assert shifted["low"] == shifted["high"] == pytest.approx(2.0)
  skipped = evaluate.paired_rouge_l(table, "A", "B", resamples=0)
  assert skipped["low"] is skipped["high"] is None
  assert "bootstrap" not in evaluate.paired_line(skipped)
  assert (f"{got['low']:+.2f} to {got['high']:+.2f}" in
          evaluate.paired_line(got))
  assert "Of the 40 queriers, A is higher for" in evaluate.paired_line(got)


def test_paired_rouge_l_small_cases():
  # The same replies scored in another order differ in the last bits.
  tied = evaluate.paired_rouge_l(
      _rouge_table({"A": [0.1 + 0.2, 5.0, 7.0, 1.0, 2.0],
                    "B": [0.3, 4.0, 7.0, 1.0, 2.0]}), "A", "B", 1000)
  assert (tied["higher"], tied["lower"], tied["equal"]) == (1, 0, 4)
  assert "-0.00" not in evaluate.paired_line(tied)
  assert "0.00 to +0.60" in evaluate.paired_line(tied)
  single = evaluate.paired_rouge_l(_rouge_table({"A": [3.0], "B": [1.0]}),
                                   "A", "B", 1000)
  assert single["low"] is single["high"] is None
  line = evaluate.paired_line(single)
  assert "no interval: it needs at least 5 queriers" in line
  assert "Of the 1 querier, A is higher for 1" in line
  for resamples in (-1, 1, 999):
    with pytest.raises(ValueError, match=f"--bootstrap_resamples={resamples}"):
      evaluate.evaluate_workdir(
          "/nonexistent", evaluate.EvalConfig(bootstrap_resamples=resamples))
  with pytest.raises(ValueError, match="--max_windows=0"):
    evaluate.evaluate_workdir("/nonexistent",
                              evaluate.EvalConfig(max_windows=0))
  with pytest.raises(ValueError, match="--batch_size=0"):
    evaluate.evaluate_workdir("/nonexistent",
                              evaluate.EvalConfig(batch_size=0))


def test_gate_weights_average_in_float32(model_dirs):
  # Summed in bfloat16, hundreds of weights near 0.95 average far below.
  lm = llm.from_pretrained(model_dirs["llama"], dtype="bfloat16",
                           load_tokenizer=False)
  module = querier_model.QuerierLM(lm.config, specific_rank=8,
                                   gated_merge=True, gate_init_bias=3.0,
                                   dtype=jnp.bfloat16)
  ids = jnp.zeros((1, 4), jnp.int32)
  params = nn.meta.unbox(module.init(
      jax.random.key(0), ids, ids, jnp.ones((1, 4), bool))["params"])
  records = [{"conversations": [{"from": "A", "value": "why so?"},
                                {"from": "R", "value": "because " * 5}],
              "target_role": "R", "input_role": "A"}] * 24
  weights = inference.reply_general_weights(lm, module, params, records, 48)
  assert weights.size > 600
  assert weights.mean() == pytest.approx(1 / (1 + np.exp(-3.0)), abs=5e-3)


def test_evaluate_and_export_cli(model_dirs, tmp_path):
  data = tmp_path / "data"
  data.mkdir()
  records = test_querier_model.make_records()
  (data / "train.json").write_text(json.dumps(records), encoding="utf-8")
  (data / "test.json").write_text(json.dumps(records[::3]), encoding="utf-8")
  train_run(model_dirs["llama"], data / "train.json", tmp_path / "querier",
            True)
  train_run(model_dirs["llama"], data / "train.json", tmp_path / "ft", False)

  results = evaluate.evaluate_workdir(
      tmp_path / "querier", evaluate.EvalConfig(max_new_tokens=8),
      ft_workdir=tmp_path / "ft")
  scores = results["scores"]
  assert list(scores) == ["zero-shot", "FT", "querier-aware"]
  queriers = sorted({r["input_role"] for r in records[::3]})
  for rows in scores.values():
    assert list(rows) == queriers + [evaluate.MEAN_OVER_QUERIERS,
                                     evaluate.ALL_WINDOWS]
    for row in rows.values():
      assert all(0 <= row[m] <= 100 for m in evaluate.METRIC_NAMES)
  table = (tmp_path / "querier" / "eval" / evaluate.TABLE_FILE).read_text(
      encoding="utf-8")
  assert "querier-aware R-L" in table
  assert "FT B-4" in table
  replies = (tmp_path / "querier" / "eval" / evaluate.REPLIES_FILE
             ).read_text(encoding="utf-8").splitlines()
  assert len(replies) == len(records[::3])
  swaps = [json.loads(line) for line in (
      tmp_path / "querier" / "eval" / evaluate.SWAP_FILE).read_text(
          encoding="utf-8").splitlines()]
  assert results["querier_swap"]["windows"] == len(swaps) == len(records[::3])
  for system in ("FT", "querier-aware"):
    assert results["querier_swap"]["changed"][system] == sum(
        s[system]["reply"] != s[system]["other_querier_reply"] for s in swaps)
  assert all(s["other_querier"] != s["input_role"] for s in swaps)
  assert "changed the reply in" in table
  paired = results["paired_rouge_l"]
  assert paired["mean"] == pytest.approx(
      scores["querier-aware"][evaluate.MEAN_OVER_QUERIERS]["rouge_l"] -
      scores["FT"][evaluate.MEAN_OVER_QUERIERS]["rouge_l"])
  assert paired["queriers"] == len(queriers)
  assert evaluate.paired_line(paired) in table
  # The gate's weight recovered from the merge itself, at reply tokens.
  trained = artifacts.load_workdir(tmp_path / "querier")
  tokenizer = lm_adapter.TextTokenizer(trained.lm)
  recovered = []
  for record in records[::3]:
    window = querier_task.encode_record(record, tokenizer, 48)
    tokens = jnp.asarray(window["tokens"][None, :-1])
    outputs = trained.module.apply(
        {**trained.lm.variables, "params": trained.params}, tokens,
        jnp.arange(48)[None], jnp.asarray(window["valid"][None, :-1]),
        method="towers")
    general, specific, merged = (np.asarray(a[0], np.float64) for a in (
        outputs.general, outputs.specific, outputs.merged))
    # merged = w * general + (1 - w) * specific, solved for w per token.
    gap = general - specific
    w = ((merged - specific) * gap).sum(-1) / (gap * gap).sum(-1)
    recovered.append(w[window["response"][1:]])
  recovered = np.concatenate(recovered)
  gate = results["gate_general_weight"]
  assert gate["tokens"] == recovered.size
  assert gate["mean"] == pytest.approx(recovered.mean(), abs=1e-5)
  assert f"mean weight of {gate['mean']:.3f}" in table
  evaluate.evaluate_workdir(
      tmp_path / "querier",
      evaluate.EvalConfig(max_new_tokens=2, max_windows=2, swap_windows=0),
      ft_workdir=tmp_path / "ft")
  assert not (tmp_path / "querier" / "eval" / evaluate.SWAP_FILE).exists()

  with pytest.raises(ValueError, match="plain LoRA run"):
    evaluate.evaluate_workdir(tmp_path / "ft", evaluate.EvalConfig())

  out = tmp_path / "export"
  subprocess.run([sys.executable, "-m", "xfusion_jax.export",
                  f"--workdir={tmp_path / 'querier'}", f"--out={out}"],
                 check=True, cwd=REPO)
  trained = artifacts.load_workdir(tmp_path / "querier")
  loaded = artifacts.load_export(out)
  np.testing.assert_array_equal(apply(loaded), apply(trained))
  for got, want in zip(jax.tree.leaves(loaded.heads),
                       jax.tree.leaves(trained.heads)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
