#!/usr/bin/env bash
# Show ~/sftmix.log of a TPU worker.
set -euo pipefail
USAGE="Usage: tpu/logs.sh [options] [--worker=N|all] [-n LINES]

Follows ~/sftmix.log on worker N (default 0; only process 0 writes reports, every worker logs).
--worker=all prints the last LINES (default 100) of every worker's log, without following:
useful to find the worker that failed first."
# shellcheck source=tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"

worker=0 lines=100
set -- "${ARGS[@]}"
while (($#)); do
  case $1 in
    --worker) worker=${2:?--worker needs N or all}; shift ;;
    --worker=*) worker=${1#*=} ;;
    -n) lines=${2:?-n needs a number}; shift ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
  shift
done

if [[ $worker == all ]]; then
  tpu_ssh all "tail -n $lines $REMOTE_LOG"
else
  tpu_ssh "$worker" "tail -n $lines -F $REMOTE_LOG"
fi
