#!/usr/bin/env bash
# One call on the GPU machine: build, GPU tests (C++ and Python), then the kernel benchmark.
# Usage (device tool, repo root): bash scripts/gpu.sh [quick|standard|full|tests|bench|profile|sanitize|ab|kab|cxx|e2e|attn|py|decode|timeline]
# Logs go to $OUT. ab: everything, then kernel A/B builds (EXPERIMENTS="2"); kab: C++ build, GPU tests
# and the A/B only; cxx: C++ build, GPU tests and the C++ kernel benchmark (lutmm_bench) only;
# sanitize: C++ build, GPU tests, then racecheck / synccheck / memcheck on subsets;
# e2e: build, then bench/bench_e2e.py $E2E_ARGS only (bench: GATED_ARGS runs bench/bench_gated.py too); attn: build, the decode-attention GPU tests and
# bench/bench_attention.py. BENCH_ARGS replaces --quick for quick/bench. tests: PYTEST_FILES (a glob) limits
# the Python test files; E2E_ARGS set also runs bench_e2e afterwards; NO_DEMO=1 skips the demo.
# ab/kab take AB_CASES / AB_B_PATHS (see bench_cases below) and AB_ROUNDS (A and B timed in turn N times),
# and end with scripts/ab_summary.py's table (B / A per case); AB_CLOCKS=1 samples the card's clocks.
# profile: Nsight Compute on PROFILE_CASES
# ("N K M BITS [PATH];...", lutmm_bench; with every carried .carry/base* tree's build too) and PROFILE_TORCH
# ("M N K;...", cuBLAS bf16 through torch.mm). py: the Python extension only (no C++ build or tests),
# then PY_CMD (default: the eager-overhead benchmark with its per-step table), e.g. for Python-only changes.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-quick}
CXX_ONLY=0; [[ $MODE == kab || $MODE == profile || $MODE == cxx || $MODE == sanitize ]] && CXX_ONLY=1  # no Python build, tests or demo
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
# At exit: the tests' outcome again after the long tables (the device tool returns the output's tail),
# and the logs packed into one logs.tgz (it returns at most 8 files from $OUT; session 34 lost
# pytest.log to that limit).
recap() {
  local rc=$?
  [[ -n ${clocks_pid:-} ]] && kill "$clocks_pid" 2>/dev/null  # AB_CLOCKS's sampler, on any exit
  if [[ -s $OUT/recap.txt ]]; then echo "== recap ($MODE)"; cat "$OUT/recap.txt"; fi
  ( cd "$OUT" && shopt -s nullglob && f=(*.log *.rc *.err) && (( ${#f[@]} )) && tar czf logs.tgz "${f[@]}" && rm -f "${f[@]}" )
  return $rc
}
: > "$OUT/recap.txt"
trap recap EXIT
if [[ $MODE == py ]]; then  # Python only: ~2-3 minutes cold, seconds on a warm machine
  python3 -m pip install -q --no-build-isolation --no-index . > "$OUT/pip.log" 2>&1 || { tail -40 "$OUT/pip.log"; exit 1; }
  echo "build: $(( $(date +%s) - t0 )) s"
  eval "${PY_CMD:-python3 bench/bench_overhead.py --parts}"
  exit $?
fi
# decode: which decode kernel the dispatch picks against each one forced (lutmm_bench: lut = dispatched,
# lut80 = the cp.async kernel, luttma = the TMA kernel), us, over DECODE_SHAPES ("N K;..."), DECODE_MS and
# DECODE_BITS; rows where the dispatched kernel is > 10% off the faster one are marked. First run as a
# one-off script in session 29 (log item 84).
# C++ build of lutmm_bench only (~110 s cold).
if [[ $MODE == decode ]]; then
  cmake -S . -B build/gpu -G Ninja -DLUTMM_BUILD_TESTS=ON > "$OUT/cmake.log" 2>&1 && \
    ninja -C build/gpu lutmm_bench > "$OUT/build.log" 2>&1 || { tail -20 "$OUT/build.log"; exit 1; }
  echo "build: $(( $(date +%s) - t0 )) s"
  export LUTMM_BENCH_SETTLE_MS=${LUTMM_BENCH_SETTLE_MS:-150}
  bench_us() { ./build/gpu/lutmm_bench "$@" | tail -1 | awk '{print $6}'; }  # N K M BITS PATH -> us
  IFS=';' read -ra dshapes <<< "${DECODE_SHAPES:-4096 4096;6144 4096;2048 8192;8192 8192;28672 4096}"
  printf "%5s %2s %12s %10s %8s %8s\n" M b "N x K" dispatched lut80 luttma | tee "$OUT/decode.txt"
  for m in ${DECODE_MS:-1 16}; do for b in ${DECODE_BITS:-4 3 2}; do for sh in "${dshapes[@]}"; do
    read -r n k <<< "$sh"
    us=()
    for p in lut lut80 luttma; do us+=("$(bench_us "$n" "$k" "$m" "$b" "$p")"); done
    flag=$(awk -v d="${us[0]}" -v a="${us[1]}" -v t="${us[2]}" 'BEGIN { b = a < t ? a : t; print (d > 1.1 * b) ? "  > 10% off" : "" }')
    printf "%5s %2s %12s %10s %8s %8s%s\n" "$m" "$b" "${n}x${k}" "${us[@]}" "$flag" | tee -a "$OUT/decode.txt"
  done; done; done
  exit 0
fi
# The targets $2... of a -DLUTMM_EXPERIMENT=$1 build in build/gpu-x$1 (kab's B builds, SANITIZE_EXPERIMENT);
# on failure the log's tail and status 1. sm_90a code only (B_GENCODE overrides): B builds run on this
# Hopper machine only, and without the sm_80 pass they compete less with the default build's.
build_experiment() {
  local e=$1; shift
  cmake -S . -B build/gpu-x$e -G Ninja -DLUTMM_BUILD_TESTS=ON -DLUTMM_EXPERIMENT=$e \
    "-DLUTMM_CUDA_GENCODE=${B_GENCODE:--gencode=arch=compute_90a,code=sm_90a}" > /dev/null && \
    ninja -C build/gpu-x$e "$@" > "$OUT/build-x$e.log" 2>&1 || { tail -20 "$OUT/build-x$e.log"; return 1; }
}
# The same in the background, its status in $OUT/build-x$1.rc (several builds at once; `wait` for them).
start_build_experiment() { ( build_experiment "$@"; echo $? > "$OUT/build-x$1.rc" ) & }
# timeline: lutmm_bench of a -DLUTMM_EXPERIMENT=200 build (sm_90a only, ~110 s cold) over TIMELINE_CASES
# ("N K M BITS;..."), each case's per-worker timeline of one call (src/cuda/timeline.cuh): entry,
# griddepcontrol.wait, first stage landed, loop end, exit, as percentiles over the workers (every
# worker's row in timeline_raw-x<E>.txt).
# TIMELINE_EXPERIMENT=201: the same with experiment 1 (two CTAs of one warp group per SM everywhere); "200 201"
# builds both at once and runs the cases under each in turn (timeline-x200.txt, timeline-x201.txt).
if [[ $MODE == timeline ]]; then
  tes=(${TIMELINE_EXPERIMENT:-200})
  for te in "${tes[@]}"; do start_build_experiment "$te" lutmm_bench; done
  wait
  for te in "${tes[@]}"; do [[ $(cat "$OUT/build-x$te.rc") == 0 ]] || exit 1; done
  echo "build: $(( $(date +%s) - t0 )) s"
  IFS=';' read -ra tcases <<< "${TIMELINE_CASES:-4096 4096 1 4;6144 4096 1 4;8192 8192 1 4;28672 4096 1 4;4096 14336 1 4;57344 8192 1 4;8192 8192 16 4;28672 4096 16 4}"
  for te in "${tes[@]}"; do
    echo "== build $te"
    for c in "${tcases[@]}"; do
      LUTMM_BENCH_TIMELINE=1 LUTMM_BENCH_TIMELINE_RAW=$OUT/timeline_raw-x$te.txt ./build/gpu-x$te/lutmm_bench $c lut | tail -n +2
    done | tee "$OUT/timeline-x$te.txt"
  done
  exit 0
fi
# kab: the B builds (lutmm_bench, plus lutmm_gpu_tests unless AB_SKIP_TESTS names it) start now, beside
# the default build: one after another, two B builds made a kab call ~9.5 minutes (session 25).
if [[ $MODE == ab || $MODE == kab ]]; then
  for e in ${EXPERIMENTS:-2}; do
    start_build_experiment "$e" lutmm_bench $([[ " ${AB_SKIP_TESTS:-} " == *" $e "* ]] || echo lutmm_gpu_tests)
  done
fi
cmake -S . -B build/gpu -G Ninja -DLUTMM_BUILD_TESTS=ON > "$OUT/cmake.log" 2>&1 || { tail -30 "$OUT/cmake.log"; exit 1; }
# The Python extension (its own build dir, build/py-*) builds beside the C++ targets: on 16 cores the two
# cold builds took 394 s one after the other (session 18), each mostly single-file nvcc runs.
if [[ $CXX_ONLY == 0 ]]; then
  ( python3 -m pip install -q --no-build-isolation --no-index . > "$OUT/pip.log" 2>&1; echo $? > "$OUT/pip.rc" ) &
  pip_pid=$!
fi
ninja -C build/gpu > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
if [[ $CXX_ONLY == 0 ]]; then
  wait $pip_pid
  [[ $(cat "$OUT/pip.rc") == 0 ]] || { tail -40 "$OUT/pip.log"; exit 1; }
fi
echo "build: $(( $(date +%s) - t0 )) s"
status=0
if [[ $MODE == e2e ]]; then
  python3 bench/bench_e2e.py ${E2E_ARGS:-} 2>"$OUT/e2e.err" | tee "$OUT/e2e.txt"
  exit ${PIPESTATUS[0]}
fi
if [[ $MODE == attn ]]; then  # the decode-attention kernel: its C++ and Python GPU tests, then its benchmark
  ./build/gpu/lutmm_gpu_tests --gtest_filter='GpuAttention.*' 2>&1 | tee "$OUT/attn_tests.log" | \
    grep -E "^\[  (PASSED|FAILED) |Failure|case|Expected|Which" | head -30
  python3 -m pytest -q -rfs tests/python/test_attention.py tests/python/test_generation.py tests/python/test_cli.py > "$OUT/attn_py.log" 2>&1
  echo "pytest attention + generation + cli: rc=$? $(tail -1 "$OUT/attn_py.log")"
  grep -E "^(FAILED|ERROR)|^E  " "$OUT/attn_py.log" | head -20
  python3 bench/bench_attention.py 2>"$OUT/attn.err" | tee "$OUT/attn.txt"
  exit 0
fi
if [[ $MODE != bench && $MODE != profile ]]; then
  ./build/gpu/lutmm_tests --gtest_brief=1 2>&1 | tail -3
  ./build/gpu/lutmm_gpu_tests 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "^\[  (PASSED|FAILED|SKIPPED) |Failure|rel err|OK \]" | head -40
  [[ ${PIPESTATUS[0]} == 0 ]] || status=1
  echo "C++ GPU tests: $(grep -E '^\[  (PASSED|FAILED) ' "$OUT/gpu_tests.log" | tr '\n' ' ')" >> "$OUT/recap.txt"
  : > "$OUT/pytest.log"
  if [[ $CXX_ONLY == 0 ]]; then
    # One process per file (a crash names its file), PYTEST_JOBS files at a time: one after another the
    # files took ~7 minutes on the H100 machine (their torch.compile runs are CPU-bound), which with a
    # cold build did not fit one 10-minute call (session 15).
    rm -rf /tmp/pt && mkdir -p /tmp/pt
    ls ${PYTEST_FILES:-tests/python/test_*.py} | xargs -P "${PYTEST_JOBS:-4}" -I{} bash -c \
      'n=$(basename {} .py); python3 -X faulthandler -m pytest -q -rs {} > /tmp/pt/$n.log 2>&1; echo $? > /tmp/pt/$n.rc'
    for f in $(ls ${PYTEST_FILES:-tests/python/test_*.py}); do
      n=$(basename "$f" .py); rc=$(cat "/tmp/pt/$n.rc" 2>/dev/null || echo "?")
      cat "/tmp/pt/$n.log" >> "$OUT/pytest.log"
      echo "$f: rc=$rc $(tail -1 "/tmp/pt/$n.log")" | tee -a "$OUT/recap.txt"
      if [[ $rc != 0 && $rc != 5 ]]; then status=1; grep -E -A14 "Fatal Python|^FAILED|Error" "/tmp/pt/$n.log" | head -40; fi
    done
  fi
fi
# tests: E2E_ARGS set runs bench/bench_e2e.py after the tests (one call for a change's tests and its measurement).
# With `--batches 1 16` and two configs the call ran past the 600 s limit in the demo after it (H200, cold,
# session 35): add NO_DEMO=1 there.
if [[ $MODE == tests && -n ${E2E_ARGS:-} ]]; then
  python3 bench/bench_e2e.py $E2E_ARGS 2>"$OUT/e2e.err" | tee "$OUT/e2e.txt"
fi
if [[ $MODE != bench && $CXX_ONLY == 0 && -n ${LUTMM_SHARED:-} && -z ${NO_DEMO:-} ]]; then
  python3 -m lutmm demo --max-tokens 8192 2>&1 | tee "$OUT/demo.txt" | tail -14
fi
if [[ $MODE == sanitize ]]; then  # each tool run at most SANITIZE_TIMEOUT seconds (default 240)
  st=${SANITIZE_TIMEOUT:-240}
  n=0
  # SANITIZE_EXPERIMENT=N: the tools run the tests of a -DLUTMM_EXPERIMENT=N build instead (e.g. 7, no
  # programmatic dependent launch: whether item 64's racecheck report needs overlapping launches).
  san_bin=./build/gpu/lutmm_gpu_tests
  if [[ -n ${SANITIZE_EXPERIMENT:-} ]]; then
    e=$SANITIZE_EXPERIMENT
    build_experiment "$e" lutmm_gpu_tests || exit 1
    san_bin=./build/gpu-x$e/lutmm_gpu_tests
    echo "== sanitizers on LUTMM_EXPERIMENT=$e"
  fi
  san() {  # $1: tool, $2: gtest filter, then extra compute-sanitizer flags; log in $OUT/san-N-TOOL.log
    local tool=$1 filter=$2; shift 2
    n=$((n + 1)); local log="$OUT/san-$n-$tool.log" t=$(date +%s)
    timeout $st compute-sanitizer --tool $tool "$@" $san_bin --gtest_filter="$filter" > "$log" 2>&1
    echo "== $tool $* rc=$? $(( $(date +%s) - t )) s ($filter): $(grep -E '^========= (ERROR SUMMARY|RACECHECK SUMMARY)' "$log" | tail -1)"
    grep -E "^\[  (PASSED|FAILED) " "$log" | tail -2
  }
  # SANITIZE_PROBE=N: racecheck on scripts/racecheck_probe.cu's variants (the cluster exchange's
  # pattern, a control without async copies, a real hazard, a same-CTA overwrite; 4, 5: 0 and 3 with
  # real copies), N runs each, then stop.
  if [[ -n ${SANITIZE_PROBE:-} ]]; then
    nvcc -O2 -gencode=arch=compute_90a,code=sm_90a -o build/racecheck_probe scripts/racecheck_probe.cu || exit 1
    for v in 0 1 2 3 4 5; do
      for i in $(seq "$SANITIZE_PROBE"); do
        compute-sanitizer --tool racecheck --racecheck-report all build/racecheck_probe $v > "$OUT/probe-$v.log" 2>&1
        echo "== probe variant $v run $i: rc=$? $(grep -E '^variant' "$OUT/probe-$v.log") | $(grep -E 'RACECHECK SUMMARY' "$OUT/probe-$v.log")"
        grep -m1 -E "Error: " "$OUT/probe-$v.log"
      done
    done
    exit $status
  fi
  # SANITIZE_RUN="TOOL FILTER [FLAGS...]": only that run, e.g. the cluster-exchange report of item 64 in full:
  # SANITIZE_RUN="racecheck Gpu.DecodeClusters* --racecheck-report all --print-limit 100" (compute-sanitizer
  # --help lists the flags)
  if [[ -n ${SANITIZE_RUN:-} ]]; then
    read -ra sr <<< "$SANITIZE_RUN"
    san "${sr[@]}"
    exit $status
  fi
  # The fused epilogues first (norm factors handed between warps through shared memory and named
  # barriers, items 61-63): racecheck and synccheck (barrier misuse). Known (docs/performance-log.md item 64):
  # racecheck reports "Potential WAW hazard (invalid memcpy_async synchronization)" on the cp.async
  # kernel's cluster exchange (a waited-for copy against another rank's st.shared::cluster after a
  # cluster barrier) in the epilogue test's cluster cases and in Gpu.DecodeClusters*. The probe above
  # shows the tool reports that correctly synchronized pattern like a real hazard; hence the last
  # filter leaves those tests out.
  san racecheck 'GpuEpilogue.*'
  san synccheck 'GpuEpilogue.*'
  san memcheck 'Gpu.Identity*:Gpu.DecodeKernels*:Gpu.StreamK*:Gpu.WgmmaWorkSplits*:Gpu.DecodeRowTiles*:Gpu.DecodeClusters*:GpuAttention.*:GpuEpilogue.*'
  san racecheck 'Gpu.Identity*:Gpu.DecodeKernels*:Gpu.DecodeRowTiles*:GpuAttention.*'
fi
# lutmm_bench over the default table, or over AB_CASES="N K M BITS PATH;..." (one line each; cases whose
# PATH is in AB_B_PATHS, default all, also run in the B builds).
bench_cases() {  # $1: build dir, $2: 1 for a B build
  if [[ -z ${AB_CASES:-} ]]; then "$1/lutmm_bench"; return; fi
  IFS=';' read -ra cs <<< "$AB_CASES"
  for c in "${cs[@]}"; do
    [[ $2 == 1 && -n ${AB_B_PATHS:-} && " $AB_B_PATHS " != *" ${c##* } "* ]] && continue
    # AB_CLOCKS: the case's wall-clock window after its line (ab_summary.py matches clocks.csv to it)
    local t0 line; t0=$(date +%T.%3N); line=$("$1/lutmm_bench" $c | tail -1)
    echo "$line${AB_CLOCKS:+  @$t0-$(date +%T.%3N)}"
  done
}
# Other commits' trees, carried as .carry/base, .carry/base-NAME, ... (git archive --prefix=.carry/base/
# COMMIT | tar x; echo COMMIT > .carry/base/.commit): builds each one's lutmm_bench in build/gpu-base[-NAME]
# (all at once) and prints "NAME build-dir" for each that built (kab times the cases with each: a bisection
# in one call; profile runs Nsight Compute on each). A tree's .cmake_args (one line, e.g.
# -DLUTMM_EXPERIMENT=7) configures its build: an old commit's experiment beside the default build's.
build_bases() {
  local b
  for b in .carry/base .carry/base-*; do
    [[ -d $b ]] || continue
    ( cmake -S "$b" -B "build/gpu-${b#.carry/}" -G Ninja -DLUTMM_BUILD_TESTS=ON $(cat "$b/.cmake_args" 2>/dev/null) \
        > /dev/null && \
        ninja -C "build/gpu-${b#.carry/}" lutmm_bench > "$OUT/build-${b#.carry/}.log" 2>&1 ) &
  done
  wait
  for b in .carry/base .carry/base-*; do
    [[ -x build/gpu-${b#.carry/}/lutmm_bench ]] && echo "${b#.carry/} build/gpu-${b#.carry/}"
  done
}
if [[ $MODE == ab || $MODE == kab ]]; then  # kernel A/B: default build vs -DLUTMM_EXPERIMENT=N for N in $EXPERIMENTS
  echo "== kab $(date +%T)" >> "$OUT/ab.txt"  # appended: several runs in one call keep every round
  while read -r name d; do
    { echo "== $name: $(cat ".carry/$name/.commit" 2>/dev/null) $(cat ".carry/$name/.cmake_args" 2>/dev/null)"
      bench_cases "$d" 0; } | tee -a "$OUT/ab.txt"
  done < <(build_bases)
  wait  # the B builds started before the default one
  # AB_CLOCKS=1: nvidia-smi samples SM clock, power and clock event reasons every 20 ms into clocks.csv;
  # round headers carry their start time and case lines their window, and ab_summary.py adds a table of
  # each case's clocks and power: to tell a kernel's own cost from the card's clocks. The sampler starts
  # after the wait above, which would otherwise wait for it too (it hung a call, session 35).
  if [[ -n ${AB_CLOCKS:-} ]]; then
    reasons=clocks_event_reasons.active  # the older drivers' name, where this one is not known
    nvidia-smi --query-gpu=$reasons --format=csv,noheader > /dev/null 2>&1 || reasons=clocks_throttle_reasons.active
    nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,$reasons \
      --format=csv,noheader -lms 20 > "$OUT/clocks.csv" 2>&1 &
    clocks_pid=$!
  fi
  declare -A tested=()
  # AB_ROUNDS (default 1): A and every B timed in turn, that many times (drift between rounds shows).
  for r in $(seq "${AB_ROUNDS:-1}"); do
    { echo "== A: default (round $r)${AB_CLOCKS:+ at $(date +%T.%3N)}"; bench_cases build/gpu 0; } | tee -a "$OUT/ab.txt"
    for e in ${EXPERIMENTS:-2}; do
      if [[ $(cat "$OUT/build-x$e.rc" 2>/dev/null) != 0 ]]; then
        [[ $r == 1 ]] && { echo "== B: LUTMM_EXPERIMENT=$e did not build"; tail -20 "$OUT/build-x$e.log"; }
        continue
      fi
      # AB_SKIP_TESTS: experiments that compute wrong results on purpose (ablations timing a part's cost).
      if [[ " ${AB_SKIP_TESTS:-} " == *" $e "* ]]; then t="skipped (AB_SKIP_TESTS)"
      elif [[ -z ${tested[$e]:-} ]]; then t=$(./build/gpu-x$e/lutmm_gpu_tests --gtest_brief=1 2>&1 | tee "$OUT/gpu_tests-x$e.log" |
            grep -E '^\[  PASSED  \]|FAILED TESTS?$' | tr '\n' ' '); tested[$e]=$t  # counts of passed and failed
      else t="${tested[$e]}"; fi
      echo "== B: LUTMM_EXPERIMENT=$e  (round $r, tests: $t)${AB_CLOCKS:+ at $(date +%T.%3N)}" | tee -a "$OUT/ab.txt"
      bench_cases build/gpu-x$e 1 | tee -a "$OUT/ab.txt"
    done
  done
  [[ -n ${clocks_pid:-} ]] && kill "$clocks_pid"
  # The short table last: each case's times per build over the rounds, each B build's mean over A's.
  echo "== summary ($OUT/ab_summary.txt)"
  python3 scripts/ab_summary.py "$OUT/ab.txt" | tee "$OUT/ab_summary.txt"
fi
if [[ $MODE == profile ]]; then  # Nsight Compute on single cases of the C++ benchmark
  RAW_METRICS="pipe_tensor.*(pct|per_cycle)|lts__t_(bytes|sectors)\.sum\.per_second|lts__throughput\.avg\.pct|launch__cluster"
  IFS=';' read -ra cases <<< "${PROFILE_CASES:-8192 8192 1 4;57344 8192 1 4;8192 8192 1 2}"  # ';'-separated
  # The default build, then every carried base tree (build_bases): the same cases, reports tagged by build.
  mapfile -t builds < <(echo "default build/gpu"; build_bases)
  for bd in "${builds[@]}"; do
  read -r tag d <<< "$bd"
  for cfg in "${cases[@]}"; do
    rep="$OUT/ncu_${tag}_${cfg// /_}"
    ncu --set full --import-source yes -k regex:lut_ -s 2 -c 1 -f -o "$rep" "./$d/lutmm_bench" $cfg > /dev/null 2>&1
    ncu -i "$rep.ncu-rep" --print-details all > "$rep.txt" 2>&1
    ncu -i "$rep.ncu-rep" --page raw > "$rep.raw.txt" 2>&1
    # Per-SASS-instruction samples (stall reasons) for reading offline: PROFILE_SOURCE=1
    [[ -n ${PROFILE_SOURCE:-} ]] && ncu -i "$rep.ncu-rep" --page source --csv --print-source sass 2>&1 | gzip > "$rep.sass.csv.gz"
    rm -f "$rep.ncu-rep"
    echo "== ncu [$tag] $cfg: $(grep -m1 -oE 'lut_(stream|gemm)_kernel<[^>]*>' "$rep.txt")"
    grep -E "^    (Duration|DRAM Throughput|Memory Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Theoretical Occupancy|Registers Per|Issue Slots Busy|Issued Ipc Active|No Eligible|L2 Cache Throughput|L1/TEX Cache Throughput|Cluster Size|Grid Size|Block Size|Dynamic Shared Memory Per Block|Waves Per SM|Active Warps Per|Eligible Warps|Warp Cycles Per Issued|L2 Hit Rate|Mem Busy|Max Bandwidth|Shared Memory Configuration Size|Block Limit)" "$rep.txt" | head -34
    grep -E "^    Stall|stall|cycles being stalled" "$rep.txt" | head -12
    grep -E "$RAW_METRICS" "$rep.raw.txt" | head -12
    gzip -f "$rep.raw.txt"
  done
  done
  # cuBLAS bf16 (torch.mm) on the same shapes, for comparison: PROFILE_TORCH="M N K;..."
  IFS=';' read -ra tcases <<< "${PROFILE_TORCH:-}"
  for cfg in "${tcases[@]}"; do
    read -r m n k <<< "$cfg"
    rep="$OUT/ncu_torch_${m}_${n}_${k}"
    ncu --set full -k regex:"gemm|nvjet|sm90|cutlass" -s 3 -c 1 -f -o "$rep" python3 -c "
import torch
x = torch.randn($m, $k, device='cuda', dtype=torch.bfloat16); w = torch.randn($n, $k, device='cuda', dtype=torch.bfloat16)
for _ in range(6): y = x @ w.t()
torch.cuda.synchronize()" > /dev/null 2>&1
    ncu -i "$rep.ncu-rep" --print-details all > "$rep.txt" 2>&1
    ncu -i "$rep.ncu-rep" --page raw > "$rep.raw.txt" 2>&1
    rm -f "$rep.ncu-rep"
    echo "== ncu torch.mm bf16 M N K = $cfg: $(grep -m1 -oE '^  [A-Za-z_0-9]+[^ ]*' "$rep.txt")"
    grep -E "^    (Duration|DRAM Throughput|Memory Throughput|L2 Cache Throughput|L1/TEX Cache Throughput|Compute \(SM\) Throughput|Cluster Size|Grid Size|Block Size|Registers Per|Issue Slots Busy|L2 Hit Rate)" "$rep.txt" | head -16
    grep -E "$RAW_METRICS" "$rep.raw.txt" | head -12
    gzip -f "$rep.raw.txt"
  done
fi
if [[ $MODE == cxx ]]; then
  ./build/gpu/lutmm_bench | tee "$OUT/lutmm_bench.txt"
fi
if [[ $MODE == quick || $MODE == bench ]]; then
  python3 bench/bench_kernel.py ${BENCH_ARGS:---quick} --json "$OUT/bench.json" 2>"$OUT/bench.err" | tee "$OUT/bench.txt"
  # The gated MLP's gate/up call: plain, plain + SiLU kernel, gated (GATED_ARGS set, even empty: run it)
  [[ -n ${GATED_ARGS+x} ]] && python3 bench/bench_gated.py $GATED_ARGS 2>"$OUT/gated.err" | tee "$OUT/gated.txt"
elif [[ $MODE == standard ]]; then
  python3 bench/bench_kernel.py --standard --json "$OUT/bench.json" 2>"$OUT/bench.err" | tee "$OUT/bench.txt"
elif [[ $MODE == full ]]; then
  python3 bench/bench_kernel.py --json "$OUT/bench.json" 2>"$OUT/bench.err" | tee "$OUT/bench.txt"
fi
exit $status
