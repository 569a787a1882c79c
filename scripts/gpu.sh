#!/usr/bin/env bash
# One call on the GPU machine: build, GPU tests (C++ and Python), then the kernel benchmark.
# Usage (device tool, repo root): bash scripts/gpu.sh [quick|standard|full|tests|bench|profile|sanitize|ab]   ; logs go to $OUT.
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
# Shared assets (mini-llama, held-out text) travel as the ignored folder .carry/shared when carried.
[[ -d .carry/shared ]] && export LUTMM_SHARED=$PWD/.carry/shared
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
  : > "$OUT/pytest.log"
  for f in tests/python/test_*.py; do  # one process per file: a crash names its file
    python3 -X faulthandler -m pytest -q -rs "$f" > /tmp/pt.log 2>&1; rc=$?
    cat /tmp/pt.log >> "$OUT/pytest.log"
    echo "$f: rc=$rc $(tail -1 /tmp/pt.log)"
    if [[ $rc != 0 && $rc != 5 ]]; then status=1; grep -E -A14 "Fatal Python|^FAILED|Error" /tmp/pt.log | head -40; fi
  done
fi
if [[ $MODE != bench && -n ${LUTMM_SHARED:-} ]]; then
  python3 -m lutmm demo --max-tokens 8192 2>&1 | tee "$OUT/demo.txt" | tail -14
fi
if [[ $MODE == sanitize ]]; then
  compute-sanitizer --tool memcheck ./build/gpu/lutmm_gpu_tests --gtest_filter='Gpu.Identity*:Gpu.StreamK*' 2>&1 | tail -5
  compute-sanitizer --tool racecheck ./build/gpu/lutmm_gpu_tests --gtest_filter='Gpu.Identity*' 2>&1 | tail -5
fi
if [[ $MODE == ab ]]; then  # kernel experiment A/B: default build vs -DLUTMM_FULL_BLOCK_FAST=ON
  cmake -S . -B build/gpu-ff -G Ninja -DLUTMM_BUILD_TESTS=ON -DLUTMM_FULL_BLOCK_FAST=ON > /dev/null && \
    ninja -C build/gpu-ff lutmm_gpu_tests lutmm_bench > "$OUT/build-ff.log" 2>&1 || { tail -20 "$OUT/build-ff.log"; exit 1; }
  ./build/gpu-ff/lutmm_gpu_tests --gtest_brief=1 2>&1 | tail -2
  echo "== A: default"; ./build/gpu/lutmm_bench
  echo "== B: LUTMM_FULL_BLOCK_FAST"; ./build/gpu-ff/lutmm_bench
fi
if [[ $MODE == profile ]]; then
  for cfg in "1 8192 8192 4 128" "16 8192 8192 4 128"; do
    (cd bench && ncu --section SpeedOfLight --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis \
      -k regex:lut_gemm -s 2 -c 1 python3 profile_one.py $cfg > "$OUT/ncu_${cfg// /_}.txt" 2>&1)
    grep -E "Duration|DRAM Throughput|Memory Throughput|Compute \(SM\)|Achieved Occupancy|Theoretical Occupancy|Registers|Stall|Warp Cycles Per Issued|Block Limit|One or More|No Eligible" "$OUT/ncu_${cfg// /_}.txt" | head -30
  done
  python3 bench/bench_kernel.py --quick --json "$OUT/bench.json" 2>"$OUT/bench.err" > "$OUT/bench.txt"; tail -40 "$OUT/bench.txt"
fi
if [[ $MODE == quick || $MODE == bench ]]; then
  python3 bench/bench_kernel.py --quick --json "$OUT/bench.json" 2>"$OUT/bench.err" | tee "$OUT/bench.txt"
elif [[ $MODE == standard ]]; then
  python3 bench/bench_kernel.py --standard --json "$OUT/bench.json" 2>"$OUT/bench.err" | tee "$OUT/bench.txt"
elif [[ $MODE == full ]]; then
  python3 bench/bench_kernel.py --json "$OUT/bench.json" 2>"$OUT/bench.err" | tee "$OUT/bench.txt"
fi
exit $status
