#!/usr/bin/env bash
# Create a Cloud TPU VM slice, install xfusion_jax on every worker, run the
# training job on all workers, stream its output, stop it and delete the
# slice. Run with --help for the options.
set -euo pipefail

launch_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/common.sh
source "$launch_dir/common.sh"

# Extended regular expression for the full command line of the training
# process (pgrep -x -f). Anchoring to the whole line keeps it from matching the
# ssh shell, whose command line contains the train command as a substring.
readonly train_process_pattern='[^ ]*python[0-9.]* -m xfusion_jax[.]train( .*)?'

usage() {
  cat <<'EOF'
usage: launch/tpu_vm.sh COMMAND [OPTIONS] [-- TRAIN_ARGS...]

Commands:
  create     create the TPU VM slice (or a queued resource with --queued)
  install    copy or clone the repository onto every worker, replacing
             --remote-dir, and install it with pip install -e '.[tpu]' in a
             virtual environment
  train      start python -m xfusion_jax.train on every worker in the
             background, with its output written to the log file
  logs       stream the training log of one worker or of all workers
  stop       send SIGTERM to the training process on every worker
  delete     delete the slice (and the queued resource with --queued)
  describe   print the state of the slice or of the queued resource

Options (an environment variable, where named, sets the default):
  --project PROJECT         Google Cloud project; gcloud's configured
                            project when unset [XFUSION_PROJECT]
  --zone ZONE               zone of the slice, e.g. us-central2-b; required
                            [XFUSION_ZONE]
  --name NAME               TPU VM (node) name; with --queued also the
                            queued resource ID; required [XFUSION_TPU_NAME]
  --accelerator-type TYPE   slice type, e.g. v4-32 or v5litepod-16; required
                            by create [XFUSION_ACCELERATOR_TYPE]
  --runtime-version VERSION TPU software version; defaults by accelerator
                            family: v4 tpu-ubuntu2204-base, v5litepod
                            v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e
                            v2-alpha-tpuv6e [XFUSION_RUNTIME_VERSION]
  --queued                  create and delete through a queued resource,
                            which waits for capacity instead of failing
  --spot                    create Spot TPU VMs, which can be preempted
  --repo-url URL            git URL that install clones on each worker; when
                            unset, install copies a git archive of the local
                            checkout instead [XFUSION_REPO_URL]
  --ref REF                 git commit, branch or tag to install; default
                            HEAD (uncommitted changes are never copied)
                            [XFUSION_REPO_REF]
  --remote-dir DIR          install directory on each worker, relative to
                            the home directory; default xfusion_jax
                            [XFUSION_REMOTE_DIR]
  --python PYTHON           Python 3.11+ interpreter on the workers; install
                            apt-installs it when missing; default python3.11
                            [XFUSION_PYTHON]
  --config PATH             training config, relative to the repository;
                            default configs/tpu_v4.py [XFUSION_CONFIG]
  --workdir URI             checkpoint and metrics directory, e.g.
                            gs://BUCKET/run1; required by train
                            [XFUSION_WORKDIR]
  --log-file PATH           training output file on each worker, relative
                            to the home directory; default
                            xfusion_jax-train.log [XFUSION_LOG_FILE]
  --worker WORKER           worker that logs reads: an index or "all";
                            default 0 (lines carry the worker's hostname)
  --lines N                 lines of existing output that logs prints before
                            following; default 100
  --ssh-arg ARG             extra argument for every gcloud ssh and scp
                            call, e.g. --ssh-arg=--tunnel-through-iap;
                            repeatable
  --dry-run                 print every command instead of running it; needs
                            neither gcloud nor network access
  -h, --help                print this help

Arguments after "--" are appended to the train command unchanged.

Example:
  launch/tpu_vm.sh create --zone=us-central2-b --name=xf --accelerator-type=v4-32
  launch/tpu_vm.sh install --zone=us-central2-b --name=xf
  launch/tpu_vm.sh train --zone=us-central2-b --name=xf --workdir=gs://BUCKET/run1
  launch/tpu_vm.sh logs --zone=us-central2-b --name=xf
EOF
}

# Map an accelerator type to the runtime version documented for its family.
# NOTE: Google publishes new runtime versions over time. Pass
# --runtime-version to use another one.
default_runtime_version() {
  case "$1" in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) die "no default runtime version for accelerator type '$1'; pass --runtime-version" ;;
  esac
}

# Arguments shared by every gcloud TPU command: the zone and the project.
location_args() {
  location=("--zone=$zone")
  if [[ -n $project ]]; then
    location+=("--project=$project")
  fi
}

# Run REMOTE_COMMAND through ssh on the given worker ("all" or an index).
ssh_workers() {
  local worker="$1" remote_command="$2"
  run_command gcloud compute tpus tpu-vm ssh "$name" "${location[@]}" \
    "--worker=$worker" "${ssh_args[@]}" "--command=$remote_command"
}

cmd_create() {
  require_option "$accelerator_type" --accelerator-type XFUSION_ACCELERATOR_TYPE
  if [[ -z $runtime_version ]]; then
    runtime_version="$(default_runtime_version "$accelerator_type")"
  fi
  local spot_args=()
  if ((spot)); then
    spot_args=(--spot)
  fi
  if ((queued)); then
    run_command gcloud compute tpus queued-resources create "$name" \
      "--node-id=$name" "${location[@]}" "--accelerator-type=$accelerator_type" \
      "--runtime-version=$runtime_version" "${spot_args[@]}"
    if ((!dry_run)); then
      echo "Queued resource $name requested; run 'describe --queued' until its state is ACTIVE before install." >&2
    fi
    return
  fi
  run_command gcloud compute tpus tpu-vm create "$name" "${location[@]}" \
    "--accelerator-type=$accelerator_type" "--version=$runtime_version" \
    "${spot_args[@]}"
}

# Print the worker-side commands that create the virtual environment and
# install the package in the current directory.
remote_install_steps() {
  local python_q dir_q
  python_q="$(quote_word "$python")"
  dir_q="$(quote_word "$remote_dir")"
  # Ubuntu 22.04 TPU VM images ship Python 3.10, but the package needs 3.11+.
  printf '%s' "if ! command -v $python_q >/dev/null 2>&1; then" \
    " sudo apt-get update -q && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q $python_q $python_q-venv;" \
    " fi && cd $dir_q && $python_q -m venv .venv" \
    " && .venv/bin/python -m pip install -q --upgrade pip" \
    " && .venv/bin/python -m pip install -q -c requirements/lock.txt -e '.[tpu]'"
}

cmd_install() {
  local dir_q url_q ref_q
  dir_q="$(quote_word "$remote_dir")"
  ref_q="$(quote_word "$ref")"
  if [[ -n $repo_url ]]; then
    url_q="$(quote_word "$repo_url")"
    ssh_workers all "set -eu; rm -rf $dir_q && git clone -q $url_q $dir_q && git -C $dir_q checkout -q $ref_q && $(remote_install_steps)"
    return
  fi

  # Copy mode: archive the committed tree at REF and copy it to every worker.
  require_tool git "Install git, or pass --repo-url so that the workers clone the repository."
  local repo_root archive remote_archive="xfusion_jax-source.tar.gz"
  repo_root="$(cd "$launch_dir/.." && pwd)"
  archive="${TMPDIR:-/tmp}/xfusion_jax-source.tar.gz"
  run_command git -C "$repo_root" archive --format=tar.gz "--output=$archive" "$ref"
  run_command gcloud compute tpus tpu-vm scp "$archive" "$name:$remote_archive" \
    "${location[@]}" --worker=all "${ssh_args[@]}"
  run_command rm -f "$archive"
  ssh_workers all "set -eu; rm -rf $dir_q && mkdir -p $dir_q && tar -xzf $remote_archive -C $dir_q && rm -f $remote_archive && $(remote_install_steps)"
}

# Print the training command as one line of worker shell input.
train_command_line() {
  format_command .venv/bin/python -m xfusion_jax.train "--config=$config" \
    "--workdir=$workdir" "${train_args[@]}"
}

cmd_train() {
  require_option "$workdir" --workdir XFUSION_WORKDIR
  local dir_q log_q train_line remote_command
  dir_q="$(quote_word "$remote_dir")"
  log_q="$(quote_word "$log_file")"
  train_line="$(train_command_line)"
  # The log redirection is opened before the subshell changes into the
  # install directory, so a relative log path is relative to the home
  # directory. setsid detaches the job from the ssh session.
  remote_command="running=\$(pgrep -x -f '$train_process_pattern' || true);"
  remote_command+=" if [ -n \"\$running\" ]; then echo \"xfusion_jax.train is already running on \$(hostname) (PID \$running); run stop first\" >&2; exit 1; fi;"
  remote_command+=" (cd $dir_q && exec setsid nohup $train_line) > $log_q 2>&1 < /dev/null &"
  remote_command+=" echo \"started xfusion_jax.train on \$(hostname), PID \$!, output in $log_q\""
  ssh_workers all "$remote_command"
}

cmd_logs() {
  local log_q
  log_q="$(quote_word "$log_file")"
  ssh_workers "$worker" "tail -n $lines -F $log_q | sed -u \"s/^/[\$(hostname)] /\""
}

cmd_stop() {
  ssh_workers all "if pkill -TERM -x -f '$train_process_pattern'; then echo \"sent SIGTERM to xfusion_jax.train on \$(hostname)\"; else echo \"no xfusion_jax.train process on \$(hostname)\"; fi"
}

cmd_delete() {
  if ((queued)); then
    # --force deletes the queued resource's TPU VMs first.
    run_command gcloud compute tpus queued-resources delete "$name" \
      "${location[@]}" --force --quiet
    return
  fi
  run_command gcloud compute tpus tpu-vm delete "$name" "${location[@]}" --quiet
}

cmd_describe() {
  if ((queued)); then
    run_command gcloud compute tpus queued-resources describe "$name" "${location[@]}"
    return
  fi
  run_command gcloud compute tpus tpu-vm describe "$name" "${location[@]}"
}

# Read "--flag=value" or "--flag value" into the variable named by $1.
# Sets "shift_count" to the number of words consumed.
take_value() {
  local variable="$1" word="$2"
  if [[ $word == *=* ]]; then
    printf -v "$variable" '%s' "${word#*=}"
    shift_count=1
    return
  fi
  if (($# < 3)); then
    die "option $word requires a value"
  fi
  printf -v "$variable" '%s' "$3"
  shift_count=2
}

main() {
  project="${XFUSION_PROJECT:-}"
  zone="${XFUSION_ZONE:-}"
  name="${XFUSION_TPU_NAME:-}"
  accelerator_type="${XFUSION_ACCELERATOR_TYPE:-}"
  runtime_version="${XFUSION_RUNTIME_VERSION:-}"
  repo_url="${XFUSION_REPO_URL:-}"
  ref="${XFUSION_REPO_REF:-HEAD}"
  remote_dir="${XFUSION_REMOTE_DIR:-xfusion_jax}"
  python="${XFUSION_PYTHON:-python3.11}"
  config="${XFUSION_CONFIG:-configs/tpu_v4.py}"
  workdir="${XFUSION_WORKDIR:-}"
  log_file="${XFUSION_LOG_FILE:-xfusion_jax-train.log}"
  worker=0
  lines=100
  queued=0
  spot=0
  ssh_args=()
  train_args=()

  if (($# == 0)); then
    usage >&2
    exit 2
  fi
  local command="$1"
  shift
  case "$command" in
    -h | --help)
      usage
      exit 0
      ;;
    create | install | train | logs | stop | delete | describe) ;;
    *) die "unknown command '$command'; expected one of create, install, train, logs, stop, delete, describe" ;;
  esac

  local shift_count
  while (($# > 0)); do
    shift_count=1
    case "$1" in
      --project | --project=*) take_value project "$@" ;;
      --zone | --zone=*) take_value zone "$@" ;;
      --name | --name=*) take_value name "$@" ;;
      --accelerator-type | --accelerator-type=*) take_value accelerator_type "$@" ;;
      --runtime-version | --runtime-version=*) take_value runtime_version "$@" ;;
      --repo-url | --repo-url=*) take_value repo_url "$@" ;;
      --ref | --ref=*) take_value ref "$@" ;;
      --remote-dir | --remote-dir=*) take_value remote_dir "$@" ;;
      --python | --python=*) take_value python "$@" ;;
      --config | --config=*) take_value config "$@" ;;
      --workdir | --workdir=*) take_value workdir "$@" ;;
      --log-file | --log-file=*) take_value log_file "$@" ;;
      --worker | --worker=*) take_value worker "$@" ;;
      --lines | --lines=*) take_value lines "$@" ;;
      --ssh-arg | --ssh-arg=*)
        local ssh_arg
        take_value ssh_arg "$@"
        ssh_args+=("$ssh_arg")
        ;;
      --queued) queued=1 ;;
      --spot) spot=1 ;;
      --dry-run) dry_run=1 ;;
      -h | --help)
        usage
        exit 0
        ;;
      --)
        shift
        train_args=("$@")
        break
        ;;
      *) die "unknown option '$1'; run with --help for usage" ;;
    esac
    shift "$shift_count"
  done

  require_option "$zone" --zone XFUSION_ZONE
  require_option "$name" --name XFUSION_TPU_NAME
  if ! [[ $worker == all || $worker =~ ^[0-9]+$ ]]; then
    die "invalid --worker '$worker'; expected a worker index or 'all'"
  fi
  if ! [[ $lines =~ ^[0-9]+$ ]]; then
    die "invalid --lines '$lines'; expected a non-negative integer"
  fi
  if ((${#train_args[@]} > 0)) && [[ $command != train ]]; then
    die "arguments after '--' are only accepted by the train command"
  fi
  require_gcloud

  local location=()
  location_args
  "cmd_$command"
}

main "$@"
