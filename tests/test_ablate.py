"""The ablation harness end to end: a two-arm study on a tiny model."""

import dataclasses
import json
import pathlib
import shlex
import subprocess

import jax
import jax.numpy as jnp
import pytest

import hf_models
import latent_data
from xfusion_jax.data import datasets
from xfusion_jax.data import encode_latents
from xfusion_jax.experiments import ablate
from xfusion_jax.experiments import evaluation
from xfusion_jax.experiments import report
from xfusion_jax.experiments import studies
from xfusion_jax.xfusion import reference_classifier

REPO = pathlib.Path(__file__).resolve().parent.parent
CONFIG = str(REPO / "configs" / "xfusion_tiny.py")
ARMS = ("single_tower", "dual_tower")
STEPS = 2
# Small samples keep the test fast.
SETTINGS = evaluation.EvalSettings(
    images_per_class=1, caption_examples=4, sampler_steps=2, real_images=20,
    perplexity_windows=2, perplexity_window_tokens=16)


@pytest.fixture(name="study", scope="module")
def fixture_study(tmp_path_factory):
  """Run the study once; return (request, statuses, data_dir)."""
  root = tmp_path_factory.mktemp("ablate")
  # The shared asset cache: preparing the dataset there happens once.
  datasets.prepare("fashion_mnist_captions")
  data_dir = datasets.default_data_dir()
  autoencoder = latent_data.random_autoencoder(
      root / "autoencoder", levels=3, image_size=28, in_channels=1)
  latents = encode_latents.encode_latents(
      "fashion_mnist_captions", autoencoder, data_dir=data_dir,
      output_dir=root / "latents", batch_size=2000)
  model_dir = hf_models.save_tiny_llama_with_smollm2_tokenizer(root / "lm")
  # An untrained judge: this test checks the plumbing, not the figures.
  classifier = reference_classifier.ReferenceClassifier(
      reference_classifier.FashionCNN().init(
          jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"], 0.0)
  request = ablate.StudyRequest(
      study="architecture", out=root / "out", config_file=CONFIG,
      overrides={"model_dir": str(model_dir), "latent_dataset": str(latents),
                 "autoencoder": str(root / "autoencoder"),
                 "latent_size": (7, 7), "patch_size": 1},
      steps=STEPS, arms=ARMS, eval_points=2, evaluation=SETTINGS)
  statuses = ablate.run_study(request, classifier=classifier,
                              data_dir=data_dir)
  return request, statuses, data_dir


def test_first_run_trains_every_arm(study):
  _, statuses, _ = study
  assert statuses == {"single_tower": "trained", "dual_tower": "trained"}


def test_report_files_written(study):
  request, _, _ = study
  out = request.out
  table = (out / report.RESULTS_MARKDOWN).read_text()
  for arm in ARMS:
    assert f"| {arm} |" in table
  assert "Fréchet distance on EfficientNet-Lite0 features" in table
  for key, _, _ in report.METRICS:
    with open(out / report.plot_file(key), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  commands = (out / ablate.COMMANDS_FILE).read_text()
  for arm in ARMS:
    assert f"--workdir={out / 'arms' / arm / 'workdir'}" in commands
  assert "--config.architecture=single_tower" in commands
  assert shlex.join(ablate.harness_command(request)) in commands


def test_results_json_has_every_checkpoint(study):
  request, _, _ = study
  results = json.loads((request.out / report.RESULTS_JSON).read_text())
  assert results["steps"] == STEPS
  assert results["eval_steps"] == [1, 2]
  assert list(results["arms"]) == ["single_tower", "dual_tower"]
  for arm in results["arms"].values():
    points = arm["checkpoints"]
    assert [p["step"] for p in points] == [1, 2]
    assert 0 < points[0]["training_tokens"] < points[1]["training_tokens"]
    for point in points:
      assert point["generated_images"] == 10
      assert point["real_images"] == 20
      assert point["captioned_examples"] == 4
      assert point["frechet_distance"] > 0
      assert 0 <= point["generation_accuracy"] <= 1
      assert 0 <= point["bleu4"] <= 1


def test_text_perplexity_only_single_tower_changes(study):
  request, _, _ = study
  results = json.loads((request.out / report.RESULTS_JSON).read_text())
  dual = results["arms"]["dual_tower"]["checkpoints"][-1]
  single = results["arms"]["single_tower"]["checkpoints"][-1]
  # The frozen text path leaves text-only predictions as the base LLM's.
  assert dual["perplexity_xfusion"] == pytest.approx(
      dual["perplexity_base_llm"], rel=1e-5)
  assert single["perplexity_base_llm"] == pytest.approx(
      dual["perplexity_base_llm"], rel=1e-6)
  # single_tower trains the text blocks, so its text-only model moved.
  assert abs(single["perplexity_xfusion"] / single["perplexity_base_llm"] -
             1) > 1e-4


def test_rerun_skips_finished_arms(study):
  request, _, _ = study
  out = request.out
  logs = {arm: (out / "arms" / arm / ablate.TRAIN_LOG).stat().st_mtime_ns
          for arm in ARMS}
  evaluations = {
      arm: (out / "arms" / arm / ablate.EVALUATION_FILE).read_text()
      for arm in ARMS}
  # The command that commands.txt records runs the same study again.
  result = subprocess.run(ablate.harness_command(request), cwd=REPO,
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads(result.stdout) == {"single_tower": "skipped",
                                       "dual_tower": "skipped"}
  for arm in ARMS:
    assert (out / "arms" / arm / ablate.TRAIN_LOG).stat().st_mtime_ns == logs[
        arm]
    assert (out / "arms" / arm / ablate.EVALUATION_FILE).read_text() == (
        evaluations[arm])


def test_rerun_evaluates_missing_checkpoint(study):
  request, _, data_dir = study
  evaluation_file = request.out / "arms" / "dual_tower" / ablate.EVALUATION_FILE
  stored = json.loads(evaluation_file.read_text())
  del stored["2"]
  evaluation_file.write_text(json.dumps(stored))
  classifier = reference_classifier.ReferenceClassifier(
      reference_classifier.FashionCNN().init(
          jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"], 0.0)
  statuses = ablate.run_study(request, classifier=classifier,
                              data_dir=data_dir)
  assert statuses == {"single_tower": "skipped", "dual_tower": "evaluated"}
  assert sorted(json.loads(evaluation_file.read_text())) == ["1", "2"]


def test_rerun_with_other_steps_rejected(study):
  request, _, _ = study
  changed = dataclasses.replace(request, steps=STEPS + 1)
  with pytest.raises(ValueError, match="steps=2"):
    ablate.run_study(changed)


def test_varied_field_override_rejected(tmp_path):
  request = ablate.StudyRequest(
      study="noise", out=tmp_path, config_file=CONFIG,
      overrides={"understanding_noise_cap": 0.1}, steps=1)
  with pytest.raises(ValueError, match="understanding_noise_cap"):
    ablate.run_study(request)


@pytest.mark.parametrize("study,arms", [
    ("architecture", 5), ("noise", 3), ("mixture", 5), ("alignment", 2)])
def test_study_arm_counts(study, arms):
  assert len(studies.study_arms(study)) == arms


def test_unknown_arm_rejected():
  with pytest.raises(ValueError, match="no arm gated_twice"):
    studies.study_arms("architecture", selected=["gated_twice"])


@pytest.mark.parametrize("steps,points,expected", [
    (10, 4, [3, 6, 9, 10]), (2, 2, [1, 2]), (3, 5, [1, 2, 3]),
    (2000, 4, [500, 1000, 1500, 2000])])
def test_evaluation_steps(steps, points, expected):
  assert ablate.evaluation_steps(steps, points) == expected
