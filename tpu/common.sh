#!/usr/bin/env bash
# shellcheck disable=SC2034  # the variables are used by the scripts that source this file
# Shared settings and helpers for tpu/*.sh. Sourced, not run.
#
# Every setting comes from the environment with a default; the common flags below override it.
# A script sets USAGE (its own synopsis and options) before sourcing this file.

TPU_NAME=${TPU_NAME:-sftmix}                  # queued-resource id and TPU VM node id
ZONE=${ZONE:-us-central2-b}                    # v4: us-central2-b; v5e: e.g. us-west4-a
PROJECT=${PROJECT:-}                           # default: gcloud config get-value project
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-32}    # v4-32 (16 chips, 4 hosts), v5litepod-64, ...
RUNTIME_VERSION=${RUNTIME_VERSION:-}           # default: matched to ACCELERATOR_TYPE below
SPOT=${SPOT:-0}                                # 1: Spot VMs (cheaper, preemptible)
REPO_URL=${REPO_URL:-}                         # git URL to clone; empty: copy this checkout
BRANCH=${BRANCH:-main}                         # branch or tag to clone from REPO_URL
PYTHON_VERSION=${PYTHON_VERSION:-3.11}         # jax>=0.7 needs Python >= 3.11
DRY_RUN=${DRY_RUN:-0}                          # 1: print the commands, run nothing

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Paths on each worker ($HOME expands there).
REMOTE_REPO="\$HOME/sftmix_jax"
REMOTE_VENV="\$HOME/sftmix_venv"
REMOTE_LOG="\$HOME/sftmix.log"
REMOTE_PID="\$HOME/sftmix.pid"

COMMON_OPTIONS="Common options (environment variable in brackets):
  --name NAME       TPU / queued-resource name        [TPU_NAME=$TPU_NAME]
  --zone ZONE       zone                              [ZONE=$ZONE]
  --project ID      GCP project                       [PROJECT, default: gcloud config]
  --type TYPE       accelerator type, e.g. v4-32, v5litepod-64  [ACCELERATOR_TYPE=$ACCELERATOR_TYPE]
  --spot            Spot VMs                          [SPOT=1]
  --dry-run         print the full commands, run nothing  [DRY_RUN=1]
  -h, --help        this message
Other settings: RUNTIME_VERSION (default from --type), REPO_URL, BRANCH=$BRANCH, PYTHON_VERSION=$PYTHON_VERSION"

((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] >= 404)) ||
  { echo "error: needs bash >= 4.4, this is $BASH_VERSION (macOS: brew install bash)" >&2; exit 1; }

usage() { printf '%s\n\n%s\n' "$USAGE" "$COMMON_OPTIONS"; }
die() { echo "error: $*" >&2; exit 1; }

# Parse the common flags (--flag VALUE or --flag=VALUE); everything else goes to ARGS, in order.
ARGS=()
parse_args() {
  while (($#)); do
    case $1 in
      -h | --help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1 ;;
      --spot) SPOT=1 ;;
      --name=* | --zone=* | --project=* | --type=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
      --name) TPU_NAME=${2:?--name needs a value}; shift ;;
      --zone) ZONE=${2:?--zone needs a value}; shift ;;
      --project) PROJECT=${2:?--project needs a value}; shift ;;
      --type) ACCELERATOR_TYPE=${2:?--type needs a value}; shift ;;
      *) ARGS+=("$1") ;;
    esac
    shift
  done
  if [[ -z $PROJECT ]]; then
    PROJECT=$(gcloud config get-value project 2>/dev/null || true)
    [[ -n $PROJECT ]] || die "no project: pass --project or set PROJECT (or gcloud config set project ID)"
  fi
  if [[ -z $RUNTIME_VERSION ]]; then
    case $ACCELERATOR_TYPE in
      v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
      v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
      v5litepod-* | v5e-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
      *) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
    esac
  fi
  LOCATION=(--zone="$ZONE" --project="$PROJECT")
}

# Print a command as one copy-pasteable line (HF_TOKEN masked); run it unless DRY_RUN=1.
run() {
  local arg words=() line
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then words+=("$arg")
    elif [[ $arg =~ ^(--[a-z-]+=)(.*)$ ]]; then words+=("${BASH_REMATCH[1]}${BASH_REMATCH[2]@Q}")
    else words+=("${arg@Q}"); fi
  done
  line="${words[*]}"
  if [[ -n ${HF_TOKEN:-} ]]; then line=${line//"HF_TOKEN=$HF_TOKEN"/'HF_TOKEN=<HF_TOKEN>'}; fi
  echo "+ $line"
  if [[ $DRY_RUN != 1 ]]; then "$@"; fi
}

# Run a shell command line on TPU worker(s): tpu_ssh WORKER|all 'COMMAND'.
tpu_ssh() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${LOCATION[@]}" --worker="$1" --command="$2"
}
