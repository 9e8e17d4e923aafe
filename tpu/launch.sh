#!/usr/bin/env bash
# Start one jaxselm command on every worker at once (--worker=all), in the background, each with
# its own log file. Every host of a pod slice must run the same program: a command started on
# one worker only waits for its peers (and fails after JAXSELM_INIT_TIMEOUT).
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
usage: $SCRIPT_NAME [--dry-run] [--env-file FILE] [--name RUN_NAME] [--env KEY=VALUE]... -- JAXSELM_ARGS...

Runs "jaxselm --distributed JAXSELM_ARGS..." in REMOTE_DIR on every worker of TPU_NAME under
nohup; worker logs go to LOG_DIR/RUN_NAME.<hostname>.log and the pid to LOG_DIR/RUN_NAME.pid
(REMOTE_DIR, REMOTE_VENV and LOG_DIR are relative to the home directory, or absolute).
Refuses to start when RUN_NAME is still running on a worker. Example:

  $SCRIPT_NAME --name zephyr -- online --config configs/zephyr-7b.yaml run.output_dir=/mnt/runs/zephyr

  --name NAME      names the logs of this launch (default RUN_NAME, or "run")
  --env KEY=VALUE  an environment variable for the command (repeatable), e.g. HF_HOME=/mnt/hf
$COMMON_OPTIONS
USAGE
}

parse_common "$@"
set -- "${ARGS[@]+"${ARGS[@]}"}"
extra_env=()
while (($#)); do
  case "$1" in
    --name) (($# >= 2)) || die "--name needs a value"; RUN_NAME="$2"; shift ;;
    --name=*) RUN_NAME="${1#--name=}" ;;
    --env) (($# >= 2)) || die "--env needs KEY=VALUE"; extra_env+=("$2"); shift ;;
    --env=*) extra_env+=("${1#--env=}") ;;
    --) shift; break ;;
    *) break ;;
  esac
  shift
done
(($#)) || die "no jaxselm command given (e.g. -- online --config configs/zephyr-7b.yaml)"
require PROJECT ZONE TPU_NAME
[[ "$RUN_NAME" =~ ^[A-Za-z0-9_.-]+$ ]] || die "--name: use letters, digits, '.', '_' or '-' (got '$RUN_NAME')"
for kv in "${extra_env[@]+"${extra_env[@]}"}"; do
  [[ "$kv" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env: expected KEY=VALUE, got '$kv'"
done

logs="$(quote "$LOG_DIR")"
remote="set -e; mkdir -p $logs; logs=\$(cd $logs && pwd); venv=\$(cd $(quote "$REMOTE_VENV") && pwd)"
remote+="; if [ -f \"\$logs/$RUN_NAME.pid\" ] && kill -0 \"\$(cat \"\$logs/$RUN_NAME.pid\")\" 2>/dev/null;"
remote+=" then echo \"$RUN_NAME is already running on \$(hostname)\" >&2; exit 1; fi"
remote+="; cd $(quote "$REMOTE_DIR")"
remote+="; nohup env $(quote "${extra_env[@]+"${extra_env[@]}"}" PYTHONUNBUFFERED=1)"
remote+=" \"\$venv/bin/jaxselm\" --distributed $(quote "$@")"
remote+=" > \"\$logs/$RUN_NAME.\$(hostname).log\" 2>&1 < /dev/null &"
remote+=" echo \$! > \"\$logs/$RUN_NAME.pid\""
remote+="; echo \"\$(hostname): started $RUN_NAME (pid \$!), log \$logs/$RUN_NAME.\$(hostname).log\""
tpu_ssh all "$remote"
