// Kernel-only timing of the fused kernels (lutmm::gpu::lut_gemm, wgmma_gemm; no Python), for A/B
// builds of kernel experiments:
//   build/gpu/lutmm_bench        and   build/gpu-ff/lutmm_bench   (cmake -DLUTMM_EXPERIMENT=N)
// Random packed weights rotated over enough copies to span 3x the card's L2 (150 MB on the H100);
// each time is the median of 20 replays of a CUDA graph of calls, divided by the calls in the graph,
// after 0.5 s of untimed replays of the same graph (as bench_kernel.py's time_settled: at large M the
// card runs power-bound and a short timing measures the state the work before it left;
// performance-log.md item 79).
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "lutmm/cuda.h"
#include "lutmm/tables.h"
#include "../src/half.h"
#include "../src/cuda/timeline.h"

using namespace lutmm;

cudaError_t bench_launch_filler(void* x, int64_t n, cudaStream_t stream, bool pdl);  // bench_filler.cu

// LUTMM_BENCH_TIMELINE=1: the per-worker timeline of one call among back-to-back calls (the last of a
// graph replay), in us from that call's first worker entry, as percentiles over its workers, and the
// call before it (its first entry and last exit on the same clock). Returns false where the build
// records nothing.
static bool print_timeline(const char* label) {
  using namespace gpu::lut;  // the row layout (src/cuda/timeline.h)
  constexpr int kEv = kTlEvents, kMax = kTimelineWorkers;
  std::vector<uint64_t> cur(size_t(kMax) * kEv), prev(size_t(kMax) * kEv);
  if (gpu::decode_timeline(cur.data(), kMax, 0) == 0) return false;
  const bool have_prev = gpu::decode_timeline(prev.data(), kMax, 1) > 0;
  auto rows = [&](const std::vector<uint64_t>& t) {
    std::vector<const uint64_t*> r;
    for (int w = 0; w < kMax; ++w)
      if (t[size_t(w) * kEv + kTlEntry] != 0) r.push_back(&t[size_t(w) * kEv]);
    return r;
  };
  const auto rc = rows(cur), rp = have_prev ? rows(prev) : std::vector<const uint64_t*>{};
  if (rc.empty()) return false;
  uint64_t t0 = UINT64_MAX;
  std::vector<int> sms;
  for (auto* r : rc) { t0 = std::min(t0, r[kTlEntry]); sms.push_back(int(r[kTlSm])); }
  std::sort(sms.begin(), sms.end());
  const int n_sms = int(std::unique(sms.begin(), sms.end()) - sms.begin());
  auto us = [&](uint64_t t) { return (double(t) - double(t0)) / 1000.0; };
  std::vector<uint64_t> all;
  std::printf("  timeline: %zu workers on %d SMs, us from the call's first entry (p0 / p10 / p50 / p90 / p100)\n",
              rc.size(), n_sms);
  const char* names[] = {"entry", "dep-wait", "first data", "loop end", "exit"};
  for (int e = 0; e < kTlSm; ++e) {
    std::vector<double> v;
    for (auto* r : rc)
      if (r[e] != 0) { v.push_back(us(r[e])); all.push_back(r[e]); }
    if (v.empty()) continue;
    std::sort(v.begin(), v.end());
    auto q = [&](double f) { return v[size_t(f * double(v.size() - 1) + 0.5)]; };
    std::printf("    %-10s %7.2f %7.2f %7.2f %7.2f %7.2f\n", names[e], q(0), q(0.1), q(0.5), q(0.9), q(1));
  }
  if (!rp.empty()) {
    uint64_t p0 = UINT64_MAX, p1 = 0;
    for (auto* r : rp) { p0 = std::min(p0, r[kTlEntry]); p1 = std::max(p1, r[kTlExit]); }
    std::printf("    previous call: first entry %.2f, last exit %.2f\n", us(p0), us(p1));
  }
  std::sort(all.begin(), all.end());
  uint64_t tick = UINT64_MAX;
  for (size_t i = 1; i < all.size(); ++i)
    if (all[i] != all[i - 1]) tick = std::min(tick, all[i] - all[i - 1]);
  if (tick != UINT64_MAX) std::printf("    (smallest step between distinct timestamps: %llu ns)\n", (unsigned long long)tick);
  // LUTMM_BENCH_TIMELINE_RAW=FILE: every worker's row appended (case, worker, SM, events in ns from the
  // call's first entry), for offline reading (which SMs' workers run slow).
  if (const char* raw = std::getenv("LUTMM_BENCH_TIMELINE_RAW")) {
    if (FILE* f = std::fopen(raw, "a")) {
      for (int w = 0; w < kMax; ++w) {
        const uint64_t* r = &cur[size_t(w) * kEv];
        if (r[kTlEntry] == 0) continue;
        std::fprintf(f, "%s %d %d", label, w, int(r[kTlSm]));
        for (int e = 0; e < kTlSm; ++e) std::fprintf(f, " %lld", r[e] ? (long long)(r[e] - t0) : -1LL);
        std::fprintf(f, "\n");
      }
      std::fclose(f);
    }
  }
  return true;
}

#define CK(x)                                                                     \
  do {                                                                            \
    cudaError_t e_ = (x);                                                         \
    if (e_ != cudaSuccess) { std::printf("CUDA error %s at %d\n", cudaGetErrorString(e_), __LINE__); return 1; } \
  } while (0)

// Usage: lutmm_bench                       the table below (M <= 64: LUT kernels, larger M: wgmma kernel)
//        lutmm_bench N K M BITS [PATH]     one case, PATH = lut (dispatched decode kernel), lut80 (the
//                                          cp.async kernel forced), luttma (the TMA kernel forced), wgmma
//                                          or wgmmask (wgmma with data-parallel + Stream-K forced);
//                                          lut80sk / luttmask: that decode kernel without clusters
//                                          (Nsight Compute: ncu -k regex:lut_ -s 2 -c 1 ...)
//        lutmm_bench N K M BITS PATH gap   also timed with a memset of X before every call (X rewritten
//                                          with its own value), as in a decode step, where the kernel
//                                          before a linear is a norm or SiLU that does not let it start
//                                          early: "gap us" = (memsets + calls - memsets alone) / calls.
//                                          Back to back, each call's prologue overlaps the previous
//                                          call's tail (programmatic dependent launch); here it cannot.
//                                          Also "pdl gap us": the same with a small kernel over X launched
//                                          with programmatic dependent launch that lets the call start
//                                          after its loads, as inductor's kernels do with enable_pdl
//                                          (bench/bench_filler.cu).
//        lutmm_bench N K M BITS PATH g64   group size 64 (default 128; g0: g = K), with or without gap.
//        LUTMM_BENCH_L2_HOT=1 lutmm_bench ...  one weight copy, read from L2 after the first call.
//        LUTMM_BENCH_CONST_X=1 lutmm_bench ...  X all 0.0115 (before session 26: the default) instead of
//                                          random values in (-2, 2) (H100, 2026-11-28, 8192x8192
//                                          M = 4096 wgmma: 720.8 us constant, 732.6 random).
//        LUTMM_BENCH_SETTLE_MS=N lutmm_bench ...  N ms of untimed replays before each timing (default
//                                          500; 0: none, as before session 27).
//        LUTMM_BENCH_BIG_IO=1 lutmm_bench ...  X and Y at 2 MiB-aligned offsets of one 64 MiB allocation
//                                          (as in a caching allocator's segment) instead of cudaMallocs
//                                          of their own sizes (performance-log.md item 95: 28672x4096
//                                          at M = 1-2 timed 13% slower here than in bench_kernel.py).
//                                          LUTMM_BENCH_X_OFFSET=BYTES (a multiple of 16, below 2 MiB minus
//                                          X's bytes) moves X that far into the allocation.
//        LUTMM_BENCH_TIMELINE=1 lutmm_bench ...  after each decode case, one call's per-worker timeline
//                                          (entry, griddepcontrol.wait, first stage, loop end, exit) from a
//                                          LUTMM_EXPERIMENT=200 build of the TMA kernel (src/cuda/timeline.cuh);
//                                          LUTMM_BENCH_TIMELINE_RAW=FILE appends every worker's row to FILE.
//        LUTMM_BENCH_FOLD=rms|res lutmm_bench ...  the decode kernels with GemmProblem::rms_norm (each token's
//                                          factor computed in the kernel) or ::residual (an M x N addend):
//                                          lutmm.layerfold's calls, for their cost against plain calls.
int main(int argc, char** argv) {
  if (!gpu::available()) {
    std::printf("no CUDA device: kernel benchmark skipped\n");
    return 0;
  }
  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, 0));
  const size_t rotate_bytes = 3 * size_t(prop.l2CacheSize);  // weights rotated past the L2
  std::printf("# %s, %d SMs, L2 %d MiB\n%12s %5s %2s %4s %6s %9s %7s %8s\n", prop.name, prop.multiProcessorCount,
              prop.l2CacheSize >> 20, "N x K", "M", "b",
              "g", "path", "us", "TB/s", "TFLOP/s");
  enum Kind { kLut, kLut80, kLutTma, kWgmma, kWgmmaSk, kLut80Sk, kLutTmaSk };
  const char* kind_name[] = {"lut", "lut80", "luttma", "wgmma", "wgmmask", "lut80sk", "luttmask"};
  struct Case { int64_t N, K, M; int bits; Kind kind; };
  const bool have_wgmma = gpu::wgmma_supported(0);
  std::vector<Case> cases;
  // On Hopper, M <= 16 runs both decode kernels forced in the same run, for the A/B.
  auto decode = [&](int64_t N, int64_t K, int64_t M, int bits) {
    if (have_wgmma && M <= 16) {
      cases.push_back({N, K, M, bits, kLut80});
      cases.push_back({N, K, M, bits, kLutTma});
    } else {
      cases.push_back({N, K, M, bits, kLut});
    }
  };
  for (auto nk : {std::pair<int64_t, int64_t>{4096, 4096}, {8192, 8192}, {28672, 4096}, {57344, 8192}})
    for (int64_t M : {1, 16, 64}) decode(nk.first, nk.second, M, 4);
  for (int bits : {3, 2}) decode(8192, 8192, 1, bits);
  for (auto nk : {std::pair<int64_t, int64_t>{6144, 4096}, {4096, 14336}}) decode(nk.first, nk.second, 1, 4);
  if (have_wgmma)
    for (auto nk : {std::pair<int64_t, int64_t>{4096, 4096}, {8192, 8192}, {28672, 4096}, {4096, 14336}})
      for (int64_t M : {128, 256, 1024, 4096}) cases.push_back({nk.first, nk.second, M, 4, kWgmma});
  if (argc >= 5) {
    const std::string path = argc >= 6 ? argv[5] : "lut";
    const Kind kind = path == "wgmma" ? kWgmma : path == "wgmmask" ? kWgmmaSk : path == "lut80" ? kLut80
                      : path == "luttma" ? kLutTma : path == "lut80sk" ? kLut80Sk : path == "luttmask" ? kLutTmaSk : kLut;
    if ((kind == kWgmma || kind == kWgmmaSk) && !have_wgmma) { std::printf("wgmma path not supported here\n"); return 1; }
    cases = {{std::atoll(argv[1]), std::atoll(argv[2]), std::atoll(argv[3]), std::atoi(argv[4]), kind}};
  }
  // After PATH, in any order: "gap" (above) and gNN, the group size (default 128; 0: g = K).
  bool gap = false;
  int64_t group = 128;
  for (int i = 6; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "gap") gap = true;
    else if (a.size() > 1 && a[0] == 'g' && a.find_first_not_of("0123456789", 1) == std::string::npos) group = std::atoll(a.c_str() + 1);
    else { std::printf("unknown argument %s (gap, or gNN: the group size)\n", a.c_str()); return 1; }
  }
  const std::string fold = std::getenv("LUTMM_BENCH_FOLD") ? std::getenv("LUTMM_BENCH_FOLD") : "";
  const bool const_x = std::getenv("LUTMM_BENCH_CONST_X") != nullptr;
  const bool big_io = std::getenv("LUTMM_BENCH_BIG_IO") != nullptr;
  constexpr size_t kBigIoBytes = size_t(64) << 20, kBigIoAlign = size_t(2) << 20;
  const char* settle_env = std::getenv("LUTMM_BENCH_SETTLE_MS");
  const int settle_ms = settle_env ? std::atoi(settle_env) : 500;
  if (!fold.empty() && fold != "rms" && fold != "res") { std::printf("LUTMM_BENCH_FOLD: rms or res\n"); return 1; }
  std::mt19937 rng(1);
  cudaStream_t st;
  CK(cudaStreamCreate(&st));
  for (const Case& c : cases) {
    Shape s{c.N, c.K, c.bits, group == 0 ? c.K : group};
    const size_t wbytes = size_t(s.packed_bytes()), sbytes = size_t(s.packed_scale_count()) * 2;
    // LUTMM_BENCH_L2_HOT=1: one copy, so every call after the first reads its weights from L2 (what an L2
    // prefetch issued during the kernels before a linear would give it); the graph still holds 16 calls.
    const bool hot = std::getenv("LUTMM_BENCH_L2_HOT") != nullptr;
    const int copies = hot ? 1 : int(std::min<size_t>(16, std::max<size_t>(1, rotate_bytes / (wbytes + sbytes) + 1)));
    const int calls_per_graph = hot ? 16 : copies;
    std::vector<void*> w(copies), sc(copies);
    std::vector<uint8_t> hw(wbytes);
    std::vector<uint16_t> hs(sbytes / 2);
    for (int i = 0; i < copies; ++i) {
      for (auto& b : hw) b = uint8_t(rng());
      for (auto& v : hs) v = uint16_t(0x2000 + rng() % 0x800);  // fp16 in ~[0.008, 0.03]
      CK(cudaMalloc(&w[i], wbytes));
      CK(cudaMalloc(&sc[i], sbytes));
      CK(cudaMemcpy(w[i], hw.data(), wbytes, cudaMemcpyHostToDevice));
      CK(cudaMemcpy(sc[i], hs.data(), sbytes, cudaMemcpyHostToDevice));
    }
    void *x, *y, *ws, *res = nullptr, *io = nullptr;
    if (fold == "res") {
      CK(cudaMalloc(&res, size_t(c.M * c.N) * 2));
      CK(cudaMemset(res, 0x3c, size_t(c.M * c.N) * 2));
    }
    if (big_io) {
      if (size_t(c.M * c.K) * 2 > kBigIoAlign || size_t(c.M * c.N) * 2 > kBigIoBytes - kBigIoAlign) {
        std::printf("LUTMM_BENCH_BIG_IO: X or Y too large for its 64 MiB allocation\n");
        return 1;
      }
      const char* off_env = std::getenv("LUTMM_BENCH_X_OFFSET");
      const long long x_off = off_env ? std::atoll(off_env) : 0;
      if (x_off < 0 || x_off % 16 != 0 || size_t(x_off) + size_t(c.M * c.K) * 2 > kBigIoAlign) {
        std::printf("LUTMM_BENCH_X_OFFSET: a multiple of 16 with X inside the first 2 MiB\n");
        return 1;
      }
      CK(cudaMalloc(&io, kBigIoBytes));
      x = static_cast<char*>(io) + x_off;
      y = static_cast<char*>(io) + kBigIoAlign;
    } else {
      CK(cudaMalloc(&x, size_t(c.M * c.K) * 2));
    }
    if (const_x) {
      CK(cudaMemset(x, 0x3c, size_t(c.M * c.K) * 2));  // bf16 ~0.01: finite, non-zero
    } else {  // random bf16 in (-2, 2): as bench_kernel.py's randn, the tensor cores' power draw is real
      std::vector<uint16_t> hx(size_t(c.M * c.K));
      uint32_t st32 = 0x9e3779b9u;
      for (auto& v : hx) {
        st32 ^= st32 << 13; st32 ^= st32 >> 17; st32 ^= st32 << 5;  // xorshift32
        v = float_to_bf16(float(int32_t(st32)) * (2.f / 2147483648.f));
      }
      CK(cudaMemcpy(x, hx.data(), hx.size() * 2, cudaMemcpyHostToDevice));
    }
    if (!big_io) CK(cudaMalloc(&y, size_t(c.M * c.N) * 2));
    const bool wg = c.kind == kWgmma || c.kind == kWgmmaSk;
    const size_t wsb = wg ? gpu::wgmma_workspace_bytes(c.M, s, 0) : gpu::workspace_bytes(c.M, s, 0);
    CK(cudaMalloc(&ws, std::max<size_t>(wsb, 16)));
    CK(cudaMemset(ws, 0, wsb));
    const std::vector<float> t = nf_table(c.bits);
    auto call = [&](int i) {
      gpu::GemmProblem p;
      p.x = x; p.dtype = DType::BF16; p.M = c.M; p.shape = s; p.packed = w[i];
      p.packed_scales = static_cast<const uint16_t*>(sc[i]); p.y = y;
      for (size_t j = 0; j < t.size(); ++j) p.table[j] = t[j];
      if (!wg) {
        p.rms_norm = fold == "rms";
        p.rms_eps = 1e-5f;
        p.residual = res;
      }
      if (wg) gpu::wgmma_gemm(p, ws, wsb, st, c.kind == kWgmmaSk ? gpu::WgSplit::kStreamK : gpu::WgSplit::kAuto);
      else gpu::lut_gemm(p, ws, wsb, st,
                         c.kind == kLut80 || c.kind == kLut80Sk ? gpu::LutKernel::kCpAsync
                         : c.kind == kLutTma || c.kind == kLutTmaSk ? gpu::LutKernel::kTma : gpu::LutKernel::kAuto,
                         c.kind == kLut80Sk || c.kind == kLutTmaSk ? gpu::DecodeSplit::kStreamK : gpu::DecodeSplit::kAuto);
    };
    for (int i = 0; i < copies; ++i) call(i);  // warm-up
    CK(cudaStreamSynchronize(st));
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    // Median us per call over 20 replays of a graph of `copies` calls, each after `before` (0 nothing,
    // 1 a memset of X, 2 the PDL filler kernel over X); calls = false: the `before` nodes alone.
    // A graph of calls_per_graph back-to-back calls, each after a memset of X (before = 1) or a small
    // kernel over X with programmatic dependent launch (2); calls = false: those alone.
    auto capture = [&](int before, bool calls, cudaGraph_t* graph, cudaGraphExec_t* exec) -> int {
      CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
      for (int i = 0; i < calls_per_graph; ++i) {
        if (before == 1) CK(cudaMemsetAsync(x, 0x3c, size_t(c.M * c.K) * 2, st));
        if (before == 2) CK(bench_launch_filler(x, c.M * c.K, st, true));
        if (calls) call(i % copies);
      }
      CK(cudaStreamEndCapture(st, graph));
      CK(cudaGraphInstantiate(exec, *graph, 0));
      return 0;
    };
    auto time_graph = [&](int before, bool calls, float* med) -> int {
      cudaGraph_t graph;
      cudaGraphExec_t exec;
      if (capture(before, calls, &graph, &exec)) return 1;
      const auto settle_end = std::chrono::steady_clock::now() + std::chrono::milliseconds(settle_ms);
      while (std::chrono::steady_clock::now() < settle_end) {
        for (int r = 0; r < 8; ++r) CK(cudaGraphLaunch(exec, st));
        CK(cudaStreamSynchronize(st));
      }
      std::vector<float> us;
      for (int r = 0; r < 21; ++r) {
        CK(cudaEventRecord(a, st));
        CK(cudaGraphLaunch(exec, st));
        CK(cudaEventRecord(b, st));
        CK(cudaEventSynchronize(b));
        float ms = 0;
        CK(cudaEventElapsedTime(&ms, a, b));
        if (r > 0) us.push_back(ms * 1000.f / float(calls_per_graph));
      }
      std::sort(us.begin(), us.end());
      *med = us[us.size() / 2];
      cudaGraphExecDestroy(exec);
      cudaGraphDestroy(graph);
      return 0;
    };
    float med = 0, with_memsets = 0, memsets_only = 0, with_fillers = 0, fillers_only = 0;
    if (time_graph(0, true, &med)) return 1;
    if (gap && (time_graph(1, true, &with_memsets) || time_graph(1, false, &memsets_only) ||
                time_graph(2, true, &with_fillers) || time_graph(2, false, &fillers_only)))
      return 1;
    std::printf("%6lldx%-6lld %5lld %2d %4d %6s %9.1f %7.2f %8.1f", (long long)c.N, (long long)c.K, (long long)c.M,
                c.bits, int(s.group_size), kind_name[c.kind], med, double(wbytes + sbytes) / med / 1e6,
                2.0 * double(c.M) * double(c.N) * double(c.K) / med / 1e6);
    if (!fold.empty() && !wg) std::printf("   +%s", fold.c_str());
    if (c.kind == kWgmma) std::printf("   cluster %d", gpu::wgmma_cluster_size(c.M, s, 0));
    if (gap)
      std::printf("   gap us %6.1f (memset alone %4.1f)  pdl gap us %6.1f (filler alone %4.1f)",
                  with_memsets - memsets_only, memsets_only, with_fillers - fillers_only, fillers_only);
    std::printf("\n");
    // The timeline of the last call of one replay of a fresh graph of back-to-back calls (launch order
    // sets timeline.cuh's slots at capture, so nothing else may launch between the capture and the read).
    if (std::getenv("LUTMM_BENCH_TIMELINE") && !wg) {
      gpu::decode_timeline_clear();
      cudaGraph_t graph;
      cudaGraphExec_t exec;
      if (capture(0, true, &graph, &exec)) return 1;
      for (int r = 0; r < 3; ++r) CK(cudaGraphLaunch(exec, st));
      CK(cudaStreamSynchronize(st));
      char label[64];
      std::snprintf(label, sizeof label, "%lldx%lld/%lld/%d", (long long)c.N, (long long)c.K, (long long)c.M, c.bits);
      if (!print_timeline(label)) std::printf("  timeline: not recorded (a LUTMM_EXPERIMENT=200 build of the TMA decode kernel records it)\n");
      cudaGraphExecDestroy(exec);
      cudaGraphDestroy(graph);
    }
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    for (int i = 0; i < copies; ++i) { cudaFree(w[i]); cudaFree(sc[i]); }
    if (big_io) cudaFree(io);
    else { cudaFree(x); cudaFree(y); }
    cudaFree(ws); cudaFree(res);
  }
  return 0;
}
