#!/usr/bin/env bash
# Delete the TPU VM (or its queued resource, which deletes the TPU with it).
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
usage: $SCRIPT_NAME [--dry-run] [--env-file FILE]

Deletes TPU_NAME (PROVISIONING on-demand/spot) or the queued resource QUEUED_RESOURCE_ID
(PROVISIONING queued/queued-spot; --force also deletes its TPU). Nothing on the workers' disks
survives: keep run.output_dir on a shared filesystem or a GCS bucket.

$COMMON_OPTIONS
USAGE
}

parse_no_args "$@"

case "$PROVISIONING" in
  on-demand|spot)
    run gcloud compute tpus tpu-vm delete "$TPU_NAME" "--project=$PROJECT" "--zone=$ZONE" --quiet ;;
  queued|queued-spot)
    run gcloud compute tpus queued-resources delete "$QUEUED_RESOURCE_ID" "--project=$PROJECT" \
      "--zone=$ZONE" --force --quiet ;;
esac
