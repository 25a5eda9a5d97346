#!/usr/bin/env bash
# Render, submit, follow and delete a JobSet that runs xfusion_jax.train on
# every host of one multi-host TPU slice in a GKE cluster. Run with --help for
# the options.
set -euo pipefail

launch_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/common.sh
source "$launch_dir/common.sh"

# Port of the jax.distributed coordinator. 8482 is the default that jax 0.10.2
# uses on Cloud TPU (jax/_src/clusters/cloud_tpu_cluster.py).
readonly coordinator_port=8482

usage() {
  cat <<'EOF'
usage: launch/gke.sh COMMAND [OPTIONS] [-- TRAIN_ARGS...]

Commands:
  render   print the JobSet manifest
  apply    submit the manifest with kubectl apply
  logs     stream the output of every pod, each line prefixed by its pod
  status   list the JobSet's pods
  delete   delete the JobSet, which stops its pods

Options (an environment variable, where named, sets the default):
  --name NAME               JobSet name, a DNS label; default xfusion-train
                            [XFUSION_JOBSET_NAME]
  --namespace NAMESPACE     Kubernetes namespace; kubectl's current one when
                            unset [XFUSION_NAMESPACE]
  --accelerator-type TYPE   slice type: v4-8 ... v4-256 or v5litepod-4 ...
                            v5litepod-256; sets the node selectors, the TPU
                            chips per pod and the pod count; default v4-32
                            [XFUSION_ACCELERATOR_TYPE]
  --image IMAGE             container image with Python 3.11 and git;
                            default python:3.11-bookworm [XFUSION_IMAGE]
  --repo-url URL            git URL that each pod clones; required by
                            render and apply [XFUSION_REPO_URL]
  --ref REF                 git commit, branch or tag to check out; default
                            HEAD [XFUSION_REPO_REF]
  --config PATH             training config, relative to the repository;
                            default configs/tpu_v4.py [XFUSION_CONFIG]
  --workdir URI             checkpoint and metrics directory, e.g.
                            gs://BUCKET/run1; required by render and apply
                            [XFUSION_WORKDIR]
  --dry-run                 print every kubectl command (and the manifest)
                            instead of running it; needs neither kubectl nor
                            network access
  -h, --help                print this help

Arguments after "--" are appended to the train command unchanged.
EOF
}

# Print "gke_accelerator topology hosts chips_per_host" for a slice type.
# v4 hosts have 4 chips (8 TensorCores), v5e multi-host slices use 4-chip
# hosts (ct5lp-hightpu-4t), and v5litepod-8 is one 8-chip host.
# NOTE: the topologies follow Google's published slice shapes but have not
# been scheduled on a real cluster from this repository.
slice_shape() {
  case "$1" in
    v4-8) echo "tpu-v4-podslice 2x2x1 1 4" ;;
    v4-16) echo "tpu-v4-podslice 2x2x2 2 4" ;;
    v4-32) echo "tpu-v4-podslice 2x2x4 4 4" ;;
    v4-64) echo "tpu-v4-podslice 2x4x4 8 4" ;;
    v4-128) echo "tpu-v4-podslice 4x4x4 16 4" ;;
    v4-256) echo "tpu-v4-podslice 4x4x8 32 4" ;;
    v5litepod-4) echo "tpu-v5-lite-podslice 2x2 1 4" ;;
    v5litepod-8) echo "tpu-v5-lite-podslice 2x4 1 8" ;;
    v5litepod-16) echo "tpu-v5-lite-podslice 4x4 4 4" ;;
    v5litepod-32) echo "tpu-v5-lite-podslice 4x8 8 4" ;;
    v5litepod-64) echo "tpu-v5-lite-podslice 8x8 16 4" ;;
    v5litepod-128) echo "tpu-v5-lite-podslice 8x16 32 4" ;;
    v5litepod-256) echo "tpu-v5-lite-podslice 16x16 64 4" ;;
    *) die "unsupported --accelerator-type '$1'; expected v4-8 ... v4-256 or v5litepod-4 ... v5litepod-256" ;;
  esac
}

# Print VALUE as a YAML double-quoted scalar.
yaml_quote() {
  local value="$1"
  if [[ $value == *[[:cntrl:]]* ]]; then
    die "invalid value '$value': control characters cannot be passed to the manifest"
  fi
  value="${value//\\/\\\\}"
  value="${value//\"/\\\"}"
  printf '"%s"' "$value"
}

render_manifest() {
  require_option "$repo_url" --repo-url XFUSION_REPO_URL
  require_option "$workdir" --workdir XFUSION_WORKDIR
  local shape gke_accelerator topology hosts chips_per_host
  shape="$(slice_shape "$accelerator_type")"
  read -r gke_accelerator topology hosts chips_per_host <<<"$shape"

  # Quote the values here: a failure inside the here-document below would
  # not stop the script.
  local image_q repo_url_q ref_q config_q workdir_q
  image_q="$(yaml_quote "$image")"
  repo_url_q="$(yaml_quote "$repo_url")"
  ref_q="$(yaml_quote "$ref")"
  config_q="$(yaml_quote "$config")"
  workdir_q="$(yaml_quote "$workdir")"

  local extra_args="" arg
  for arg in "${train_args[@]}"; do
    if [[ $arg == *[[:cntrl:]]* ]]; then
      die "invalid train argument '$arg': control characters cannot be passed to the manifest"
    fi
    extra_args+=" $(quote_word "$arg")"
  done

  # Pod hostnames are NAME-slice-JOB_INDEX-POD_INDEX.NAME because JobSet
  # creates a headless service named after the JobSet; pod 0 is the
  # jax.distributed coordinator. JAX reads each pod's process index from the
  # TPU_WORKER_ID variable.
  # NOTE: jax 0.10.2's GKE cluster detection relies on GKE setting
  # TPU_WORKER_ID on TPU pods. No test here runs on GKE to confirm it.
  cat <<EOF
# JobSet that runs python -m xfusion_jax.train on every host of one
# $accelerator_type TPU slice ($hosts pods, $chips_per_host chips each).
# Generated by launch/gke.sh render. Edit the env values, or render again
# with other options. The cluster needs the JobSet controller and a TPU node
# pool with this accelerator and topology.
apiVersion: jobset.x-k8s.io/v1alpha2
kind: JobSet
metadata:
  name: $name
  annotations:
    # Place the whole slice on one node pool.
    alpha.jobset.sigs.k8s.io/exclusive-topology: cloud.google.com/gke-nodepool
spec:
  failurePolicy:
    maxRestarts: 0
  replicatedJobs:
  - name: slice
    replicas: 1
    template:
      spec:
        parallelism: $hosts
        completions: $hosts
        backoffLimit: 0
        template:
          spec:
            restartPolicy: Never
            nodeSelector:
              cloud.google.com/gke-tpu-accelerator: $gke_accelerator
              cloud.google.com/gke-tpu-topology: $topology
            containers:
            - name: train
              image: $image_q
              env:
              - name: XFUSION_REPO_URL
                value: $repo_url_q
              - name: XFUSION_REPO_REF
                value: $ref_q
              - name: XFUSION_CONFIG
                value: $config_q
              - name: XFUSION_WORKDIR
                value: $workdir_q
              - name: JAX_COORDINATOR_ADDRESS
                value: "$name-slice-0-0.$name:$coordinator_port"
              command:
              - bash
              - -c
              - |
                set -euo pipefail
                git clone --quiet "\$XFUSION_REPO_URL" /opt/xfusion_jax
                cd /opt/xfusion_jax
                git checkout --quiet "\$XFUSION_REPO_REF"
                python -m pip install --quiet -c requirements/lock.txt -e '.[tpu]'
                exec python -m xfusion_jax.train --config="\$XFUSION_CONFIG" --workdir="\$XFUSION_WORKDIR"$extra_args
              resources:
                limits:
                  google.com/tpu: $chips_per_host
EOF
}

cmd_render() {
  render_manifest
}

cmd_apply() {
  local manifest
  manifest="$(render_manifest)"
  if ((dry_run)); then
    printf '%s <<'"'"'EOF'"'"'\n%s\nEOF\n' "$(format_command kubectl "${namespace_args[@]}" apply -f -)" "$manifest"
    return
  fi
  run_command kubectl "${namespace_args[@]}" apply -f - <<<"$manifest"
}

cmd_logs() {
  local shape hosts
  shape="$(slice_shape "$accelerator_type")"
  read -r _ _ hosts _ <<<"$shape"
  run_command kubectl "${namespace_args[@]}" logs --follow --prefix \
    "--max-log-requests=$hosts" "--selector=jobset.sigs.k8s.io/jobset-name=$name"
}

cmd_status() {
  run_command kubectl "${namespace_args[@]}" get pods --output=wide \
    "--selector=jobset.sigs.k8s.io/jobset-name=$name"
}

cmd_delete() {
  run_command kubectl "${namespace_args[@]}" delete jobset "$name"
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
  name="${XFUSION_JOBSET_NAME:-xfusion-train}"
  namespace="${XFUSION_NAMESPACE:-}"
  accelerator_type="${XFUSION_ACCELERATOR_TYPE:-v4-32}"
  image="${XFUSION_IMAGE:-python:3.11-bookworm}"
  repo_url="${XFUSION_REPO_URL:-}"
  ref="${XFUSION_REPO_REF:-HEAD}"
  config="${XFUSION_CONFIG:-configs/tpu_v4.py}"
  workdir="${XFUSION_WORKDIR:-}"
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
    render | apply | logs | status | delete) ;;
    *) die "unknown command '$command'; expected one of render, apply, logs, status, delete" ;;
  esac

  local shift_count
  while (($# > 0)); do
    shift_count=1
    case "$1" in
      --name | --name=*) take_value name "$@" ;;
      --namespace | --namespace=*) take_value namespace "$@" ;;
      --accelerator-type | --accelerator-type=*) take_value accelerator_type "$@" ;;
      --image | --image=*) take_value image "$@" ;;
      --repo-url | --repo-url=*) take_value repo_url "$@" ;;
      --ref | --ref=*) take_value ref "$@" ;;
      --config | --config=*) take_value config "$@" ;;
      --workdir | --workdir=*) take_value workdir "$@" ;;
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

  if ! [[ $name =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]]; then
    die "invalid --name '$name'; expected a DNS label: lowercase letters, digits and '-'"
  fi
  if ((${#train_args[@]} > 0)) && [[ $command != render && $command != apply ]]; then
    die "arguments after '--' are only accepted by the render and apply commands"
  fi
  if [[ $command != render ]]; then
    require_kubectl
  fi

  namespace_args=()
  if [[ -n $namespace ]]; then
    namespace_args=("--namespace=$namespace")
  fi
  "cmd_$command"
}

main "$@"
