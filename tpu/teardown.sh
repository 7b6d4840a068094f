#!/usr/bin/env bash
# Delete the queued resource and its TPU VM slice.
set -euo pipefail
USAGE="Usage: tpu/teardown.sh [options] [--yes]

Deletes queued resource NAME and its TPU VMs (--force), after a confirmation unless --yes.
Everything on the VMs' disks goes (code, venv, ~/sftmix.log); the gs:// workdir stays."
# shellcheck source=tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"

yes=0
for arg in "${ARGS[@]}"; do
  case $arg in
    -y | --yes) yes=1 ;;
    *) die "unknown argument: $arg (see --help)" ;;
  esac
done

if [[ $yes != 1 && $DRY_RUN != 1 ]]; then
  read -r -p "Delete TPU $TPU_NAME ($PROJECT, $ZONE) and everything on its disks? [y/N] " answer
  [[ $answer == [yY]* ]] || die "aborted"
fi
run gcloud compute tpus queued-resources delete "$TPU_NAME" "${LOCATION[@]}" --force --quiet
