#!/usr/bin/env bash
# One device call that builds, checks and times everything: prebuild the CUDA rungs (resource
# report), run the whole test suite on the GPU, time the mission shape beside the peers, and
# with --sweep the BENCH.md grid. Everything is logged to $OUT/run.log; results JSON/PNG and a
# tarball of the build cache (carry it back as fc-cache.tgz to skip the next compile) go to $OUT.
#   bash scripts/gpu_check.sh [--sweep] [--backward]
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 FLASHCORE_CACHE_DIR=${FLASHCORE_CACHE_DIR:-$PWD/.fc-cache}
log="$OUT/run.log"
step() { echo -e "\n=== $* ===" | tee -a "$log"; "$@" 2>&1 | tee -a "$log"; return "${PIPESTATUS[0]}"; }

[ -f fc-cache.tgz ] && tar xzf fc-cache.tgz
step nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv
step python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'cudnn', torch.backends.cudnn.version())"
step python3 -m flashcore build
tar czf "$OUT/fc-cache.tgz" "$(realpath --relative-to="$PWD" "$FLASHCORE_CACHE_DIR")" --exclude='*.o' 2>/dev/null
# Tests pin the Triton rung to its first config (autotuning every test shape would take
# minutes); the benchmarks autotune and check the error beside every timing.
export FLASHCORE_TEST_SEED=${FLASHCORE_TEST_SEED:-$RANDOM}
step env FLASHCORE_TRITON_AUTOTUNE=0 python3 -m pytest -q -p no:cacheprovider -n 8 --maxfail=25 tests
status=$?
# compute-sanitizer on the Hopper rung's code paths (split-KV clusters, persistent grid).
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
if [[ -n "$SANITIZER" && $(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1) == 9.0 ]]; then
  for tool in memcheck racecheck; do
    step timeout 600 "$SANITIZER" --tool $tool --error-exitcode 1 python3 scripts/sanitize.py hopper || status=1
  done
fi
step python3 -m flashcore bench --shape mission --iters 100 --out "$OUT"
step python3 benchmarks/host_overhead.py
if [[ " $* " == *" --sweep "* ]]; then
  step python3 -m flashcore bench --sweep $([[ " $* " == *" --backward "* ]] && echo --backward) --out "$OUT"
fi
echo "=== summary ==="; grep -E "passed|failed" "$log" | tail -1
exit $status
