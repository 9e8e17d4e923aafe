#!/usr/bin/env bash
# Show the log of a launch: follow one worker's, or the last lines of every worker's.
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
usage: $SCRIPT_NAME [--dry-run] [--env-file FILE] [--name RUN_NAME] [--worker N|all] [--lines N]

Without --worker: follows (tail -f) worker 0's log, where process 0 prints the run's progress
and tables. --worker N follows worker N; --worker all prints the last lines of every worker's log
once (each prefixed by gcloud with its worker), e.g. to find the one that failed.

  --name NAME      the launch's name (default RUN_NAME, or "run")
  --worker N|all   which worker (default 0)
  --lines N        how many lines to show first (default 100)
$COMMON_OPTIONS
USAGE
}

parse_common "$@"
set -- "${ARGS[@]+"${ARGS[@]}"}"
worker=0
lines=100
while (($#)); do
  case "$1" in
    --name) (($# >= 2)) || die "--name needs a value"; RUN_NAME="$2"; shift ;;
    --name=*) RUN_NAME="${1#--name=}" ;;
    --worker) (($# >= 2)) || die "--worker needs a value"; worker="$2"; shift ;;
    --worker=*) worker="${1#--worker=}" ;;
    --lines) (($# >= 2)) || die "--lines needs a value"; lines="$2"; shift ;;
    --lines=*) lines="${1#--lines=}" ;;
    *) die "unexpected argument '$1' (see --help)" ;;
  esac
  shift
done
require PROJECT ZONE TPU_NAME
[[ "$worker" == all || "$worker" =~ ^[0-9]+$ ]] || die "--worker: expected a number or 'all', got '$worker'"
[[ "$lines" =~ ^[0-9]+$ ]] || die "--lines: expected a number, got '$lines'"
[[ "$RUN_NAME" =~ ^[A-Za-z0-9_.-]+$ ]] || die "--name: use letters, digits, '.', '_' or '-' (got '$RUN_NAME')"

log="$(quote "$LOG_DIR")/$RUN_NAME.\$(hostname).log"
if [[ "$worker" == all ]]; then
  tpu_ssh all "tail -n $lines $log"
else
  tpu_ssh "$worker" "tail -n $lines -F $log"
fi
