#!/usr/bin/env bash
# Install jaxselm (editable, from the synced code) and JAX for TPU on every worker.
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
usage: $SCRIPT_NAME [--dry-run] [--env-file FILE]

On every worker of TPU_NAME: creates the virtual environment REMOTE_VENV, installs JAX_PIP_SPEC
(default jax[tpu]), EXTRA_PIP, and the package from REMOTE_DIR in editable mode, then checks that
JAX sees the TPU chips. Run tpu/sync.sh first (the code must be there).

$COMMON_OPTIONS
USAGE
}

parse_no_args "$@"

code="$(quote "$REMOTE_DIR")"
venv="$(quote "$REMOTE_VENV")"
packages="$(quote "$JAX_PIP_SPEC")${EXTRA_PIP:+ $EXTRA_PIP}"
remote="set -e; test -d $code || { echo \"\$(hostname): no $code, run tpu/sync.sh first\" >&2; exit 1; }"
remote+="; python3 -m venv $venv"
remote+="; $venv/bin/pip install -q --upgrade pip"
remote+="; $venv/bin/pip install -q $packages"
remote+="; $venv/bin/pip install -q -e $code"
remote+="; $venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.devices()[0].platform)'"
tpu_ssh all "$remote"
