r"""Run an X-Fusion ablation study: train every arm, evaluate it, report.

  python -m xfusion_jax.experiments.ablate --config=configs/cpu_demo.py \
      --study=architecture [--steps=N | --budget_minutes=M] --out=DIR

Studies (`studies.study_arms`): "architecture" (single_tower, gated,
dual_projection, dual_tower, dual_tower with X-Fuse), "noise" (understanding
images with diffusion time up to 0, 0.25 and 0.5), "mixture" (generation to
understanding rows 100:0, 66:33, 50:50, 33:66, 0:100) and "alignment" (off,
and on with weight --align_weight). `--config.FIELD=VALUE` flags change the
base config of every arm; a field that the study varies is rejected.

Budget: every arm trains the same number of optimizer steps with the same
batch size, seed and data order, so every arm sees the same training tokens
(the non-padding text and image slots of its batches). `--steps=N` sets the
number. `--budget_minutes=M` converts minutes into steps once: a probe run
of the study's first arm measures the median seconds per step (after the
compiling steps), the step count is M * 60 divided by it, and `plan.json`
stores that count for every arm and every rerun. Without either flag the
config's total_steps is the budget. The budget is equal in tokens, not in
seconds or FLOPs: an arm with more trainable weights takes longer per step.
Evaluation time is not counted.

Arms: each arm trains in its own process, `python -m xfusion_jax.train` with
`--config.FIELD=VALUE` overrides, in `DIR/arms/ARM/workdir` (log:
`DIR/arms/ARM/train.log`). Its checkpoints every ceil(steps / eval_points)
steps and at the last step are all kept, and this process then evaluates
each one (`evaluation.evaluate_checkpoint`) into
`DIR/arms/ARM/evaluation.json`. Evaluation uses the same sample sizes and
judges for every arm.

Resume: `DIR/plan.json` records the study's settings. Rerunning the same
command skips arms whose checkpoints are all evaluated, resumes the training
of unfinished arms from their latest checkpoint and evaluates the missing
checkpoints. A rerun with other settings into the same DIR is rejected.
`--arms=a,b` runs some arms only; the report covers every evaluated arm.

Outputs in DIR: `results.md` (tables), `results.json` (every figure),
one PNG per metric against training tokens, and `commands.txt` (the exact
commands).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
import importlib.util
import json
import math
import os
import pathlib
import platform
import shlex
import statistics
import subprocess
import sys
from typing import Any

from absl import app
from absl import flags
from absl import logging
import ml_collections

from xfusion_jax import hostenv
from xfusion_jax.data import encode_latents
from xfusion_jax.experiments import evaluation
from xfusion_jax.experiments import report
from xfusion_jax.experiments import studies
from xfusion_jax.xfusion import demo_data
from xfusion_jax.xfusion import reference_classifier

PLAN_FILE = "plan.json"
COMMANDS_FILE = "commands.txt"
EVALUATION_FILE = "evaluation.json"
TRAIN_LOG = "train.log"
PROBE_DIR = "budget_probe"
ARMS_DIR = "arms"
# The first probe steps compile the train step, so their time is excluded.
_PROBE_WARMUP_STEPS = 2
# Fields the harness sets for every arm.
_HARNESS_FIELDS = ("checkpoint_every", "keep_checkpoints", "sample_every")


@dataclasses.dataclass(frozen=True)
class StudyRequest:
  """Settings of one study run.

  Attributes:
    study: a name in `studies.STUDIES`.
    out: output folder; a rerun with the same folder resumes.
    config_file: training config file of the base config.
    overrides: `--config.FIELD=VALUE` values applied to the base config.
    steps: training steps of every arm (the budget).
    budget_minutes: alternative budget, converted into steps once.
    arms: names of the arms to run; empty runs every arm.
    eval_points: checkpoints evaluated per arm, the last step included.
    align_weight: lambda_align of the alignment study's align_on arm.
    probe_steps: steps of the probe run that times a step.
    evaluation: sample sizes of the figures.
  """

  study: str
  out: pathlib.Path
  config_file: str
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  steps: int | None = None
  budget_minutes: float | None = None
  arms: tuple[str, ...] = ()
  eval_points: int = 4
  align_weight: float = studies.DEFAULT_ALIGN_WEIGHT
  probe_steps: int = 10
  evaluation: evaluation.EvalSettings = evaluation.EvalSettings()


def load_config(config_file: str,
                overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Load `get_config()` of a config file and apply flat overrides."""
  spec = importlib.util.spec_from_file_location("ablation_base_config",
                                                config_file)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f"Cannot load the config file {config_file}.")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.update_from_flattened_dict(dict(overrides))
  return config


def override_argument(field: str, value: Any) -> str:
  """Format one `--config.FIELD=VALUE` flag as ml_collections parses it."""
  if isinstance(value, bool):
    text = "true" if value else "false"
  elif isinstance(value, (tuple, list)):
    text = repr(tuple(value))
  else:
    text = str(value)
  return f"--config.{field}={text}"


def harness_command(request: StudyRequest) -> list[str]:
  """Return the argument list of this command that runs `request` again."""
  command = [sys.executable, "-m", "xfusion_jax.experiments.ablate",
             f"--config={request.config_file}"]
  command += [override_argument(k, v) for k, v in request.overrides.items()]
  command += [f"--study={request.study}", f"--out={request.out}"]
  if request.steps is not None:
    command.append(f"--steps={request.steps}")
  if request.budget_minutes is not None:
    command.append(f"--budget_minutes={request.budget_minutes}")
  if request.arms:
    command.append(f"--arms={','.join(request.arms)}")
  command += [f"--eval_points={request.eval_points}",
              f"--align_weight={request.align_weight}",
              f"--probe_steps={request.probe_steps}"]
  for field, value in dataclasses.asdict(request.evaluation).items():
    if value is not None:
      # The sampling seed's flag is --eval_seed, apart from the config's seed.
      flag = "eval_seed" if field == "seed" else field
      command.append(f"--{flag}={value}")
  return command


def train_command(config_file: str, overrides: Mapping[str, Any],
                  workdir: pathlib.Path) -> list[str]:
  """Return the argument list of one training process."""
  return ([sys.executable, "-m", "xfusion_jax.train",
           f"--config={config_file}"] +
          [override_argument(k, v) for k, v in overrides.items()] +
          [f"--workdir={workdir}"])


def checkpoint_steps(workdir: pathlib.Path) -> list[int]:
  """Return the steps of the complete checkpoints in a training workdir.

  Orbax writes a checkpoint under a temporary name and renames it to the
  bare step number when complete, so only all-digit folders count.
  """
  directory = workdir / "checkpoints"
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir()
                if p.is_dir() and p.name.isdigit())


def evaluation_steps(steps: int, eval_points: int) -> list[int]:
  """Return the evaluated steps: every ceil(steps / eval_points), and the last."""
  interval = math.ceil(steps / eval_points)
  return sorted(set(range(interval, steps + 1, interval)) | {steps})


def _write_json(path: pathlib.Path, value: Any) -> None:
  """Write JSON through a temporary file, so a killed write leaves the old."""
  partial = path.with_suffix(".partial")
  partial.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
  partial.replace(path)


def _read_json(path: pathlib.Path) -> Any:
  return json.loads(path.read_text(encoding="utf-8"))


def _data_overrides(request: StudyRequest,
                    config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Resolve the data folders once, so every arm trains on the same ones."""
  latent_dataset = config.latent_dataset
  autoencoder = config.autoencoder
  if not latent_dataset:
    if not config.demo_data:
      raise ValueError("The base config has no latent_dataset. Pass "
                       "--config.latent_dataset=DIR or a config with "
                       "demo_data.")
    feature_encoder = ("efficientnet_lite0" if request.study == "alignment"
                       else "")
    latents, demo_autoencoder = demo_data.prepare(
        feature_encoder=feature_encoder)
    latent_dataset = str(latents)
    autoencoder = autoencoder or str(demo_autoencoder)
  if not autoencoder:
    raise ValueError("The base config has no autoencoder, which the "
                     "evaluation needs to decode generated latents. Pass "
                     "--config.autoencoder=DIR.")
  data = {"latent_dataset": latent_dataset, "autoencoder": autoencoder}
  if request.study == "alignment":
    metadata = encode_latents.feature_metadata(latent_dataset)
    if metadata is None:
      raise ValueError(
          f"The alignment study needs encoder features, but {latent_dataset} "
          "has none. Write the latents with `python -m "
          "xfusion_jax.data.encode_latents --feature_encoder="
          "efficientnet_lite0 ...` and pass --config.latent_dataset=DIR.")
    # Both arms read the same dataset; align_off ignores its features.
    data["feature_encoder"] = metadata["feature_encoder"]
  return data


def _check_overrides(request: StudyRequest) -> None:
  varied = sorted(set(request.overrides) & studies.varied_fields(request.study))
  if varied:
    raise ValueError(f"The {request.study} study sets {', '.join(varied)} "
                     "in each arm; remove those --config overrides.")
  fixed = sorted(set(request.overrides) & set(_HARNESS_FIELDS))
  if fixed:
    raise ValueError(f"The harness sets {', '.join(fixed)} for every arm; "
                     "remove those --config overrides (use --eval_points).")


def _probe_seconds_per_step(request: StudyRequest, base: dict[str, Any],
                            arm: studies.Arm) -> tuple[float, list[str]]:
  """Time the training steps of `arm` in a short probe run.

  Returns:
    The median seconds per step after the compiling steps, and the command.
  """
  if request.probe_steps <= _PROBE_WARMUP_STEPS:
    raise ValueError(f"probe_steps={request.probe_steps} leaves no step "
                     f"after the {_PROBE_WARMUP_STEPS} compiling ones.")
  workdir = request.out / PROBE_DIR / "workdir"
  overrides = dict(base, **arm.overrides, total_steps=request.probe_steps,
                   checkpoint_every=request.probe_steps, keep_checkpoints=1,
                   sample_every=0)
  command = train_command(request.config_file, overrides, workdir)
  _run_training(command, request.out / PROBE_DIR, f"budget probe ({arm.name})")
  times = {}
  with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
    for line in f:
      record = json.loads(line)
      if record["step"] > _PROBE_WARMUP_STEPS:
        times[record["step"]] = record["perf/step_time_s"]
  if not times:
    raise ValueError(f"The probe run in {workdir} logged no step after step "
                     f"{_PROBE_WARMUP_STEPS}. Delete {request.out / PROBE_DIR}"
                     " and rerun.")
  return statistics.median(times.values()), command


def _run_training(command: list[str], folder: pathlib.Path, name: str) -> None:
  """Run one training process, its output appended to `folder/train.log`."""
  folder.mkdir(parents=True, exist_ok=True)
  log_path = folder / TRAIN_LOG
  logging.info("Training %s: %s (log: %s)", name, shlex.join(command),
               log_path)
  with open(log_path, "a", encoding="utf-8") as log:
    result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT,
                            check=False)
  if result.returncode != 0:
    raise RuntimeError(f"Training {name} failed with exit status "
                       f"{result.returncode}; see {log_path}. Rerun the same "
                       "command to resume it.")
  logging.info("Training %s finished.", name)


def _plan(request: StudyRequest, config: ml_collections.ConfigDict,
          arms: tuple[studies.Arm, ...],
          previous: dict[str, Any] | None) -> dict[str, Any]:
  """Build the plan of this request, reusing a measured budget."""
  base = dict(request.overrides)
  base.update(_data_overrides(request, config))
  # Explicit, so that a changed default in the config file shows up.
  base["seed"] = config.seed
  all_arms = studies.study_arms(request.study, request.align_weight)
  budget = None
  if request.steps is not None and request.budget_minutes is not None:
    raise ValueError("Pass --steps or --budget_minutes, not both.")
  if request.steps is not None:
    steps = request.steps
  elif request.budget_minutes is not None:
    previous_budget = (previous or {}).get("budget") or {}
    if previous_budget.get("minutes") == request.budget_minutes:
      budget = previous_budget
    else:
      seconds, command = _probe_seconds_per_step(request, base, all_arms[0])
      budget = {
          "minutes": request.budget_minutes,
          "probe_arm": all_arms[0].name,
          "seconds_per_step": seconds,
          "probe_command": shlex.join(command),
      }
    steps = max(1, int(request.budget_minutes * 60 // budget[
        "seconds_per_step"]))
  else:
    steps = config.total_steps
  if steps < 1 or request.eval_points < 1:
    raise ValueError(f"steps={steps} and eval_points={request.eval_points} "
                     "must both be at least 1.")
  eval_steps = evaluation_steps(steps, request.eval_points)
  base.update(total_steps=steps, checkpoint_every=eval_steps[0],
              keep_checkpoints=len(eval_steps) + 1, sample_every=0)
  # Reruns compare the fields in this order, so a changed budget is named
  # before the overrides that it changes.
  plan = {
      "study": request.study,
      "steps": steps,
      "budget": budget,
      "seed": config.seed,
      "eval_steps": eval_steps,
      "evaluation": dataclasses.asdict(request.evaluation),
      "config_file": request.config_file,
      "base_overrides": base,
      "arms": {arm.name: dict(arm.overrides) for arm in arms},
  }
  # The JSON round trip turns tuples into lists, as in the stored plan.
  return json.loads(json.dumps(plan))


def _merge_plans(previous: dict[str, Any] | None, plan: dict[str, Any],
                 out: pathlib.Path) -> dict[str, Any]:
  """Check a rerun against the stored plan; add arms not run before."""
  if previous is None:
    return plan
  for key, value in plan.items():
    if key != "arms" and previous.get(key) != value:
      raise ValueError(
          f"{out} holds a study planned with {key}={previous.get(key)!r}, "
          f"but this run asks for {value!r}. Rerun with the original flags, "
          "or pass a new --out.")
  arms = dict(previous["arms"])
  for name, overrides in plan["arms"].items():
    if name in arms and arms[name] != overrides:
      raise ValueError(f"{out} ran arm {name} with {arms[name]}, but this run "
                       f"asks for {overrides}. Pass a new --out.")
    arms[name] = overrides
  return dict(plan, arms=arms)


def arm_command(plan: dict[str, Any], name: str,
                out: pathlib.Path) -> list[str]:
  overrides = dict(plan["base_overrides"], **plan["arms"][name])
  return train_command(plan["config_file"], overrides,
                       out / ARMS_DIR / name / "workdir")


def _run_arm(plan: dict[str, Any], name: str, out: pathlib.Path,
             settings: evaluation.EvalSettings,
             judges: Callable[[], evaluation.Judges]) -> str:
  """Train and evaluate one arm as far as needed.

  Returns:
    "skipped" (already finished), "trained", "resumed" (training continued
    from a checkpoint) or "evaluated" (training was complete, some
    checkpoints were not evaluated).
  """
  arm_dir = out / ARMS_DIR / name
  workdir = arm_dir / "workdir"
  evaluation_file = arm_dir / EVALUATION_FILE
  evaluated = _read_json(evaluation_file) if evaluation_file.exists() else {}
  missing = [s for s in plan["eval_steps"] if str(s) not in evaluated]
  if not missing:
    logging.info("Arm %s is finished; skipping it.", name)
    return "skipped"

  status = "evaluated"
  done = checkpoint_steps(workdir)
  latest = done[-1] if done else 0
  if latest < plan["steps"]:
    status = "resumed" if latest else "trained"
    _run_training(arm_command(plan, name, out), arm_dir, f"arm {name}")
    done = checkpoint_steps(workdir)

  for step in missing:
    if step not in done:
      raise FileNotFoundError(
          f"Arm {name} has no checkpoint of step {step} in {workdir} to "
          f"evaluate (checkpoints: {done}). Delete {arm_dir} to train the "
          "arm again.")
    logging.info("Evaluating arm %s at step %d.", name, step)
    figures = evaluation.evaluate_checkpoint(workdir, step, judges(), settings)
    evaluated[str(step)] = figures
    _write_json(evaluation_file, evaluated)
  return status


def _machine() -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  return {
      "platform": platform.platform(),
      "python": platform.python_version(),
      "cpu_count": os.cpu_count(),
      "jax": jax.__version__,
      "devices": [d.device_kind for d in jax.devices()],
  }


def _results(plan: dict[str, Any], out: pathlib.Path) -> dict[str, Any]:
  """Collect every arm's stored figures, in study order."""
  order = [arm.name for arm in studies.study_arms(plan["study"])]
  arms = {}
  for name in sorted(plan["arms"], key=order.index):
    evaluation_file = out / ARMS_DIR / name / EVALUATION_FILE
    evaluated = _read_json(evaluation_file) if evaluation_file.exists() else {}
    arms[name] = {
        "overrides": plan["arms"][name],
        "command": shlex.join(arm_command(plan, name, out)),
        "checkpoints": sorted(evaluated.values(), key=lambda c: c["step"]),
    }
  return {
      "study": plan["study"],
      "steps": plan["steps"],
      "seed": plan["seed"],
      "eval_steps": plan["eval_steps"],
      "budget": plan["budget"],
      "evaluation": plan["evaluation"],
      "base_overrides": plan["base_overrides"],
      "machine": _machine(),
      "arms": arms,
  }


def _write_commands(plan: dict[str, Any], request: StudyRequest) -> None:
  out = request.out
  lines = ["# This study (a rerun of it resumes):",
           shlex.join(harness_command(request)), ""]
  if plan["budget"]:
    lines += ["# Budget probe that timed a step:",
              plan["budget"]["probe_command"], ""]
  lines.append("# Training command of each arm:")
  lines += [shlex.join(arm_command(plan, name, out)) for name in plan["arms"]]
  (out / COMMANDS_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")


def run_study(
    request: StudyRequest,
    classifier: reference_classifier.ReferenceClassifier | None = None,
    data_dir: str | os.PathLike[str] | None = None) -> dict[str, str]:
  """Run a study as far as needed and write its report.

  Args:
    request: the study and its settings.
    classifier: judge of generated images; default the cached reference
      classifier.
    data_dir: folder of the prepared Fashion-MNIST data of the judges.

  Returns:
    Each requested arm's status (see `_run_arm`).
  """
  request = dataclasses.replace(
      request, out=request.out.absolute(),
      config_file=str(pathlib.Path(request.config_file).absolute()))
  _check_overrides(request)
  config = load_config(request.config_file, request.overrides)
  if config.task != "xfusion":
    raise ValueError(f"{request.config_file} trains task {config.task!r}; "
                     "the ablation studies need an xfusion config.")
  arms = studies.study_arms(request.study, request.align_weight,
                            request.arms)
  request.out.mkdir(parents=True, exist_ok=True)
  plan_file = request.out / PLAN_FILE
  previous = _read_json(plan_file) if plan_file.exists() else None
  plan = _merge_plans(previous, _plan(request, config, arms, previous),
                      request.out)
  _write_json(plan_file, plan)
  _write_commands(plan, request)
  logging.info("Study %s: %d steps per arm, evaluated at steps %s.",
               request.study, plan["steps"], plan["eval_steps"])

  loaded: list[evaluation.Judges] = []

  def judges() -> evaluation.Judges:
    # Built on first use, so that a rerun with nothing to evaluate skips it.
    if not loaded:
      loaded.append(evaluation.Judges.load(request.evaluation, classifier,
                                           data_dir))
    return loaded[0]

  statuses = {}
  for arm in arms:
    statuses[arm.name] = _run_arm(plan, arm.name, request.out,
                                  request.evaluation, judges)
  report.write_report(request.out, _results(plan, request.out))
  logging.info("Study %s: arms %s; report in %s.", request.study, statuses,
               request.out / report.RESULTS_MARKDOWN)
  return statuses


def _define_flags() -> None:
  # Imported here: config_flags is only needed by the command line.
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file(
      "config", None,
      "Base training config of every arm, e.g. configs/cpu_demo.py. Override "
      "fields with --config.FIELD=VALUE.", lock_config=True)

  flags.DEFINE_enum("study", None, studies.STUDIES, "Study to run.")
  flags.DEFINE_string("out", None, "Output folder; a rerun resumes in it.")

  flags.DEFINE_integer("steps", None,
                       "Training steps of every arm. Default: the config's "
                       "total_steps, unless --budget_minutes is given.")
  flags.DEFINE_float("budget_minutes", None,
                     "Training minutes per arm, converted once into a step "
                     "count by timing the first arm's steps.")
  flags.DEFINE_list("arms", [], "Arms to run; default every arm of the study.")
  flags.DEFINE_integer("eval_points", 4,
                       "Checkpoints evaluated per arm, the last included.")
  flags.DEFINE_float("align_weight", studies.DEFAULT_ALIGN_WEIGHT,
                     "lambda_align of the alignment study's align_on arm.")
  flags.DEFINE_integer("probe_steps", 10,
                       "Steps of the run that times a step for "
                       "--budget_minutes.")

  defaults = evaluation.EvalSettings()
  flags.DEFINE_integer("images_per_class", defaults.images_per_class,
                       "Images drawn per class prompt at each checkpoint.")
  flags.DEFINE_integer("caption_examples", defaults.caption_examples,
                       "Held-out test images captioned at each checkpoint.")
  flags.DEFINE_float("cfg_scale", None,
                     "Guidance scale; default the config's sample_cfg_scale.")
  flags.DEFINE_integer("sampler_steps", None,
                       "Euler steps of the image sampler; default the "
                       "config's sample_steps.")
  flags.DEFINE_integer("eval_seed", defaults.seed, "Sampling seed.")
  flags.DEFINE_integer("real_images", defaults.real_images,
                       "Real test images of the Fréchet distance.")
  flags.DEFINE_integer("perplexity_windows", defaults.perplexity_windows,
                       "Windows of held-out text scored for perplexity.")
  flags.DEFINE_integer("perplexity_window_tokens",
                       defaults.perplexity_window_tokens,
                       "Tokens per perplexity window.")

  flags.mark_flags_as_required(["config", "study", "out"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  values = flags.FLAGS
  request = StudyRequest(
      study=values.study, out=pathlib.Path(values.out),
      config_file=config_flags.get_config_filename(values["config"]),
      overrides=config_flags.get_override_values(values["config"]),
      steps=values.steps, budget_minutes=values.budget_minutes,
      arms=tuple(values.arms), eval_points=values.eval_points,
      align_weight=values.align_weight, probe_steps=values.probe_steps,
      evaluation=evaluation.EvalSettings(
          images_per_class=values.images_per_class,
          caption_examples=values.caption_examples,
          cfg_scale=values.cfg_scale, sampler_steps=values.sampler_steps,
          seed=values.eval_seed, real_images=values.real_images,
          perplexity_windows=values.perplexity_windows,
          perplexity_window_tokens=values.perplexity_window_tokens))
  try:
    statuses = run_study(request)
  except (ValueError, FileNotFoundError, RuntimeError) as e:
    sys.exit(f"error: {e}")
  print(json.dumps(statuses, indent=2))


if __name__ == "__main__":
  hostenv.restart_with_hugepage_malloc()
  _define_flags()
  app.run(main)
