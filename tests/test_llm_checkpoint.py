"""Checkpoint validation, unsupported configs, export and transformers reload."""

import json

import jax
import numpy as np
import pytest
import safetensors
import safetensors.numpy
import torch
import transformers

import hf_models
from xfusion_jax import llm


@pytest.fixture(name="tiny_dir")
def fixture_tiny_dir(tmp_path):
  model = hf_models.build_model(hf_models.tiny_config("llama"))
  return hf_models.save_model(model, tmp_path / "tiny"), model


def _edit_tensors(model_dir, edit):
  path = model_dir / "model.safetensors"
  with safetensors.safe_open(path, "np") as f:
    tensors = {name: f.get_tensor(name) for name in f.keys()}
  edit(tensors)
  safetensors.numpy.save_file(tensors, path, {"format": "pt"})


def _edit_config(model_dir, edit):
  path = model_dir / "config.json"
  config = json.loads(path.read_text())
  edit(config)
  path.write_text(json.dumps(config))


def test_missing_tensor_named(tiny_dir):
  model_dir, _ = tiny_dir
  name = "model.layers.1.mlp.up_proj.weight"
  _edit_tensors(model_dir, lambda t: t.pop(name))
  with pytest.raises(ValueError, match=rf"missing tensor {name}.*model\.safetensors"):
    llm.from_pretrained(model_dir, load_tokenizer=False)


def test_unexpected_tensor_named(tiny_dir):
  model_dir, _ = tiny_dir
  _edit_tensors(model_dir,
                lambda t: t.update({"model.extra.weight": np.zeros(3, np.float32)}))
  with pytest.raises(ValueError, match=r"unexpected tensor model\.extra\.weight"):
    llm.from_pretrained(model_dir, load_tokenizer=False)


def test_misshaped_tensor_named(tiny_dir):
  model_dir, _ = tiny_dir
  name = "model.layers.0.self_attn.k_proj.weight"

  def truncate(tensors):
    tensors[name] = tensors[name][:-1]

  _edit_tensors(model_dir, truncate)
  with pytest.raises(ValueError, match=rf"tensor {name} in .* has shape \(15, 64\)"):
    llm.from_pretrained(model_dir, load_tokenizer=False)


def test_unsupported_model_type(tiny_dir):
  model_dir, _ = tiny_dir
  _edit_config(model_dir, lambda c: c.update(model_type="gpt_neox"))
  with pytest.raises(ValueError, match="Unsupported model_type 'gpt_neox'"):
    llm.from_pretrained(model_dir, load_tokenizer=False)


def test_unsupported_rope_type(tiny_dir):
  model_dir, _ = tiny_dir
  _edit_config(model_dir, lambda c: c.update(
      rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}))
  with pytest.raises(ValueError, match="Unsupported rope_type 'yarn'"):
    llm.from_pretrained(model_dir, load_tokenizer=False)


def test_pickle_rejected_by_default(tiny_dir, tmp_path):
  model_dir, model = tiny_dir
  pickled_dir = tmp_path / "pickled"
  pickled_dir.mkdir()
  (pickled_dir / "config.json").write_text(
      (model_dir / "config.json").read_text())
  torch.save(model.state_dict(), pickled_dir / "pytorch_model.bin")
  with pytest.raises(ValueError, match="pickled PyTorch weights"):
    llm.from_pretrained(pickled_dir, load_tokenizer=False)
  lm = llm.from_pretrained(pickled_dir, dtype="float32", allow_pickle=True,
                           load_tokenizer=False)
  input_ids = np.arange(3, 23)[None]
  np.testing.assert_allclose(
      np.asarray(lm.logits(input_ids)),
      hf_models.reference_logits(model, input_ids), atol=1e-4, rtol=0)


def test_frozen_collection_and_dtype(tiny_dir):
  model_dir, _ = tiny_dir
  lm = llm.from_pretrained(model_dir, load_tokenizer=False)
  assert set(lm.variables) == {llm.FROZEN}
  dtypes = {leaf.dtype for leaf in jax.tree.leaves(lm.weights)}
  assert dtypes == {np.dtype("bfloat16")}


def _reload(out_dir):
  model, info = transformers.AutoModelForCausalLM.from_pretrained(
      out_dir, output_loading_info=True, dtype="auto")
  return model.eval(), info


@pytest.mark.parametrize("tied", [False, True])
def test_export_roundtrip_float32(tmp_path, tied):
  source = hf_models.build_model(
      hf_models.tiny_config("llama", tie_word_embeddings=tied,
                            num_key_value_heads=2))
  hf_models.save_model(source, tmp_path / "source")
  lm = llm.from_pretrained(tmp_path / "source", dtype="float32",
                           load_tokenizer=False)
  llm.save_pretrained(lm, tmp_path / "export", max_shard_size="40KB")
  assert (tmp_path / "export" / "model.safetensors.index.json").exists()
  reloaded, info = _reload(tmp_path / "export")
  for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
    assert not info[kind], f"{kind}: {info[kind]}"
  expected = source.state_dict()
  actual = reloaded.state_dict()
  assert set(actual) == set(expected)
  for name, tensor in expected.items():
    assert torch.equal(actual[name], tensor), f"{name} changed in export"
  input_ids = np.random.default_rng(1).integers(3, 128, (2, 40))
  np.testing.assert_allclose(
      hf_models.reference_logits(reloaded, input_ids),
      np.asarray(lm.logits(input_ids)), atol=1e-5, rtol=0)


def test_export_bfloat16(tmp_path):
  source = hf_models.build_model(
      hf_models.tiny_config("qwen2", rope_scaling=None))
  hf_models.save_model(source, tmp_path / "source")
  lm = llm.from_pretrained(tmp_path / "source", dtype="bfloat16",
                           load_tokenizer=False)
  llm.save_pretrained(lm, tmp_path / "export")
  with safetensors.safe_open(tmp_path / "export" / "model.safetensors",
                             "pt") as f:
    dtypes = {f.get_tensor(name).dtype for name in f.keys()}
  assert dtypes == {torch.bfloat16}
  config = json.loads((tmp_path / "export" / "config.json").read_text())
  assert config["dtype"] == "bfloat16"
  assert config["rope_parameters"]["rope_theta"] == config["rope_theta"]
  reloaded, info = _reload(tmp_path / "export")
  assert not info["missing_keys"]
  assert not info["unexpected_keys"]
  assert reloaded.dtype == torch.bfloat16
  expected = {k: v.to(torch.bfloat16) for k, v in source.state_dict().items()}
  for name, tensor in reloaded.state_dict().items():
    assert torch.equal(tensor, expected[name]), f"{name} changed in export"


def test_export_llama3_rope_reloads(tmp_path):
  rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
  source = hf_models.build_model(
      hf_models.tiny_config("llama", rope_scaling=rope, rope_theta=5e5))
  hf_models.save_model(source, tmp_path / "source")
  lm = llm.from_pretrained(tmp_path / "source", dtype="float32",
                           load_tokenizer=False)
  llm.save_pretrained(lm, tmp_path / "export")
  reloaded, _ = _reload(tmp_path / "export")
  assert reloaded.config.rope_parameters["rope_type"] == "llama3"
  input_ids = np.arange(3, 43)[None]
  np.testing.assert_allclose(
      hf_models.reference_logits(reloaded, input_ids),
      hf_models.reference_logits(source, input_ids), atol=1e-6, rtol=0)


def test_export_replaces_earlier_weights(tmp_path, tiny_dir):
  model_dir, _ = tiny_dir
  lm = llm.from_pretrained(model_dir, dtype="float32", load_tokenizer=False)
  out = tmp_path / "export"
  llm.save_pretrained(lm, out, max_shard_size="30KB")
  assert (out / "model.safetensors.index.json").exists()
  llm.save_pretrained(lm, out)
  assert not (out / "model.safetensors.index.json").exists()
  assert sorted(p.name for p in out.glob("model*.safetensors")) == [
      "model.safetensors"]
  assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_truncated_safetensors_named(tiny_dir):
  model_dir, _ = tiny_dir
  path = model_dir / "model.safetensors"
  path.write_bytes(path.read_bytes()[:100])
  with pytest.raises(ValueError, match=r"model\.safetensors is truncated"):
    llm.from_pretrained(model_dir, load_tokenizer=False)


def test_conflicting_rope_keys(tiny_dir):
  model_dir, _ = tiny_dir
  _edit_config(model_dir, lambda c: c.update(
      rope_scaling={"rope_type": "linear", "factor": 2.0}))
  with pytest.raises(ValueError, match="conflicting RoPE settings"):
    llm.from_pretrained(model_dir, load_tokenizer=False)


def test_invalid_dtype_and_folder(tiny_dir, tmp_path):
  model_dir, _ = tiny_dir
  with pytest.raises(ValueError, match="Invalid dtype 'int8'"):
    llm.from_pretrained(model_dir, dtype="int8", load_tokenizer=False)
  with pytest.raises(FileNotFoundError, match="not found"):
    llm.from_pretrained(tmp_path / "missing", load_tokenizer=False)
  with pytest.raises(FileNotFoundError, match="it is a file"):
    llm.from_pretrained(model_dir / "config.json", load_tokenizer=False)


def test_long_generation_warns(tiny_dir, caplog):
  model_dir, _ = tiny_dir
  lm = llm.from_pretrained(model_dir, dtype="float32", load_tokenizer=False)
  limit = lm.config.max_position_embeddings
  prompt = np.ones((1, 4), np.int32)
  lm.generate(prompt, max_new_tokens=limit - 4)
  assert "max_position_embeddings" not in caplog.text
  lm.generate(prompt, max_new_tokens=limit - 3)
  assert f"max_position_embeddings={limit}" in caplog.text


def test_empty_input_rejected(tiny_dir):
  model_dir, _ = tiny_dir
  lm = llm.from_pretrained(model_dir, dtype="float32", load_tokenizer=False)
  with pytest.raises(ValueError, match="non-empty"):
    lm.generate(np.zeros((1, 0), np.int32))


@pytest.mark.parametrize("shape,message", [
    ({"data": -1, "fsdp": 0}, "fsdp has size 0"),
    ({"data": 2.5}, "data has size 2.5"),
    ({"data": 2, "fsdp": 2}, "set one axis to -1"),
    ({"data": -1, "fsdp": -1}, "At most one"),
])
def test_make_mesh_rejects(shape, message):
  from xfusion_jax import sharding  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=message):
    sharding.make_mesh(shape)
