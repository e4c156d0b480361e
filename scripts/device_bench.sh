#!/usr/bin/env bash
# The ONE script a GPU session runs on the device machine (how: scripts/README-device.md).
#
#   1. the GPU tests, for real (TRITON_INTERPRET=0): Triton kernels, the compiled attack loop, the merger head;
#   2. every benchmark suite at full size (WRN-28-10, CIFAR shapes, batches 128 and 512), rows appended to
#      $OUT/results/bench/<suite>.json.
# The whole output also goes to $OUT/device_bench.log: six files come back in all (the tool returns at most
# 8 files, at most 2 folders down, and only the last 12,000 characters of output).
#
# Everything fits in BUDGET_S seconds (default 510, i.e. 8.5 min, under the device tool's 600 s per command):
# each step runs under `timeout` with the smaller of its own cap and the time left, and a step that would
# start with less than its minimum is skipped with a message. A benchmark interrupted by its timeout keeps
# every row it finished (rows are written one at a time). Exit status 0 only if every step passed.
#
# Environment: OUT (required: the folder that comes back), AFS_GIT_SHA (the commit being measured; the
# device copy has no .git), BUDGET_S, PYTHON (an interpreter with torch + triton; found automatically),
# DRY_RUN=1 (a CPU rehearsal of the script itself: tiny model, no GPU tests, Triton interpreted).
set -uo pipefail

cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder whose contents come back}"
BUDGET_S="${BUDGET_S:-510}"
RESULTS="$OUT/results/bench"
mkdir -p "$RESULTS"
exec > >(tee -a "$OUT/device_bench.log") 2>&1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
DRY_RUN="${DRY_RUN:-0}"
if [[ "$DRY_RUN" == 1 ]]; then
  export TRITON_INTERPRET=1 # the rehearsal runs the kernels in Triton's CPU interpreter
else
  export TRITON_INTERPRET=0 # compiled kernels on CUDA tensors (tests/conftest.py only sets a default)
fi
export PYTHONUNBUFFERED=1 # progress lines appear as they happen
START=$(date +%s)
STATUS=0

elapsed() { echo $(($(date +%s) - START)); }

# Pick an interpreter that has torch and triton (the device machine may have either name).
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  for cand in python3 python; do
    if command -v "$cand" >/dev/null && "$cand" -c "import torch, triton" 2>/dev/null; then PY=$cand; break; fi
  done
fi
if [[ -z "$PY" ]]; then
  echo "FATAL: no python with torch and triton found (set PYTHON=...)"
  exit 2
fi

# step NAME CAP_S MIN_S COMMAND...: run COMMAND under a timeout and record a failure.
step() {
  local name=$1 cap=$2 min=$3
  shift 3
  local left=$((BUDGET_S - $(elapsed)))
  if ((left < min)); then
    echo "### [$(elapsed)s] SKIPPED $name: ${left}s of the budget left, it needs at least ${min}s"
    STATUS=1
    return
  fi
  local limit=$((cap < left ? cap : left))
  echo "### [$(elapsed)s] START $name (time limit ${limit}s)"
  # SIGINT first: Python unwinds (rows already written stay written); SIGKILL 15 s later if it hangs.
  timeout --signal=INT --kill-after=15 "$limit" "$@"
  local rc=$?
  echo "### [$(elapsed)s] END $name rc=$rc"
  ((rc == 0)) || STATUS=1
}

echo "### device_bench.sh: budget ${BUDGET_S}s, python $PY, results -> $RESULTS"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
"$PY" - <<'PYEOF'
import sys, torch, triton
print("python", sys.version.split()[0], "| torch", torch.__version__, "| triton", triton.__version__,
      "| cuda", torch.version.cuda, "| gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
PYEOF
if [[ "$DRY_RUN" != 1 ]] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "FATAL: torch sees no CUDA device (DRY_RUN=1 rehearses the script on a CPU)"
  exit 2
fi

# 1. GPU tests (needs pytest on the device; a missing pytest is reported, and the benchmarks still run).
if [[ "$DRY_RUN" == 1 ]]; then
  echo "### SKIPPED tests: DRY_RUN=1 (the CPU test suite runs them under the interpreter)"
elif "$PY" -c "import pytest" 2>/dev/null; then
  step tests 150 30 "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_kernels.py tests/test_attack_loop.py tests/test_merger_head.py
else
  echo "### SKIPPED tests: pytest is not installed for $PY on this machine"
  STATUS=1
fi

# 2. Benchmarks, cheapest and most decisive first. One warm-up and three timed repetitions per case
# (after the compiling call, which is timed separately): enough for a median on a quiet, dedicated GPU.
BENCH=("$PY" -m benchmarks --device cuda --model wrn-28-10 --batch-sizes 128,512 --members 6 --steps 10
  --warmup 1 --reps 3 --results-dir "$RESULTS" --note "scripts/device_bench.sh")
STEP_ARGS=(--bandwidth-batch 16384)
# Batch 512 first: if the compiles run long, the batch the epoch suite reuses is the one that got done.
PGD_ARGS=(--batch-sizes 512,128)
EPOCH_ARGS=(--epoch-images 50000 --epoch-batch-size 512 --epoch-baseline-batches 2)
if [[ "$DRY_RUN" == 1 ]]; then
  BENCH=("$PY" -m benchmarks --device cpu --model wrn-10-1 --batch-sizes 4 --members 2 --steps 1 --image-size 8
    --warmup 0 --reps 1 --compile-backend eager --results-dir "$RESULTS" --note "device_bench.sh DRY_RUN")
  STEP_ARGS=(--bandwidth-batch 0)
  PGD_ARGS=(--batch-sizes 4)
  EPOCH_ARGS=(--epoch-images 8 --epoch-batch-size 4 --epoch-baseline-batches 1)
fi
step pgd_step 45 15 "${BENCH[@]}" pgd_step "${STEP_ARGS[@]}"
step merger_head 60 20 "${BENCH[@]}" merger_head
step stack 75 30 "${BENCH[@]}" stack
# Four Inductor compiles of WRN-28-10's attack step (2 batch sizes x {default, CUDA graphs}).
step pgd 210 90 "${BENCH[@]}" pgd "${PGD_ARGS[@]}"
# Reuses the batch-512 compiled graph from Inductor's on-disk cache when the pgd step got that far.
step at_epoch 150 60 "${BENCH[@]}" at_epoch "${EPOCH_ARGS[@]}"

echo "### [$(elapsed)s] summary of this run's rows"
"$PY" -m benchmarks summary --results-dir "$RESULTS"
echo "### [$(elapsed)s] device_bench.sh finished, status $STATUS (0: every step passed)"
exit "$STATUS"
