#!/usr/bin/env bash
# The one-GPU check (H100 / H200): the GPU tests, then the ~1B-parameter bfloat16 benches.
#   bash tools/gpu_check.sh [OUTDIR]      (OUTDIR default: gpu_check/; one log + JSON per run)
# Each run has its own time limit, most important first, so a slow one cannot starve the rest.
# The PyTorch comparison runs with JAX allocating on demand, so both fit on the GPU.
set -uo pipefail
out=$(realpath -m "${1:-gpu_check}")
cd "$(dirname "$0")/.." || exit  # the repository root: tools/bench.py, tests/
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
py=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
$py -c "import jax, flax, optax, orbax.checkpoint, transformers; print('jax', jax.__version__, 'flax', flax.__version__,
'optax', optax.__version__, 'transformers', transformers.__version__, jax.devices())"

run() {  # name, limit in s, command...
  local name=$1 limit=$2
  shift 2
  echo "=== $name: $*"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log" | grep -v -e "^W0000" -e "^I0000"
  echo "=== $name: exit ${PIPESTATUS[0]}"
}

run test_gpu 150 env JAX_PLATFORMS=cuda "$py" -m pytest -q -s -p no:cacheprovider tests/test_gpu.py
b=("$py" tools/bench.py --shape llama1b --dtype bfloat16 --batch 4 --seq 2048 --steps 5 --rounds 2)
run llama1b 240 "${b[@]}" --json "$out/llama1b.json"
run llama1b_xla_attention 120 "${b[@]}" --kinds ntp --attention xla --json "$out/llama1b_xla.json"
run smollm2_torch 150 env XLA_PYTHON_CLIENT_PREALLOCATE=false "$py" tools/bench.py --shape smollm2 --dtype bfloat16 --batch 16 --seq 1024 --kinds ntp,sftmix \
  --torch --steps 5 --rounds 2 --json "$out/smollm2_torch.json"
