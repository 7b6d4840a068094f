#!/usr/bin/env bash
# Start the SFTMix pipeline on every TPU worker, in the background.
set -euo pipefail
USAGE="Usage: tpu/launch.sh [options] CONFIG WORKDIR [--config.KEY=VALUE ...]

Runs on ALL workers, detached (nohup), appending to ~/sftmix.log on each:
  python -m sftmix_jax.main --config CONFIG --workdir WORKDIR [--config.KEY=VALUE ...]
CONFIG is configs/NAME.py[:ARG]; WORKDIR should be gs://BUCKET/... (shared by all hosts).
A run that launch.sh started earlier on a worker (pid in ~/sftmix.pid) is stopped first,
so rerunning with the same WORKDIR resumes the pipeline where it stopped.
HF_TOKEN, if set here, is exported on the workers (gated models such as Llama-3.1-8B).
  --env KEY=VALUE   also export KEY=VALUE on the workers (repeatable),
                    e.g. --env JAX_COMPILATION_CACHE_DIR=gs://BUCKET/jax-cache"
# shellcheck source=tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"

envs=(PYTHONUNBUFFERED=1)
[[ -n ${HF_TOKEN:-} ]] && envs+=("HF_TOKEN=$HF_TOKEN")
pos=()
set -- "${ARGS[@]}"
while (($#)); do
  case $1 in
    --env) envs+=("${2:?--env needs KEY=VALUE}"); shift ;;
    --env=*) envs+=("${1#*=}") ;;
    *) pos+=("$1") ;;
  esac
  shift
done
((${#pos[@]} >= 2)) || { usage >&2; exit 2; }
config=${pos[0]} workdir=${pos[1]}
[[ $workdir == gs://* ]] ||
  echo "warning: WORKDIR $workdir is not on gs://; multi-host runs need storage all hosts share" >&2

printf -v cmd_line '%q ' -m sftmix_jax.main --config "$config" --workdir "$workdir" "${pos[@]:2}"
printf -v env_line 'export %q; ' "${envs[@]}"

stop="pid=\$(cat $REMOTE_PID 2>/dev/null || true)"
stop+="; if [ -n \"\$pid\" ] && ps -o args= -p \"\$pid\" | grep -q sftmix_jax.main; then"
stop+=" echo \"stopping previous run (pid \$pid)\"; kill \"\$pid\" || true;"
stop+=" for _ in \$(seq 60); do kill -0 \"\$pid\" 2>/dev/null || break; sleep 1; done;"
stop+=" kill -9 \"\$pid\" 2>/dev/null || true; fi"
start="echo \"=== \$(date -u) launch\" >> $REMOTE_LOG; $env_line"
start+="setsid nohup $REMOTE_VENV/bin/python $cmd_line>> $REMOTE_LOG 2>&1 < /dev/null & echo \$! > $REMOTE_PID"

tpu_ssh all "set -e; cd $REMOTE_REPO; $stop; $start"
echo "launched; follow with: tpu/logs.sh --name $TPU_NAME" >&2
