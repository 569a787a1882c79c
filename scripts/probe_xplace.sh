#!/usr/bin/env bash
# Where X lies against the decode time at small M (performance-log.md item 95), on the GPU machine:
# bash scripts/probe_xplace.sh (device tool, repo root; ~2.5 minutes cold). lutmm_bench only.
# Prints, per (bits, M) on 28672x4096 (PROBE_SHAPE), the time with lutmm_bench's own allocations, then
# with X at each of PROBE_OFFSETS bytes into one 64 MiB allocation (LUTMM_BENCH_BIG_IO, _X_OFFSET).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/lutmm-out}; mkdir -p "$OUT"
cmake -S . -B build/gpu -G Ninja -DLUTMM_BUILD_TESTS=ON > "$OUT/cmake.log" 2>&1 && \
  ninja -C build/gpu lutmm_bench > "$OUT/build.log" 2>&1 || { tail -20 "$OUT/build.log"; exit 1; }
export LUTMM_BENCH_SETTLE_MS=${LUTMM_BENCH_SETTLE_MS:-150}
read -r n k <<< "${PROBE_SHAPE:-28672 4096}"
offs=(${PROBE_OFFSETS:-0 256 4096 8192 65536 1048576})
us() { "$@" | tail -1 | awk '{print $6}'; }
printf "%4s %3s %6s" bits M own | tee "$OUT/xplace.txt"
for o in "${offs[@]}"; do printf " %8s" "+$o"; done | tee -a "$OUT/xplace.txt"; echo | tee -a "$OUT/xplace.txt"
for b in ${PROBE_BITS:-2 4}; do for m in ${PROBE_MS:-1 2 4}; do
  line=$(printf "%4s %3s %6s" "$b" "$m" "$(us ./build/gpu/lutmm_bench "$n" "$k" "$m" "$b" lut)")
  for o in "${offs[@]}"; do
    line+=$(printf " %8s" "$(LUTMM_BENCH_BIG_IO=1 LUTMM_BENCH_X_OFFSET=$o us ./build/gpu/lutmm_bench "$n" "$k" "$m" "$b" lut)")
  done
  echo "$line" | tee -a "$OUT/xplace.txt"
done; done
