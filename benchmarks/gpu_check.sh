#!/usr/bin/env bash
# One command for the GPU machine, run in the repo root:   bash benchmarks/gpu_check.sh
# (1) environment, (2) optional build of the compiled extension, (3) the GPU test suite
# (pytest -m gpu), (4) the op benchmark (and the flow loss path, 4b), (5) the training-step benchmark (bench_train.py: DiT-S/B/XL,
# U-Net 32/64; eager, CUDA graph, then torch.compile while its time budget lasts), (6) logs +
# results copied flat into $OUT (<= 11 files). Every step runs under `timeout` and the script goes
# on after a failure; the exit status is non-zero if any step failed. Total under 9 minutes on an
# H100/H200: the step timeouts below sum to 510 s, plus start-up.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-/tmp/speed_gpu_check}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
T_BUILD="${T_BUILD:-80}"
T_TESTS="${T_TESTS:-130}"
T_BENCH="${T_BENCH:-130}"
T_TRAIN="${T_TRAIN:-140}"
T_FLOW="${T_FLOW:-30}"
# bench_train starts no new row after TRAIN_BUDGET_S (a row in flight finishes; results are
# written after every row, so a timeout still leaves the table of the finished rows)
TRAIN_BUDGET_S="${TRAIN_BUDGET_S:-95}"
TRAIN_ARGS=(--device cuda --modes eager,graph,compile --repeats 6 --steps-per-repeat 3 --warmup 2
  --time-budget-s "$TRAIN_BUDGET_S")
# SMOKE=1: rehearse the whole script on a CPU-only machine (tests and benchmark through the
# Triton interpreter, tiny shapes; nothing is measured)
SMOKE="${SMOKE:-0}"
BENCH_ARGS=(--compile-budget-s 35 --time-budget-s 100 --rep-ms 30)
# knobs: SKIP_BUILD=1 (no compiled extension: its tests skip), BENCH_EXTRA="--dtypes fp32 ..." (appended), T_TRAIN /
# TRAIN_BUDGET_S (seconds for bench_train), TRAIN_EXTRA="--models DiT-XL/2 --batch 128 ..." (appended)
# shellcheck disable=SC2206
BENCH_ARGS+=(${BENCH_EXTRA:-})
# shellcheck disable=SC2206
TRAIN_ARGS+=(${TRAIN_EXTRA:-})
if [ "$SMOKE" = 1 ]; then
  export SPEED_GPU_SMOKE=1; BENCH_ARGS=(--smoke --dtypes fp32 --out "$OUT/results")
  TRAIN_ARGS=(--device cpu --smoke --out "$OUT/results")
fi
FAILED=()

step() {  # step NAME TIMEOUT LOGFILE CMD...   (NAME ending in '?' = optional: logged, not fatal)
  local name="$1" secs="$2" logfile="$3"; shift 3
  local t0=$SECONDS
  echo "=== [$name] $(date -u +%H:%M:%S) timeout ${secs}s: $*" | tee -a "$LOG"
  timeout --kill-after=10 "$secs" "$@" > "$logfile" 2>&1
  local rc=$?
  tail -n 40 "$logfile" >> "$LOG"
  echo "=== [$name] rc=$rc in $((SECONDS - t0))s" | tee -a "$LOG"
  if [ $rc -ne 0 ] && [ "${name%\?}" = "$name" ]; then FAILED+=("$name(rc=$rc)"); fi
  return 0
}

# (1) environment
{
  echo "date: $(date -u)"; echo "host: $(hostname)"; echo "commit: $(git rev-parse HEAD 2>/dev/null)"
  nvidia-smi || true
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); print('device', torch.cuda.get_device_name())" || true
} >> "$LOG" 2>&1
cat "$LOG"

# (2) compiled extension (optional; a failure is logged and the Triton checks go on)
# >>> csrc build >>>
[ "${SKIP_BUILD:-0}" = 1 ] || step "build?" "$T_BUILD" "$OUT/build.log" env TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS=16 \
  SPEED_KERNELS_CUDA=1 python3 setup.py build_ext --inplace
python3 -c "from speed_kernels import _ext; print('ext:', _ext.available())" >> "$LOG" 2>&1
# <<< csrc build <<<
python3 -c "from speed_kernels.backends import backends; print('backends:', backends())" >> "$LOG" 2>&1

# (3) GPU tests (the CPU-interpreted Triton tests are not needed here)
if [ "$SMOKE" = 1 ]; then
  step tests "$T_TESTS" "$OUT/pytest_gpu.log" python3 -m pytest -q -p no:cacheprovider tests/test_triton_gpu.py
else
  # -v, not -q: if the step times out, the log still says which tests passed
  REQ=1; [ "${SKIP_BUILD:-0}" = 1 ] && REQ=0
  step tests "$T_TESTS" "$OUT/pytest_gpu.log" env SPEED_KERNELS_REQUIRE_EXT=$REQ python3 -m pytest -m gpu -v -p no:cacheprovider tests/
fi

# (4) op benchmark (writes benchmarks/results/ops_<gpu>.md/.csv after every variant)
step bench "$T_BENCH" "$OUT/bench_ops.log" python3 benchmarks/bench_ops.py "${BENCH_ARGS[@]}"

# (4b) flow-matching loss path: eager diffusers-style step against torch, triton and cuda (table in the log)
FLOW_DEV=cuda; [ "$SMOKE" = 1 ] && FLOW_DEV=cpu
step "bench-flow?" "$T_FLOW" "$OUT/bench_flow.log" python3 benchmarks/bench_flow.py --device "$FLOW_DEV" \
  --shapes 256x4x32x32,128x3x64x64 --reps 20

# (5) training steps (writes benchmarks/results/train_cuda.md/.csv after every row)
step bench-train "$T_TRAIN" "$OUT/bench_train.log" python3 benchmarks/bench_train.py "${TRAIN_ARGS[@]}"

# (6) results back (flat: gpu_check.log build.log pytest_gpu*.log bench_ops.log bench_flow.log bench_train.log + md/csv)
RES_DIR=benchmarks/results; [ "$SMOKE" = 1 ] && RES_DIR="$OUT/results"
LATEST=$(ls -t "$RES_DIR"/ops_*.md 2>/dev/null | head -n 1)
if [ -n "$LATEST" ] && [ "$RES_DIR" = benchmarks/results ]; then
  cp "$LATEST" "${LATEST%.md}.csv" "$OUT"/ 2>/dev/null || FAILED+=("results(copy)")
elif [ -z "$LATEST" ]; then
  FAILED+=("results(missing)")
fi
TRAIN_MD=$(ls -t "$RES_DIR"/train_*.md 2>/dev/null | head -n 1)
if [ -n "$TRAIN_MD" ] && [ "$RES_DIR" = benchmarks/results ]; then
  cp "$TRAIN_MD" "${TRAIN_MD%.md}.csv" "$OUT"/ 2>/dev/null || FAILED+=("train-results(copy)")
elif [ -z "$TRAIN_MD" ]; then
  FAILED+=("train-results(missing)")
fi
if [ ${#FAILED[@]} -ne 0 ]; then
  echo "FAILED: ${FAILED[*]}" | tee -a "$LOG"
  exit 1
fi
echo "ALL OK" | tee -a "$LOG"
