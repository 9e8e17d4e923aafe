#!/usr/bin/env bash
# Stop a launch on every worker: SIGTERM first (the online loop checkpoints at the next step
# boundary and exits 0, like on a preemption), SIGKILL after a grace period.
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
usage: $SCRIPT_NAME [--dry-run] [--env-file FILE] [--name RUN_NAME] [--grace SECONDS] [--kill]

Sends SIGTERM to the launch's process on every worker, waits up to --grace seconds (default 600)
for it to save its checkpoint and exit, then sends SIGKILL if it is still there. --kill sends
SIGKILL at once (the run still resumes, from its last checkpoint). Restart with the same
tpu/launch.sh command: the loop resumes from run.output_dir.

  --name NAME      the launch's name (default RUN_NAME, or "run")
  --grace SECONDS  how long to wait after SIGTERM (default 600)
  --kill           SIGKILL without waiting
$COMMON_OPTIONS
USAGE
}

parse_common "$@"
set -- "${ARGS[@]+"${ARGS[@]}"}"
grace=600
signal=TERM
while (($#)); do
  case "$1" in
    --name) (($# >= 2)) || die "--name needs a value"; RUN_NAME="$2"; shift ;;
    --name=*) RUN_NAME="${1#--name=}" ;;
    --grace) (($# >= 2)) || die "--grace needs a value"; grace="$2"; shift ;;
    --grace=*) grace="${1#--grace=}" ;;
    --kill) signal=KILL ;;
    *) die "unexpected argument '$1' (see --help)" ;;
  esac
  shift
done
require PROJECT ZONE TPU_NAME
[[ "$grace" =~ ^[0-9]+$ ]] || die "--grace: expected a number of seconds, got '$grace'"
[[ "$RUN_NAME" =~ ^[A-Za-z0-9_.-]+$ ]] || die "--name: use letters, digits, '.', '_' or '-' (got '$RUN_NAME')"

pidfile="$(quote "$LOG_DIR")/$RUN_NAME.pid"
remote="if [ ! -f $pidfile ]; then echo \"\$(hostname): no $RUN_NAME running\"; exit 0; fi"
remote+="; pid=\$(cat $pidfile); kill -$signal \"\$pid\" 2>/dev/null || true"
remote+="; for _ in \$(seq $grace); do kill -0 \"\$pid\" 2>/dev/null || break; sleep 1; done"
remote+="; if kill -0 \"\$pid\" 2>/dev/null; then kill -KILL \"\$pid\"; echo \"\$(hostname): $RUN_NAME killed\";"
remote+=" else echo \"\$(hostname): $RUN_NAME stopped\"; fi; rm -f $pidfile"
tpu_ssh all "$remote"
