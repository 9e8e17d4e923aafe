#!/usr/bin/env bash
# Create the TPU VM pod slice: on-demand, spot, or through a queued resource.
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
usage: $SCRIPT_NAME [--dry-run] [--env-file FILE] [--provisioning on-demand|spot|queued|queued-spot]

Creates TPU_NAME (ACCELERATOR_TYPE, RUNTIME_VERSION) in PROJECT/ZONE. With queued provisioning a
queued resource QUEUED_RESOURCE_ID (default TPU_NAME) is created; the TPU appears when capacity is
granted (watch it with tpu/status.sh).

$COMMON_OPTIONS
  --provisioning   override PROVISIONING
USAGE
}

parse_common "$@"
set -- "${ARGS[@]+"${ARGS[@]}"}"
while (($#)); do
  case "$1" in
    --provisioning) (($# >= 2)) || die "--provisioning needs a value"; PROVISIONING="$2"; shift ;;
    --provisioning=*) PROVISIONING="${1#--provisioning=}" ;;
    *) die "unexpected argument '$1' (see --help)" ;;
  esac
  shift
done
case "$PROVISIONING" in
  on-demand|spot|queued|queued-spot) ;;
  *) die "--provisioning: expected on-demand, spot, queued or queued-spot, got '$PROVISIONING'" ;;
esac
require PROJECT ZONE ACCELERATOR_TYPE RUNTIME_VERSION TPU_NAME

case "$PROVISIONING" in
  on-demand)
    run gcloud compute tpus tpu-vm create "$TPU_NAME" "--project=$PROJECT" "--zone=$ZONE" \
      "--accelerator-type=$ACCELERATOR_TYPE" "--version=$RUNTIME_VERSION" ;;
  spot)
    run gcloud compute tpus tpu-vm create "$TPU_NAME" "--project=$PROJECT" "--zone=$ZONE" \
      "--accelerator-type=$ACCELERATOR_TYPE" "--version=$RUNTIME_VERSION" --spot ;;
  queued)
    run gcloud compute tpus queued-resources create "$QUEUED_RESOURCE_ID" "--project=$PROJECT" \
      "--zone=$ZONE" "--node-id=$TPU_NAME" "--accelerator-type=$ACCELERATOR_TYPE" \
      "--runtime-version=$RUNTIME_VERSION" ;;
  queued-spot)
    run gcloud compute tpus queued-resources create "$QUEUED_RESOURCE_ID" "--project=$PROJECT" \
      "--zone=$ZONE" "--node-id=$TPU_NAME" "--accelerator-type=$ACCELERATOR_TYPE" \
      "--runtime-version=$RUNTIME_VERSION" --spot ;;
esac
