#!/usr/bin/env bash
# Copy this checkout to REMOTE_DIR on every worker (a tarball, scp to all, unpacked in place).
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
usage: $SCRIPT_NAME [--dry-run] [--env-file FILE]

Packs the repository (without .git, runs/, virtual environments and caches) into a tarball,
copies it to every worker of TPU_NAME and unpacks it into REMOTE_DIR (files not in the tarball
are left alone). Run it again after every local change, before tpu/launch.sh. The package is
installed editable by tpu/setup.sh, so a sync needs no reinstall.

  --dry-run        print the commands instead of running them
  --env-file FILE  read settings from FILE (default: tpu/env if present; see tpu/env.example)
USAGE
}

parse_no_args "$@"

TARBALL="${TMPDIR:-/tmp}/jaxselm-src-$TPU_NAME.tar.gz"
run tar -czf "$TARBALL" -C "$REPO_ROOT" --exclude=.git --exclude=runs --exclude=.venv \
  --exclude=venv --exclude=__pycache__ --exclude=.pytest_cache --exclude=tpu/env .
run gcloud compute tpus tpu-vm scp "$TARBALL" "$TPU_NAME:jaxselm-src.tar.gz" \
  "--project=$PROJECT" "--zone=$ZONE" --worker=all
code="$(quote "$REMOTE_DIR")"
tpu_ssh all "mkdir -p $code && tar -xzf jaxselm-src.tar.gz -C $code && rm jaxselm-src.tar.gz"
