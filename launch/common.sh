# shellcheck shell=bash
# Helpers shared by the launch scripts: errors, option checks, quoting, and
# a dry-run aware command runner. Source this file; it defines functions only.

# Set by each script's option parser; run_command reads it.
dry_run=0

die() {
  echo "error: $*" >&2
  exit 1
}

# Exit with a usage error unless a required option has a value.
# Arguments: the value, the option name, and the environment variable that
# can provide it instead.
require_option() {
  local value="$1" option="$2" env_var="$3"
  if [[ -z $value ]]; then
    die "missing required option $option (or set $env_var); run with --help for usage"
  fi
}

# Exit with an install hint unless TOOL is on PATH. Dry runs skip the check,
# so that commands can be printed on a machine without the tool.
require_tool() {
  local tool="$1" hint="$2"
  if ((dry_run)); then
    return
  fi
  if ! command -v "$tool" >/dev/null 2>&1; then
    die "$tool not found on PATH. $hint"
  fi
}

require_gcloud() {
  require_tool gcloud "Install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install), then run 'gcloud auth login'."
}

require_kubectl() {
  require_tool kubectl "Install it with 'gcloud components install kubectl' or from https://kubernetes.io/docs/tasks/tools/, then run 'gcloud container clusters get-credentials CLUSTER'."
}

# Quote one word for a POSIX shell. Words made only of safe characters stay
# bare, "--flag=value" keeps the flag bare and quotes the value, and any other
# word is wrapped in single quotes. The output is valid input for bash and for
# Python's shlex.split.
quote_word() {
  local word="$1"
  local safe='^[A-Za-z0-9_@%+=:,./-]+$'
  if [[ -n $word && $word =~ $safe ]]; then
    printf '%s' "$word"
    return
  fi
  if [[ $word =~ ^(--[A-Za-z0-9-]+=)(.*)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    quote_word "${BASH_REMATCH[2]}"
    return
  fi
  local escaped="${word//\'/\'\\\'\'}"
  printf "'%s'" "$escaped"
}

# Print a command as one line of shell input.
format_command() {
  local words=() word
  for word in "$@"; do
    words+=("$(quote_word "$word")")
  done
  printf '%s\n' "${words[*]}"
}

# Print the command on stdout in a dry run. Otherwise echo it to stderr with
# a "+ " prefix and run it.
run_command() {
  if ((dry_run)); then
    format_command "$@"
    return
  fi
  echo "+ $(format_command "$@")" >&2
  "$@"
}
