#!/usr/bin/env bash
# One call on the GPU machine: build, GPU tests (C++ and Python), then the kernel benchmark.
# Usage (device tool, repo root): bash scripts/gpu.sh [quick|full|tests|bench]   ; logs go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-quick}
OUT=${OUT:-/tmp/lutmm-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader
# Carried wheels (pytest, tqdm, ...): the GPU machine has no network.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
t0=$(date +%s)
cmake -S . -B build/gpu -G Ninja -DLUTMM_BUILD_TESTS=ON > "$OUT/cmake.log" 2>&1 || { tail -30 "$OUT/cmake.log"; exit 1; }
ninja -C build/gpu > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
python3 -m pip install -q --no-build-isolation --no-index . > "$OUT/pip.log" 2>&1 || { tail -40 "$OUT/pip.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
status=0
if [[ $MODE != bench ]]; then
  ./build/gpu/lutmm_tests --gtest_brief=1 2>&1 | tail -3
  ./build/gpu/lutmm_gpu_tests 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "^\[  (PASSED|FAILED|SKIPPED) |Failure|rel err|OK \]" | head -40
  [[ ${PIPESTATUS[0]} == 0 ]] || status=1
  python3 -X faulthandler -m pytest -q -x tests/python 2>&1 | tee "$OUT/pytest.log" | tail -15
  [[ ${PIPESTATUS[0]} == 0 ]] || status=1
fi
if [[ $MODE == sanitize ]]; then
  compute-sanitizer --tool memcheck ./build/gpu/lutmm_gpu_tests --gtest_filter='Gpu.Identity*:Gpu.StreamK*' 2>&1 | tail -5
  compute-sanitizer --tool racecheck ./build/gpu/lutmm_gpu_tests --gtest_filter='Gpu.Identity*' 2>&1 | tail -5
fi
if [[ $MODE == quick || $MODE == bench ]]; then
  python3 bench/bench_kernel.py --quick --json "$OUT/bench.json" 2>"$OUT/bench.err" | tee "$OUT/bench.txt"
elif [[ $MODE == full ]]; then
  python3 bench/bench_kernel.py --json "$OUT/bench.json" 2>"$OUT/bench.err" | tee "$OUT/bench.txt"
fi
exit $status
