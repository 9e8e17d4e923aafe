#!/usr/bin/env bash
# Shared by the tpu/*.sh scripts (sourced, not run): settings, option parsing, dry-run.
#
# Settings come from environment variables, optionally from an env file (see tpu/env.example):
# --env-file FILE, or TPU_ENV_FILE=FILE, or tpu/env when it exists. Variables already exported
# in the environment win over the file, so `ZONE=... tpu/create.sh` overrides one value.
#
# With --dry-run every gcloud command is printed (one line, shell-quoted, ready to paste)
# instead of run; the tests check those lines.
# shellcheck disable=SC2034  # variables here are used by the scripts that source this file

set -euo pipefail

TPU_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$TPU_DIR/.." && pwd)"
SCRIPT_NAME="tpu/$(basename "$0")"

# Every setting a script may read, with its default ("" = required where used).
SETTINGS=(PROJECT ZONE ACCELERATOR_TYPE RUNTIME_VERSION TPU_NAME PROVISIONING QUEUED_RESOURCE_ID
          REMOTE_DIR REMOTE_VENV LOG_DIR RUN_NAME JAX_PIP_SPEC EXTRA_PIP)
declare -A DEFAULTS=(
  [PROVISIONING]=on-demand   # on-demand | spot | queued | queued-spot
  [REMOTE_DIR]=jaxselm       # the code on each worker (relative to the home directory)
  [REMOTE_VENV]=jaxselm-venv # its virtual environment
  [LOG_DIR]=jaxselm-logs     # per-worker logs and pid files
  [RUN_NAME]=run             # names the log files of one launch
  [JAX_PIP_SPEC]='jax[tpu]'  # what setup.sh installs for JAX
)

DRY_RUN=0
ENV_FILE="${TPU_ENV_FILE:-}"
ARGS=()

die() {  # one line on stderr, exit 2
  echo "$SCRIPT_NAME: error: $*" >&2
  exit 2
}

# The options every usage text ends with (sync.sh says "commands" instead of "gcloud command").
COMMON_OPTIONS="  --dry-run        print the gcloud command instead of running it
  --env-file FILE  read settings from FILE (default: tpu/env if present; see tpu/env.example)"

# parse_common for the scripts that take no argument of their own and act on TPU_NAME.
parse_no_args() {
  parse_common "$@"
  ((${#ARGS[@]} == 0)) || die "unexpected argument '${ARGS[0]}' (see --help)"
  require PROJECT ZONE TPU_NAME
}

# Parse the options every script shares; the rest stays in ARGS for the script.
parse_common() {
  while (($#)); do
    case "$1" in
      --dry-run) DRY_RUN=1 ;;
      --env-file) (($# >= 2)) || die "--env-file needs a file"; ENV_FILE="$2"; shift ;;
      --env-file=*) ENV_FILE="${1#--env-file=}" ;;
      -h|--help) usage; exit 0 ;;
      *) ARGS+=("$1") ;;
    esac
    shift
  done
  load_settings
}

load_settings() {
  local name
  if [[ -z "$ENV_FILE" && -f "$TPU_DIR/env" ]]; then
    ENV_FILE="$TPU_DIR/env"
  fi
  if [[ -n "$ENV_FILE" ]]; then
    [[ -f "$ENV_FILE" ]] || die "env file not found: $ENV_FILE"
    local -A from_env=()
    for name in "${SETTINGS[@]}"; do
      if [[ -n "${!name+x}" ]]; then from_env[$name]="${!name}"; fi
    done
    # shellcheck source=/dev/null
    source "$ENV_FILE"
    for name in "${!from_env[@]}"; do printf -v "$name" '%s' "${from_env[$name]}"; done
  fi
  for name in "${SETTINGS[@]}"; do
    if [[ -z "${!name:-}" && -n "${DEFAULTS[$name]:-}" ]]; then
      printf -v "$name" '%s' "${DEFAULTS[$name]}"
    fi
  done
  case "$PROVISIONING" in
    on-demand|spot|queued|queued-spot) ;;
    *) die "PROVISIONING: expected on-demand, spot, queued or queued-spot, got '$PROVISIONING'" ;;
  esac
  QUEUED_RESOURCE_ID="${QUEUED_RESOURCE_ID:-${TPU_NAME:-}}"
}

require() {  # require NAME...: each setting must be non-empty
  local name
  for name in "$@"; do
    [[ -n "${!name:-}" ]] || die "$name is not set (export $name=... or put it in the env file, see tpu/env.example)"
  done
}

quote() {  # shell-quote each argument (like Python's shlex.quote), joined by spaces
  local out=() arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      out+=("$arg")
    else
      out+=("'${arg//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}

run() {  # print (dry run) or execute one command
  if ((DRY_RUN)); then
    quote "$@"
  else
    echo "+ $(quote "$@")" >&2
    "$@"
  fi
}

# gcloud compute tpus tpu-vm ssh on WORKER (a number or "all") running COMMAND.
tpu_ssh() {
  local worker="$1" command="$2"
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "--project=$PROJECT" "--zone=$ZONE" \
    "--worker=$worker" "--command=$command"
}
