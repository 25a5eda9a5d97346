"""The generic training loop on the lm_adapter task with a tiny random LLM."""

import json
import math
import os
import pathlib
import shutil
import signal
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tensorboardX.proto import event_pb2

import hf_models
from xfusion_jax import sharding
from xfusion_jax.train import checkpointing
from xfusion_jax.train import lm_adapter
from xfusion_jax.train import loop
from xfusion_jax.train import metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILE = REPO / "configs" / "lm_adapter_tiny.py"
sys.path.insert(0, str(REPO / "configs"))
import lm_adapter_tiny  # pylint: disable=g-import-not-at-top,wrong-import-position

TOTAL_STEPS = 20
CHECKPOINT_EVERY = 10


@pytest.fixture(name="model_dir", scope="module")
def fixture_model_dir(tmp_path_factory):
  # A vocabulary of 256 lets the task use UTF-8 bytes as tokens, because
  # the tiny checkpoint has no tokenizer.
  config = hf_models.tiny_config("llama", vocab_size=256)
  return hf_models.save_model(hf_models.build_model(config),
                              tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(name="text_file", scope="module")
def fixture_text_file(tmp_path_factory):
  # Real English prose and code: the sources of two standard-library modules.
  import argparse  # pylint: disable=g-import-not-at-top
  import json as json_module  # pylint: disable=g-import-not-at-top
  text = "\n".join(pathlib.Path(m.__file__).read_text(encoding="utf-8")
                   for m in (json_module, argparse))
  path = tmp_path_factory.mktemp("text") / "train.txt"
  path.write_text(text, encoding="utf-8")
  return path


def make_config(model_dir, text_file, **overrides):
  config = lm_adapter_tiny.get_config()
  config.model_dir = str(model_dir)
  config.text_file = str(text_file)
  config.total_steps = TOTAL_STEPS
  config.checkpoint_every = CHECKPOINT_EVERY
  config.update(overrides)
  return config


@pytest.fixture(name="tiny_run", scope="module")
def fixture_tiny_run(model_dir, text_file, tmp_path_factory):
  """An uninterrupted run with checkpoints at steps 10 and 20."""
  workdir = tmp_path_factory.mktemp("run")
  config = make_config(model_dir, text_file)
  result = loop.train(config, workdir)
  return config, workdir, result


def losses(history, steps):
  return [history[s]["train/loss"] for s in steps]


def read_events(workdir):
  """Parse every TensorBoard event file under `workdir` (TFRecord framing)."""
  events = []
  for path in sorted(pathlib.Path(workdir).rglob("events.out.tfevents.*")):
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      offset += 12  # Length and its CRC.
      events.append(event_pb2.Event.FromString(data[offset:offset + length]))
      offset += length + 4  # Payload and its CRC.
  return events


def event_tags(workdir):
  return {value.tag for event in read_events(workdir)
          for value in event.summary.value}


def subprocess_env():
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  env["JAX_PLATFORMS"] = "cpu"
  return env


def cli_command(model_dir, text_file, workdir, *overrides):
  return [sys.executable, "-m", "xfusion_jax.train",
          f"--config={CONFIG_FILE}", f"--config.model_dir={model_dir}",
          f"--config.text_file={text_file}", f"--workdir={workdir}",
          *overrides]


def metric_lines(workdir):
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines()
          if line.endswith("}")]


def checkpoint_entries(workdir):
  directory = pathlib.Path(workdir) / "checkpoints"
  return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_loss_decreases(tiny_run):
  _, _, result = tiny_run
  assert sorted(result.history) == list(range(1, TOTAL_STEPS + 1))
  first = np.mean(losses(result.history, range(1, 6)))
  last = np.mean(losses(result.history, range(TOTAL_STEPS - 4,
                                              TOTAL_STEPS + 1)))
  assert last < first - 0.2, (first, last)
  assert not result.preempted


def test_tensorboard_tags_written(tiny_run):
  _, workdir, _ = tiny_run
  tags = event_tags(workdir)
  expected = {
      "train/loss", "train/cross_entropy", "train/accuracy",
      "train/grad_norm", "train/learning_rate", "perf/step_time_s",
      "perf/tokens_per_s", "perf/data_wait_s", "perf/mfu",
      "samples/continuation/text_summary",
  }
  assert expected <= tags, expected - tags


def test_metrics_file_matches_history(tiny_run):
  _, workdir, result = tiny_run
  lines = metric_lines(workdir)
  assert [line["step"] for line in lines] == list(range(1, TOTAL_STEPS + 1))
  for line in lines:
    assert line["train/loss"] == result.history[line["step"]]["train/loss"]
    assert 0 < line["perf/mfu"] < 1


def test_checkpoints_at_interval_and_end(tiny_run):
  _, workdir, _ = tiny_run
  assert checkpoint_entries(workdir) == ["10", "20"]


def test_checkpoint_contains_no_frozen_leaf(tiny_run):
  _, workdir, _ = tiny_run
  saved = ocp.StandardCheckpointer().metadata(
      workdir / "checkpoints" / "20" / "state").item_metadata
  paths = [jax.tree_util.keystr(p)
           for p, _ in jax.tree_util.tree_leaves_with_path(saved.tree)]
  assert "['params']['down']" in paths
  assert "['params']['up']" in paths
  # Each parameter has two Adam moments, and nothing else has its shape.
  param_paths = [p for p in paths if p.endswith(("['down']", "['up']"))]
  assert len(param_paths) == 6, paths
  for path in paths:
    assert "frozen" not in path
    assert "layers" not in path


def test_text_samples_written(tiny_run):
  _, workdir, _ = tiny_run
  text = (workdir / "samples" / "continuation.txt").read_text()
  assert "step 10:" in text
  assert "step 20:" in text


def test_step_time_starts_after_previous_step(tmp_path):
  # The loop dispatches step 2 before step 1 has finished, so step 2's time
  # starts when step 1's metrics arrive, not at its own dispatch.
  writer = metrics.MetricWriter(tmp_path)
  logger = loop._StepLogger(lm_adapter_tiny.get_config(), writer, 1.0, None)
  values = {"loss": 1.0, "grad_norm": 1.0, "learning_rate": 0.1,
            "params_finite": True}
  dispatched = time.perf_counter()
  time.sleep(0.5)
  logger.finish(loop._StepRecord(1, values, dispatched, 0.0, 10))
  time.sleep(0.05)
  logger.finish(loop._StepRecord(2, values, dispatched, 0.0, 10))
  writer.close()
  first = logger.history[1]["perf/step_time_s"]
  second = logger.history[2]["perf/step_time_s"]
  assert first >= 0.5
  assert 0.05 <= second < 0.5
  assert logger.history[2]["perf/tokens_per_s"] == pytest.approx(10 / second)


def test_image_samples_written(tmp_path):
  writer = metrics.MetricWriter(tmp_path)
  image = np.zeros((4, 6, 3), np.uint8)
  image[:, :3] = 255
  writer.write_samples(7, {"grid": image, "caption": "a cat"})
  with pytest.raises(ValueError, match="'bad' must be a string or a uint8"):
    writer.write_samples(8, {"bad": np.zeros((4, 4), np.float32)})
  writer.close()

  from PIL import Image  # pylint: disable=g-import-not-at-top
  saved = np.asarray(Image.open(tmp_path / "samples" / "grid_00000007.png"))
  np.testing.assert_array_equal(saved, image)
  assert "a cat" in (tmp_path / "samples" / "caption.txt").read_text()
  assert {"samples/grid", "samples/caption/text_summary"} <= event_tags(
      tmp_path)


def test_frozen_has_no_grads_or_opt_state(model_dir, text_file):
  config = make_config(model_dir, text_file)
  mesh = sharding.make_mesh(dict(config.mesh))
  task = lm_adapter.make_task(config, mesh)
  program = loop.build_program(config, task, mesh)
  state = program.init_state()
  batch = program.global_batch(next(task.train_data(config.seed)))

  with program.context():
    (loss, _), grads = jax.jit(program.loss_and_grads)(
        state.params, task.frozen, batch, jax.random.key(0))
  assert np.isfinite(float(loss))

  params_structure = jax.tree.structure(state.params)
  assert jax.tree.structure(grads) == params_structure
  assert set(state.params) == {"down", "up"}

  frozen_paths = {jax.tree_util.keystr(p)
                  for p, _ in jax.tree_util.tree_leaves_with_path(task.frozen)}
  opt_paths = [jax.tree_util.keystr(p) for p, _ in
               jax.tree_util.tree_leaves_with_path(state.opt_state)]
  for path in opt_paths:
    assert not any(name in path for name in ("frozen", "lm_head", "layers",
                                             "embed_tokens")), path
  assert frozen_paths

  # Optimizer state: two Adam moments per trainable value plus step counters.
  trainable = loop.count_params(state.params)
  opt_values = loop.count_params(state.opt_state)
  assert trainable == 2 * 64 * config.adapter_rank
  assert 2 * trainable <= opt_values <= 2 * trainable + 4
  assert loop.count_params(task.frozen) > 20 * trainable


def test_resume_is_bit_exact(tiny_run, tmp_path):
  config, workdir, result = tiny_run
  # The workdir of a run killed after step 10: only that checkpoint exists.
  shutil.copytree(workdir / "checkpoints" / str(CHECKPOINT_EVERY),
                  tmp_path / "checkpoints" / str(CHECKPOINT_EVERY))

  resumed = loop.train(config, tmp_path)

  steps = range(CHECKPOINT_EVERY + 1, TOTAL_STEPS + 1)
  assert sorted(resumed.history) == list(steps)
  assert losses(resumed.history, steps) == losses(result.history, steps)
  for got, want in zip(jax.tree.leaves(resumed.state.params),
                       jax.tree.leaves(result.state.params)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_finished_run_reruns_nothing(tiny_run):
  config, workdir, _ = tiny_run
  again = loop.train(config, workdir)
  assert not again.history
  assert checkpoint_entries(workdir) == ["10", "20"]


def test_frozen_hash_mismatch_raises(tiny_run, text_file, tmp_path):
  config, workdir, _ = tiny_run
  shutil.copytree(workdir / "checkpoints", tmp_path / "run" / "checkpoints")
  other_model = hf_models.save_model(
      hf_models.build_model(hf_models.tiny_config("llama", vocab_size=256),
                            seed=1), tmp_path / "other")
  other_config = make_config(other_model, text_file)
  with pytest.raises(checkpointing.FrozenSourceMismatchError,
                     match="trained beside frozen weights .* SHA-256"):
    loop.train(other_config, tmp_path / "run")


def test_nan_loss_stops_without_checkpoint(model_dir, text_file, tmp_path):
  # A learning rate of 1e30 makes the adapter's weights overflow within a
  # few Adam steps.
  config = make_config(model_dir, text_file, learning_rate=1e30,
                       warmup_steps=0, checkpoint_every=1, sample_every=0)
  with pytest.raises(loop.NonFiniteLossError,
                     match=r"Stopping at step (\d+).*not checkpointed") as e:
    loop.train(config, tmp_path)
  bad_step = int(str(e.value).split("step ")[1].split(":")[0])
  assert 1 < bad_step < TOTAL_STEPS

  saved = [int(name) for name in checkpoint_entries(tmp_path)]
  assert saved and max(saved) == bad_step - 1
  lines = metric_lines(tmp_path)
  assert [line["step"] for line in lines] == list(range(1, bad_step))
  assert all(math.isfinite(line["train/loss"]) for line in lines)


def test_mesh_step_matches_single_device(model_dir, text_file):
  config = make_config(model_dir, text_file)
  results = []
  for shape, devices in (({"data": 1}, jax.devices()[:1]),
                         ({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices())):
    mesh = sharding.make_mesh(shape, devices)
    task = lm_adapter.make_task(config, mesh)
    program = loop.build_program(config, task, mesh)
    batch = program.global_batch(next(task.train_data(config.seed)))
    state, step_metrics = program.train_step(program.init_state(), batch)
    state, step_metrics = program.train_step(state, batch)
    results.append((jax.device_get(state.params),
                    jax.device_get(step_metrics)))
  (params_one, metrics_one), (params_mesh, metrics_mesh) = results
  np.testing.assert_allclose(metrics_mesh["loss"], metrics_one["loss"],
                             rtol=1e-5)
  np.testing.assert_allclose(metrics_mesh["grad_norm"],
                             metrics_one["grad_norm"], rtol=1e-4)
  for name in ("down", "up"):
    np.testing.assert_allclose(params_mesh[name], params_one[name], rtol=1e-4,
                               atol=1e-6)


@pytest.mark.parametrize("unroll", [False, True])
def test_grad_accumulation_averages_micro_batches(model_dir, text_file,
                                                  unroll):
  """Accumulated gradients equal the mean of per-micro-batch gradients."""
  config = make_config(model_dir, text_file, grad_accum_steps=2)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  task = lm_adapter.make_task(config, mesh)
  program = loop.build_program(config, task, mesh, unroll_grad_accum=unroll)
  state = program.init_state()
  batch = program.global_batch(next(task.train_data(config.seed)))
  rng = jax.random.key(3)
  with program.context():
    (loss, _), grads, _ = jax.jit(program.accumulated_loss_grads_and_aux)(
        state.params, task.frozen, batch, rng, {})
    expected_losses, expected_grads = [], []
    for index in range(2):
      # Micro-batch i takes every second row, starting at row i.
      micro = jax.tree.map(lambda x, i=index: np.asarray(x)[i::2], batch)
      (micro_loss, _), micro_grads = jax.jit(program.loss_and_grads)(
          state.params, task.frozen, micro, jax.random.fold_in(rng, index))
      expected_losses.append(float(micro_loss))
      expected_grads.append(jax.device_get(micro_grads))
  np.testing.assert_allclose(float(loss), np.mean(expected_losses),
                             rtol=1e-6)
  for name in ("down", "up"):
    mean = (expected_grads[0][name] + expected_grads[1][name]) / 2
    np.testing.assert_allclose(np.asarray(grads[name]), mean, rtol=1e-5,
                               atol=1e-7)
  # The jitted train step runs the same accumulation.
  state, metrics = program.train_step(state, batch)
  assert np.isfinite(float(metrics["loss"]))


def test_grad_accumulation_must_divide_batch(model_dir, text_file):
  config = make_config(model_dir, text_file, grad_accum_steps=3)
  with pytest.raises(ValueError, match="grad_accum_steps=3"):
    loop.validate_config(config)


def test_cli_runs_with_loopback_coordinator(model_dir, text_file, tmp_path):
  with socket_port() as port:
    pass
  command = cli_command(model_dir, text_file, tmp_path,
                        "--config.total_steps=3",
                        f"--coordinator_address=127.0.0.1:{port}",
                        "--num_processes=1", "--process_id=0")
  done = subprocess.run(command, cwd=REPO, env=subprocess_env(),
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert [line["step"] for line in metric_lines(tmp_path)] == [1, 2, 3]
  assert checkpoint_entries(tmp_path) == ["3"]
  assert "JAX process 0 of 1" in done.stderr


def test_cli_rejects_unknown_config_field(model_dir, text_file, tmp_path):
  command = cli_command(model_dir, text_file, tmp_path, "--config.totl_steps=3")
  done = subprocess.run(command, cwd=REPO, env=subprocess_env(),
                        capture_output=True, text=True, timeout=300)
  assert done.returncode != 0
  assert "totl_steps" in done.stderr
  assert not metric_lines(tmp_path)


def socket_port():
  """Reserve a free loopback port (closed again before use)."""
  import contextlib  # pylint: disable=g-import-not-at-top
  import socket  # pylint: disable=g-import-not-at-top

  @contextlib.contextmanager
  def reserve():
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      yield s.getsockname()[1]
  return reserve()


def wait_for(condition, process, timeout_s=120.0, poll_s=0.01):
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    if condition():
      return
    if process.poll() is not None:
      raise AssertionError(
          f"Training exited early with {process.returncode}: "
          f"{process.stderr.read()[-3000:]}")
    time.sleep(poll_s)
  process.kill()
  raise AssertionError("Timed out waiting for the training subprocess.")


def test_sigterm_saves_and_resumes(model_dir, text_file, tmp_path):
  command = cli_command(model_dir, text_file, tmp_path,
                        "--config.total_steps=100000",
                        "--config.checkpoint_every=100000",
                        "--config.sample_every=0")
  process = subprocess.Popen(command, cwd=REPO, env=subprocess_env(),
                             stderr=subprocess.PIPE, text=True)
  wait_for(lambda: len(metric_lines(tmp_path)) >= 3, process)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 0, stderr[-3000:]
  assert "Received SIGTERM" in stderr

  last_step = metric_lines(tmp_path)[-1]["step"]
  assert checkpoint_entries(tmp_path) == [str(last_step)]

  config = make_config(model_dir, text_file, total_steps=100000,
                       checkpoint_every=100000, sample_every=0)
  config.total_steps = last_step + 2
  resumed = loop.train(config, tmp_path)
  assert sorted(resumed.history) == [last_step + 1, last_step + 2]


def test_sigkill_during_save_keeps_previous_checkpoint(model_dir, text_file,
                                                       tmp_path):
  command = cli_command(model_dir, text_file, tmp_path,
                        "--config.total_steps=100000",
                        "--config.checkpoint_every=1",
                        "--config.keep_checkpoints=2",
                        "--config.sample_every=0")
  process = subprocess.Popen(command, cwd=REPO, env=subprocess_env(),
                             stderr=subprocess.PIPE, text=True)

  def saving_after_a_complete_checkpoint():
    entries = checkpoint_entries(tmp_path)
    return (any(name.isdigit() for name in entries) and
            any("tmp" in name for name in entries))

  wait_for(saving_after_a_complete_checkpoint, process, poll_s=0.001)
  process.kill()
  process.communicate(timeout=60)
  entries = checkpoint_entries(tmp_path)
  assert any("tmp" in name for name in entries), entries

  complete = max(int(name) for name in entries if name.isdigit())
  config = make_config(model_dir, text_file, checkpoint_every=1,
                       keep_checkpoints=2, sample_every=0)
  config.total_steps = complete + 1
  resumed = loop.train(config, tmp_path)
  assert sorted(resumed.history) == [complete + 1]
  assert str(complete + 1) in checkpoint_entries(tmp_path)


def test_data_batches_independent_of_process_count(model_dir, text_file):
  config = make_config(model_dir, text_file)
  task = lm_adapter.make_task(config, sharding.make_mesh({"data": 1},
                                                         jax.devices()[:1]))
  one = iter(lm_adapter.make_dataset(task.windows, 8, config.seed, 0, 1))
  halves = [iter(lm_adapter.make_dataset(task.windows, 4, config.seed, index,
                                         2)) for index in range(2)]
  # Enough batches to cross an epoch boundary, where the order reshuffles.
  batches = 2 * len(task.windows) // 8 + 1
  for _ in range(batches):
    expected = next(one)["tokens"]
    got = np.concatenate([next(half)["tokens"] for half in halves])
    np.testing.assert_array_equal(got, expected)
  states = [half.get_state() for half in halves]
  assert states[0] == states[1] == one.get_state()


def run_two_processes(model_dir, text_file, workdir, *overrides):
  """Train with 2 processes of 4 CPU devices each; return their stderr."""
  with socket_port() as port:
    pass
  env = subprocess_env()
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  processes = [
      subprocess.Popen(
          cli_command(model_dir, text_file, workdir, *overrides,
                      f"--coordinator_address=127.0.0.1:{port}",
                      "--num_processes=2", f"--process_id={index}",
                      "--initialization_timeout=120"),
          cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
      for index in range(2)
  ]
  outputs = [process.communicate(timeout=300)[1] for process in processes]
  for index, process in enumerate(processes):
    assert process.returncode == 0, outputs[index][-3000:]
  return outputs


def restore_on_mesh(config, workdir, step, mesh_shape, devices):
  """Restore a checkpoint onto a mesh; return (state, next global batch)."""
  mesh = sharding.make_mesh(mesh_shape, devices)
  task = lm_adapter.make_task(config, mesh)
  program = loop.build_program(config, task, mesh)
  checkpointer = checkpointing.Checkpointer(workdir / "checkpoints", config,
                                            task.frozen_source)
  iterator = task.train_data(config.seed)
  try:
    state = checkpointer.restore(step, program.abstract_state, iterator,
                                 process_count_invariant_data=True)
  finally:
    checkpointer.close()
  return state, next(iterator)["tokens"]


def test_two_processes_resume_on_one(model_dir, text_file, tmp_path):
  """2 processes train and checkpoint; 1 process resumes on another mesh.

  The continued losses cannot equal an uninterrupted 1-process run bit for
  bit. Gloo's all-reduce across the 2 processes adds the gradient partial
  sums in another order than the 1-process all-reduce (on the same mesh
  shape, the losses already differ in the last bits at step 2), and the new
  mesh (data=2, fsdp=2, tensor=2) splits the loss, gradient and matmul sums
  differently again. The exact properties are checked exactly: the restore
  onto the new mesh reproduces the saved arrays and the data position. The
  losses agree to float32 rounding; a wrong state or data position would
  miss the tolerance by orders of magnitude.
  """
  two = tmp_path / "two_processes"
  outputs = run_two_processes(model_dir, text_file, two,
                              "--config.total_steps=4",
                              "--config.checkpoint_every=2",
                              "--config.sample_every=0")
  for index, output in enumerate(outputs):
    assert f"JAX process {index} of 2: local devices [" in output
  assert [line["step"] for line in metric_lines(two)] == [1, 2, 3, 4]
  assert checkpoint_entries(two) == ["2", "4"]
  data_files = sorted(p.name for p in (two / "checkpoints" / "2" /
                                       "data").glob("*.json"))
  assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]
  two_losses = [line["train/loss"] for line in metric_lines(two)]

  total = 6
  new_mesh = make_config(model_dir, text_file, total_steps=total,
                         checkpoint_every=2, sample_every=0)
  new_mesh.mesh.update(data=2, fsdp=2, tensor=2)

  # The restore itself is exact: the new mesh's shards hold the values that
  # a single device reads, and the data iterator is at global batch 3.
  sharded, sharded_batch = restore_on_mesh(
      new_mesh, two, 2, {"data": 2, "fsdp": 2, "tensor": 2}, jax.devices())
  single, single_batch = restore_on_mesh(new_mesh, two, 2, {"data": 1},
                                         jax.devices()[:1])
  assert int(sharded.step) == 2
  assert sharded.params["down"].sharding.spec == jax.sharding.PartitionSpec(
      "fsdp", "tensor")
  for got, want in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  fresh = lm_adapter.make_task(new_mesh, sharding.make_mesh(
      {"data": 1}, jax.devices()[:1])).train_data(new_mesh.seed)
  third_batch = [next(fresh)["tokens"] for _ in range(3)][-1]
  np.testing.assert_array_equal(sharded_batch, third_batch)
  np.testing.assert_array_equal(single_batch, third_batch)

  # One process resumes the 2-process checkpoint of step 2 on the new mesh.
  resumed_dir = tmp_path / "resumed"
  shutil.copytree(two / "checkpoints" / "2", resumed_dir / "checkpoints" / "2")
  resumed = loop.train(new_mesh, resumed_dir)
  assert sorted(resumed.history) == list(range(3, total + 1))
  down = resumed.state.params["down"]
  assert dict(down.sharding.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert down.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")

  uninterrupted = loop.train(new_mesh, tmp_path / "uninterrupted")
  steps = range(3, total + 1)
  np.testing.assert_allclose(losses(resumed.history, steps),
                             losses(uninterrupted.history, steps), rtol=1e-5)
  np.testing.assert_allclose(two_losses,
                             losses(uninterrupted.history, range(1, 5)),
                             rtol=1e-5)
  # The steps' batches differ, so a resume at the wrong batch would show.
  assert np.ptp(losses(uninterrupted.history, steps)) > 1e-3


def test_process_count_change_rejected_for_sharded_data(
    model_dir, text_file, tmp_path):
  two = tmp_path / "two_processes"
  run_two_processes(model_dir, text_file, two, "--config.total_steps=2",
                    "--config.checkpoint_every=2", "--config.sample_every=0")
  config = make_config(model_dir, text_file, total_steps=3, sample_every=0)

  def task_with_process_sharded_data(task_config, mesh):
    task = lm_adapter.make_task(task_config, mesh)
    task.process_count_invariant_data = False
    return task

  with pytest.raises(ValueError,
                     match="written by 2 processes, but this run has 1"):
    loop.train(config, two, task_with_process_sharded_data)
