#!/usr/bin/env bash
# Set up a fresh Debian/Ubuntu machine (Python 3.11) and run one task.
#
#   bash scripts/dev.sh demo [ARGS...]   set up, then run the main job (ARGS go
#                                        to the train command)
#   bash scripts/dev.sh test [PYTEST_ARGS...]   set up, then run the test suite
#   bash scripts/dev.sh setup            set up only
#
# Set-up is idempotent: Debian packages, a virtual environment in .venv with
# the pinned Python packages, and the package itself in editable mode.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${XFUSION_VENV:-$repo/.venv}"
python="${PYTHON:-python3.11}"

# Real data comes from pinned Debian packages that xfusion_jax.assets fetches
# with `apt-get download`; that needs the package lists, which a fresh
# container may lack.
install_system_packages() {
  local sudo=()
  [[ $(id -u) -eq 0 ]] || sudo=(sudo)
  local needs_venv=0
  "$python" -m venv --help >/dev/null 2>&1 || needs_venv=1
  if ((needs_venv)) || ! apt-cache policy dataset-fashion-mnist 2>/dev/null | grep Candidate >/dev/null; then
    "${sudo[@]}" apt-get update -q
  fi
  if ((needs_venv)); then
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q python3-venv
  fi
}

install_python_packages() {
  local stamp="$venv/.xfusion_jax-installed"
  local inputs
  inputs="$(cat "$repo/setup.py" "$repo/requirements/lock.txt" "$repo/requirements/tpu-lock.txt" | sha256sum | cut -d' ' -f1)"
  if [[ -f $stamp && $(cat "$stamp") == "$inputs" ]]; then
    return
  fi
  [[ -x $venv/bin/python ]] || "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -c "$repo/requirements/lock.txt" -e "${repo}[test]"
  # libtpu (about 200 MB) lets tests/test_aot.py compile for TPU chips; it
  # loads on a CPU-only machine and runs nothing there.
  "$venv/bin/python" -m pip install -q -r "$repo/requirements/tpu-lock.txt"
  echo "$inputs" >"$stamp"
}

main() {
  local task="${1:-}"
  shift || true
  install_system_packages
  install_python_packages
  cd "$repo"
  case "$task" in
    setup) ;;
    demo)
      # The X-Fusion main job on the embedded default, then its acceptance
      # figures. A rerun resumes the training from its last checkpoint.
      local workdir="${XFUSION_DEMO_WORKDIR:-$repo/workdirs/cpu_demo}"
      "$venv/bin/python" -m xfusion_jax.train \
        --config="$repo/configs/cpu_demo.py" --workdir="$workdir" "$@"
      exec "$venv/bin/python" -m xfusion_jax.evaluate --workdir="$workdir"
      ;;
    test)
      # pytest exits 5 when it collects no test; that must fail the run.
      local status=0
      "$venv/bin/python" -m pytest "$@" || status=$?
      if ((status == 5)); then
        echo "pytest collected no tests" >&2
        exit 1
      fi
      exit "$status"
      ;;
    *)
      echo "usage: bash scripts/dev.sh {setup|demo|test} [ARGS...]" >&2
      exit 2
      ;;
  esac
}

main "$@"
