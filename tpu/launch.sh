#!/usr/bin/env bash
# Start one jaxselm command on every worker at once (--worker=all), in the background, each with
# its own log file. Every host of a pod slice must run the same program: a command started on
# one worker only waits for its peers (and fails after JAXSELM_INIT_TIMEOUT).
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
usage: $SCRIPT_NAME [--dry-run] [--env-file FILE] [--name RUN_NAME] [--env KEY=VALUE]... [--secret NAME]... -- JAXSELM_ARGS...

Runs "jaxselm --distributed JAXSELM_ARGS..." in REMOTE_DIR on every worker of TPU_NAME under
nohup; worker logs go to LOG_DIR/RUN_NAME.<hostname>.log and the pid to LOG_DIR/RUN_NAME.pid
(REMOTE_DIR, REMOTE_VENV and LOG_DIR are relative to the home directory, or absolute).
Refuses to start when RUN_NAME is still running on a worker. Example:

  $SCRIPT_NAME --name zephyr -- online --config configs/zephyr-7b.yaml run.output_dir=/mnt/runs/zephyr

  --name NAME      names the logs of this launch (default RUN_NAME, or "run")
  --env KEY=VALUE  an environment variable for the command (repeatable), e.g. HF_HOME=/mnt/hf;
                   not for secrets: the value is part of the remote command line
  --secret NAME    pass the local environment variable NAME (e.g. OPENAI_API_KEY) to the command
                   (repeatable); its value never goes on a command line or into a log: it is
                   copied to each worker in a 0600 file, which the command reads and deletes
$COMMON_OPTIONS
USAGE
}

parse_common "$@"
set -- "${ARGS[@]+"${ARGS[@]}"}"
extra_env=()
secrets=()
while (($#)); do
  case "$1" in
    --name) (($# >= 2)) || die "--name needs a value"; RUN_NAME="$2"; shift ;;
    --name=*) RUN_NAME="${1#--name=}" ;;
    --env) (($# >= 2)) || die "--env needs KEY=VALUE"; extra_env+=("$2"); shift ;;
    --env=*) extra_env+=("${1#--env=}") ;;
    --secret) (($# >= 2)) || die "--secret needs a variable name"; secrets+=("$2"); shift ;;
    --secret=*) secrets+=("${1#--secret=}") ;;
    --) shift; break ;;
    *) break ;;
  esac
  shift
done
(($#)) || die "no jaxselm command given (e.g. -- online --config configs/zephyr-7b.yaml)"
require PROJECT ZONE TPU_NAME
[[ "$RUN_NAME" =~ ^[A-Za-z0-9_.-]+$ ]] || die "--name: use letters, digits, '.', '_' or '-' (got '$RUN_NAME')"
for kv in "${extra_env[@]+"${extra_env[@]}"}"; do
  [[ "$kv" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env: expected KEY=VALUE, got '${kv%%=*}=...'"
  key="${kv%%=*}"
  # A secret's value on the remote command line would be in every worker's process table and in
  # the "+ gcloud ..." line this script prints: refuse names that look like one.
  if [[ "${key^^}" =~ (KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL) ]]; then
    die "--env $key: looks like a secret; use --secret $key (the value is read from your environment and never shown)"
  fi
done
for name in "${secrets[@]+"${secrets[@]}"}"; do
  [[ "$name" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "--secret: expected a variable name, got '$name'"
  [[ -n "${!name-}" ]] || die "--secret $name: not set in this environment"
done

logs="$(quote "$LOG_DIR")"
remote="set -e"
if ((${#secrets[@]})); then
  # The values go in a 0600 file copied to each worker's home (scp keeps the mode), which the
  # remote shell reads into its environment and deletes before anything else.
  secrets_name=".jaxselm-$RUN_NAME.secrets"
  if ((DRY_RUN)); then
    secrets_file="SECRETS_FILE"  # nothing is written in a dry run
  else
    secrets_file="$(umask 077 && mktemp)"
    trap 'rm -f "$secrets_file"' EXIT
    for name in "${secrets[@]}"; do
      printf '%s=%q\n' "$name" "${!name}" >> "$secrets_file"
    done
  fi
  run gcloud compute tpus tpu-vm scp "$secrets_file" "$TPU_NAME:$secrets_name" \
    "--project=$PROJECT" "--zone=$ZONE" --worker=all
  remote+="; set -a; . ./$secrets_name; set +a; rm -f ./$secrets_name"
fi
remote+="; mkdir -p $logs; logs=\$(cd $logs && pwd); venv=\$(cd $(quote "$REMOTE_VENV") && pwd)"
remote+="; if [ -f \"\$logs/$RUN_NAME.pid\" ] && kill -0 \"\$(cat \"\$logs/$RUN_NAME.pid\")\" 2>/dev/null;"
remote+=" then echo \"$RUN_NAME is already running on \$(hostname)\" >&2; exit 1; fi"
remote+="; cd $(quote "$REMOTE_DIR")"
remote+="; nohup env $(quote "${extra_env[@]+"${extra_env[@]}"}" PYTHONUNBUFFERED=1)"
remote+=" \"\$venv/bin/jaxselm\" --distributed $(quote "$@")"
remote+=" > \"\$logs/$RUN_NAME.\$(hostname).log\" 2>&1 < /dev/null &"
remote+=" echo \$! > \"\$logs/$RUN_NAME.pid\""
remote+="; echo \"\$(hostname): started $RUN_NAME (pid \$!), log \$logs/$RUN_NAME.\$(hostname).log\""
tpu_ssh all "$remote"
