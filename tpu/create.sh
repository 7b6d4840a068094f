#!/usr/bin/env bash
# Create a TPU VM slice through a queued resource and wait until it is ACTIVE.
set -euo pipefail
USAGE="Usage: tpu/create.sh [options]

Requests a TPU slice (queued resource NAME, node NAME) and polls until it is ACTIVE.
  --reserved        use reserved capacity (a reservation in this project)
  --no-wait         return once the request is queued
  SERVICE_ACCOUNT=EMAIL   run the VMs as this service account (it needs write access
                          to the gs:// workdir); default: the compute default account"
# shellcheck source=tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"

WAIT=1
flags=()
[[ $SPOT == 1 ]] && flags+=(--spot)
for arg in "${ARGS[@]}"; do
  case $arg in
    --reserved) flags+=(--reserved) ;;
    --no-wait) WAIT=0 ;;
    *) die "unknown argument: $arg (see --help)" ;;
  esac
done
[[ -n ${SERVICE_ACCOUNT:-} ]] && flags+=(--service-account="$SERVICE_ACCOUNT")

run gcloud compute tpus queued-resources create "$TPU_NAME" "${LOCATION[@]}" \
  --node-id="$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" \
  --runtime-version="$RUNTIME_VERSION" "${flags[@]}"

[[ $WAIT == 1 ]] || exit 0
describe=(gcloud compute tpus queued-resources describe "$TPU_NAME" "${LOCATION[@]}"
  --format='value(state.state)')
echo "waiting for ACTIVE, polling every 30 s:" >&2
DRY_RUN=1 run "${describe[@]}"
[[ $DRY_RUN == 1 ]] && exit 0
while true; do
  state=$("${describe[@]}")
  case $state in
    ACTIVE) echo "$TPU_NAME is ACTIVE; next: tpu/setup.sh --name $TPU_NAME" >&2; exit 0 ;;
    FAILED | SUSPENDED | SUSPENDING | DELETING) die "queued resource $TPU_NAME is $state" ;;
  esac
  echo "$(date +%T) $state" >&2
  sleep 30
done
