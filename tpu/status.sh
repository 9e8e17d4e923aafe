#!/usr/bin/env bash
# Show the TPU VM's state (or its queued resource's), e.g. READY, PREEMPTED, WAITING_FOR_RESOURCES.
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
usage: $SCRIPT_NAME [--dry-run] [--env-file FILE]

Describes TPU_NAME, or the queued resource QUEUED_RESOURCE_ID with queued provisioning.

$COMMON_OPTIONS
USAGE
}

parse_no_args "$@"

case "$PROVISIONING" in
  on-demand|spot)
    run gcloud compute tpus tpu-vm describe "$TPU_NAME" "--project=$PROJECT" "--zone=$ZONE" ;;
  queued|queued-spot)
    run gcloud compute tpus queued-resources describe "$QUEUED_RESOURCE_ID" "--project=$PROJECT" \
      "--zone=$ZONE" ;;
esac
