// GPU differential tests: the fused kernels (LUT decode kernel, wgmma prefill kernel) and the dequant
// kernel against the CPU reference.
// Without a CUDA device every test skips and says so.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <random>

#include "lutmm/cuda.h"
#include "lutmm/pack.h"
#include "lutmm/reference.h"
#include "lutmm/tables.h"
#include "../../src/plan.h"
#include "gpu_layer.h"
#include "gpu_test_util.h"
#include "test_util.h"

using namespace lutmm;
using namespace lutmm_test;

// `cases` random problems through `path` against the CPU reference. M mostly small for the LUT path,
// mostly above 64 (where dispatch sends it) for the wgmma path; every shape, bits, g, dtype, table.
void randomized_against_reference(gpu::Path path, int cases, uint32_t seed,
                                  gpu::LutKernel kernel = gpu::LutKernel::kAuto) {
  std::mt19937 rng(seed);
  Workspace ws;
  int failures = 0;
  for (int c = 0; c < cases; ++c) {
    const int bits = 2 + int(rng() % 3);
    const int64_t gs[] = {32, 64, 128, 256, 0};
    int64_t g = gs[rng() % 5];
    int64_t M;
    const int r = int(rng() % 10);
    if (kernel == gpu::LutKernel::kTma) M = 1 + int64_t(rng() % gpu::tma_decode_max_m(0));
    else if (path == gpu::Path::kWgmma) M = r < 2 ? 1 + int64_t(rng() % 64) : r < 9 ? 65 + int64_t(rng() % 300) : 1 + int64_t(rng() % 1100);
    else if (r < 6) M = 1 + int64_t(rng() % 17);
    else if (r < 9) M = 1 + int64_t(rng() % 80);
    else M = 1 + int64_t(rng() % 512);
    const int64_t N = 1 + int64_t(rng() % (M > 100 ? 200 : 700));
    int64_t K = 32 * (1 + int64_t(rng() % (M > 100 ? 12 : 40)));
    if (g == 0) g = K;                               // one group per row
    if (K % g) K = g * (1 + int64_t(rng() % 4));     // keep K a multiple of g
    const DType dt = (rng() % 2) ? DType::BF16 : DType::F16;
    Shape s{N, K, bits, g};
    Layer L = make_layer(s, dt, rng, int(rng() % 3));
    std::vector<uint16_t> x(size_t(M * K));
    std::normal_distribution<float> nd(0.f, 1.f);
    std::vector<float> xf(x.size());
    for (size_t i = 0; i < x.size(); ++i) { x[i] = to_dtype(nd(rng), dt); xf[i] = from_dtype(x[i], dt); }
    std::vector<uint16_t> bias{};
    bias.resize(size_t(N));
    std::vector<float> biasf{};
    biasf.resize(size_t(N));
    const bool use_bias = rng() % 2;
    for (int64_t n = 0; n < N; ++n) { bias[size_t(n)] = to_dtype(nd(rng), dt); biasf[size_t(n)] = from_dtype(bias[size_t(n)], dt); }
    ws.ensure(ws_need(path, M, s));
    auto y = run_gpu(L, x, M, dt, use_bias ? &bias : nullptr, ws.p, ws.bytes, path, kernel);
    std::vector<float> ref(size_t(M * N));
    reference_matmul(xf.data(), DType::F32, M, L.codes.data(), L.scales.data(), L.table_rounded.data(), s,
                     use_bias ? biasf.data() : nullptr, ref.data());
    const double err = rel_err(y, ref), tol = dt == DType::BF16 ? 6e-3 : 1.5e-3;
    if (!(err < tol)) {
      if (++failures < 10)
        ADD_FAILURE() << "path " << int(path) << " kernel " << int(kernel) << " case " << c << ": M=" << M << " N=" << N << " K=" << K << " bits=" << bits << " g=" << g
                      << " dtype=" << dtype_name(dt) << " rel err " << err;
    }
  }
  EXPECT_EQ(failures, 0) << "of " << cases << " cases";
}

TEST(Gpu, RandomizedAgainstReference) {
  REQUIRE_GPU();
  randomized_against_reference(gpu::Path::kLut, 1500, 12345);
}

#define REQUIRE_WGMMA()                                                   \
  REQUIRE_GPU();                                                          \
  if (!gpu::wgmma_supported(0)) GTEST_SKIP() << "not an sm_90 GPU: wgmma test skipped"

// The two decode kernels forced, whatever dispatch would pick: the TMA kernel (Hopper, M <= 16;
// dispatch gives it only large weights) and the cp.async kernel (everywhere; the test above covers it
// on other GPUs).
TEST(Gpu, TmaDecodeKernelRandomizedAgainstReference) {
  REQUIRE_WGMMA();
  randomized_against_reference(gpu::Path::kLut, 800, 777, gpu::LutKernel::kTma);
}
TEST(Gpu, CpAsyncDecodeKernelRandomizedAgainstReference) {
  REQUIRE_WGMMA();
  randomized_against_reference(gpu::Path::kLut, 400, 778, gpu::LutKernel::kCpAsync);
}

// Both decode kernels, token slices of an identity: X = rows k0..k0+M-1 of I gives the dequantized
// weight's columns exactly (one product per output, whatever the Stream-K split). M = 5, 16 and 32 (the
// decode kernels' token tilings of 8, 16 and 32, rows >= M zeroed), N = 77 (a partial tile), K = 352 (a partial last
// k-block).
TEST(Gpu, DecodeKernelsGiveDequantizedColumnsExactly) {
  REQUIRE_GPU();
  std::mt19937 rng(8);
  Workspace ws;
  for (int bits : {2, 3, 4})
    for (DType dt : {DType::F16, DType::BF16}) {
      Shape s{77, 352, bits, 32};
      Layer L = make_layer(s, dt, rng, 2);
      std::vector<float> w(size_t(s.N * s.K));
      dequantize(L.codes.data(), L.scales.data(), L.table_rounded.data(), s, w.data());
      for (int64_t M : {5, 16, 32})
        for (gpu::LutKernel kernel : {gpu::LutKernel::kCpAsync, gpu::LutKernel::kTma}) {
          if (kernel == gpu::LutKernel::kTma && !gpu::wgmma_supported(0)) continue;
          ws.ensure(gpu::workspace_bytes(M, s, 0));
          for (int64_t k0 = 0; k0 + M <= s.K; k0 += M) {
            std::vector<uint16_t> x(size_t(M * s.K), to_dtype(0.f, dt));
            for (int64_t i = 0; i < M; ++i) x[size_t(i * s.K + k0 + i)] = to_dtype(1.f, dt);
            auto y = run_gpu(L, x, M, dt, nullptr, ws.p, ws.bytes, gpu::Path::kLut, kernel);
            for (int64_t i = 0; i < M; ++i)
              for (int64_t n = 0; n < s.N; ++n)
                ASSERT_EQ(to_dtype(y[size_t(i * s.N + n)], dt), to_dtype(w[size_t(n * s.K + k0 + i)], dt))
                    << "bits " << bits << " M " << M << " kernel " << int(kernel) << " n " << n << " k " << k0 + i;
          }
        }
    }
}

TEST(Gpu, WgmmaRandomizedAgainstReference) {
  REQUIRE_WGMMA();
  randomized_against_reference(gpu::Path::kWgmma, 600, 4242);
}

TEST(Gpu, DispatchBoundaries) {
  REQUIRE_GPU();
  const Shape small{4096, 4096, 4, 128}, big{8192, 8192, 4, 128};
  const bool wgmma = gpu::wgmma_supported(0);
  const gpu::Path mid = wgmma ? gpu::Path::kWgmma : gpu::Path::kDequant;
  for (const Shape& s : {small, big}) {
    EXPECT_EQ(gpu::choose_path(1, s, DType::BF16, 0), gpu::Path::kLut);
    EXPECT_EQ(gpu::choose_path(32, s, DType::BF16, 0), gpu::Path::kLut);
    // 33..64: the wgmma kernel's 64-token tiles on Hopper, else the LUT kernels
    EXPECT_EQ(gpu::choose_path(33, s, DType::BF16, 0), wgmma ? gpu::Path::kWgmma : gpu::Path::kLut);
    EXPECT_EQ(gpu::choose_path(64, s, DType::BF16, 0), wgmma ? gpu::Path::kWgmma : gpu::Path::kLut);
    EXPECT_EQ(gpu::choose_path(65, s, DType::BF16, 0), mid);
    EXPECT_EQ(gpu::choose_path(256, s, DType::BF16, 0), mid);
    EXPECT_EQ(gpu::choose_path(1024, s, DType::BF16, 0), mid);
    EXPECT_EQ(gpu::choose_path(3584, s, DType::BF16, 0), mid);
    EXPECT_EQ(gpu::choose_path(3585, s, DType::BF16, 0), gpu::Path::kDequant);
    EXPECT_EQ(gpu::choose_path(4096, s, DType::BF16, 0), gpu::Path::kDequant);
    const Shape s3{s.N, s.K, 3, 128};  // 3 bits hands over to dequantize + cuBLAS earlier
    EXPECT_EQ(gpu::choose_path(2048, s3, DType::BF16, 0), mid);
    EXPECT_EQ(gpu::choose_path(2049, s3, DType::BF16, 0), gpu::Path::kDequant);
  }
  // Which decode kernel (items 66, 68, 85): on sm_90 the TMA kernel takes large weights at M <= 16
  // (H100: from 32M, 24M at 3 bits; cards of >= 4 TB/s peak DRAM bandwidth, the H200: also every
  // weight with K >= 2048) and every weight at M = 17-32 (32-token tiles). Other weights at M = 9-16
  // stay on the cp.async kernel.
  const bool tma = gpu::tma_decode_max_m(0) > 0;
  const double peak_bytes_per_s = gpu::peak_dram_bytes_per_s(0);
  EXPECT_GT(peak_bytes_per_s, 0.0) << "the driver reports no memory clock or bus width";
  const bool fast_hbm = peak_bytes_per_s >= gpu::kFastHbmBytesPerS;
  std::printf("peak DRAM %.2f TB/s: %s\n", peak_bytes_per_s / 1e12,
              fast_hbm ? "the TMA decode kernel for every K >= 2048 at M <= 16" : "the H100's size thresholds");
  for (int bits : {2, 3, 4}) {
    // small4k: K = 4096, 4M weights; short_k: K = 1024, below every threshold.
    const Shape small4k{1024, 4096, bits, 128}, mid4k{4096, 4096, bits, 128}, wide{2048, 8192, bits, 128},
        short_k{1024, 1024, bits, 128};
    for (const Shape& s : {small4k, mid4k, wide, short_k}) {
      const std::string what = "N=" + std::to_string(s.N) + " K=" + std::to_string(s.K) + " bits=" + std::to_string(bits);
      EXPECT_EQ(gpu::decode_plan(16, s, DType::BF16, 0).tma, tma && fast_hbm && s.K >= gpu::kTmaMinKFastHbm) << what;
      for (int64_t M : {17, 24, 32}) EXPECT_EQ(gpu::decode_plan(M, s, DType::F16, 0).tma, tma) << what << " M=" << M;
    }
    EXPECT_EQ(gpu::decode_plan(16, Shape{8192, 8192, bits, 128}, DType::BF16, 0).tma, tma) << "8192x8192 bits=" << bits;
  }
}

TEST(Gpu, IdentityGivesDequantizedWeightsExactly) {
  REQUIRE_GPU();
  std::mt19937 rng(7);
  Workspace ws;
  for (int bits : {2, 3, 4})
    for (DType dt : {DType::F16, DType::BF16}) {
      Shape s{77, 256, bits, 32};  // M = K = 256: two token tiles of the wgmma kernel
      Layer L = make_layer(s, dt, rng, 2);
      const int64_t M = s.K;
      std::vector<uint16_t> x(size_t(M * s.K), to_dtype(0.f, dt));
      for (int64_t i = 0; i < M; ++i) x[size_t(i * s.K + i)] = to_dtype(1.f, dt);
      std::vector<float> w(size_t(s.N * s.K));
      dequantize(L.codes.data(), L.scales.data(), L.table_rounded.data(), s, w.data());
      for (gpu::Path path : {gpu::Path::kLut, gpu::Path::kWgmma}) {
        if (path == gpu::Path::kWgmma && !gpu::wgmma_supported(0)) continue;
        ws.ensure(ws_need(path, M, s));
        auto y = run_gpu(L, x, M, dt, nullptr, ws.p, ws.bytes, path);
        // The wgmma path scales bf16 weights with a split-scale fma: within 1 ulp, rarely off.
        const bool near = path == gpu::Path::kWgmma && dt == DType::BF16;
        int64_t off_by_one = 0;
        for (int64_t k = 0; k < s.K; ++k)
          for (int64_t n = 0; n < s.N; ++n) {
            const uint16_t want = to_dtype(w[size_t(n * s.K + k)], dt), got = to_dtype(y[size_t(k * s.N + n)], dt);
            if (near && got != want && (got ^ want) < 0x8000 && (got > want ? got - want : want - got) == 1) {
              ++off_by_one;
              continue;
            }
            ASSERT_EQ(got, want) << "path " << int(path) << " bits " << bits << " n " << n << " k " << k;
          }
        EXPECT_LE(off_by_one, s.N * s.K / 50) << "bits " << bits;
      }
      // The dequant kernel gives the same values.
      DevBuf<uint8_t> dw(L.packed), ds(L.packed_scales), dout(size_t(s.N * s.K) * 2);
      gpu::dequantize(dw.p, reinterpret_cast<uint16_t*>(ds.p), L.table.data(), s, dt, dout.p, nullptr);
      CK(cudaDeviceSynchronize());
      std::vector<uint16_t> wd(size_t(s.N * s.K));
      cudaMemcpy(wd.data(), dout.p, wd.size() * 2, cudaMemcpyDeviceToHost);
      for (size_t i = 0; i < wd.size(); ++i) ASSERT_EQ(from_dtype(wd[i], dt), from_dtype(to_dtype(w[i], dt), dt)) << i;
    }
}

TEST(Gpu, StreamKIsDeterministic) {
  REQUIRE_GPU();
  std::mt19937 rng(99);
  Workspace ws;
  for (auto shp : {Shape{256, 8192, 4, 128}, Shape{4096, 4096, 3, 64}, Shape{1000, 2048, 2, 32}}) {
    for (int64_t M : {1, 16, 24, 40}) {
      Layer L = make_layer(shp, DType::BF16, rng, 0);
      std::vector<uint16_t> x(size_t(M * shp.K));
      std::normal_distribution<float> nd(0.f, 1.f);
      for (auto& v : x) v = float_to_bf16(nd(rng));
      ws.ensure(gpu::workspace_bytes(M, shp, 0));
      auto y0 = run_gpu(L, x, M, DType::BF16, nullptr, ws.p, ws.bytes);
      for (int rep = 0; rep < 3; ++rep) {
        auto y = run_gpu(L, x, M, DType::BF16, nullptr, ws.p, ws.bytes);
        ASSERT_EQ(std::memcmp(y.data(), y0.data(), y.size() * 4), 0) << "run " << rep << " differs, N=" << shp.N;
      }
      // Each decode kernel forced: deterministic too, and equal to the dispatched one up to rounding
      // (a different Stream-K split sums in another order).
      for (gpu::LutKernel kernel : {gpu::LutKernel::kCpAsync, gpu::LutKernel::kTma}) {
        if (kernel == gpu::LutKernel::kTma && M > gpu::tma_decode_max_m(0)) continue;
        auto yk = run_gpu(L, x, M, DType::BF16, nullptr, ws.p, ws.bytes, gpu::Path::kLut, kernel);
        auto yk2 = run_gpu(L, x, M, DType::BF16, nullptr, ws.p, ws.bytes, gpu::Path::kLut, kernel);
        ASSERT_EQ(std::memcmp(yk.data(), yk2.data(), yk.size() * 4), 0) << "kernel " << int(kernel) << " N=" << shp.N;
        EXPECT_LT(rel_err(yk, y0), 3e-3) << "kernel " << int(kernel) << " N=" << shp.N << " M=" << M;
      }
    }
  }
}

// Decode kernels on the tile-aligned split (fewer tiles than workers, C workers per tile dividing
// the k-blocks: each worker one fixup at the end of its range) against the CPU reference.
TEST(Gpu, TileAlignedDecodeSplitAgainstReference) {
  REQUIRE_GPU();
  std::mt19937 rng(96);
  Workspace ws;
  // On an H100 (2 CTAs per SM at 4 bits): 64 tiles x 4 workers, 32 x 8 (C divides 64, 112 k-blocks).
  for (auto [shp, M] : {std::pair{Shape{8192, 8192, 4, 128}, int64_t(1)}, std::pair{Shape{8192, 8192, 4, 128}, int64_t(16)},
                        std::pair{Shape{4096, 14336, 4, 64}, int64_t(3)}}) {
    Layer L = make_layer(shp, DType::BF16, rng, 2);
    std::vector<uint16_t> x(size_t(M * shp.K));
    std::vector<float> xf(x.size());
    std::normal_distribution<float> nd(0.f, 1.f);
    for (size_t i = 0; i < x.size(); ++i) { x[i] = float_to_bf16(nd(rng)); xf[i] = bf16_to_float(x[i]); }
    std::vector<float> ref(size_t(M * shp.N));
    reference_matmul(xf.data(), DType::F32, M, L.codes.data(), L.scales.data(), L.table_rounded.data(), shp, nullptr,
                     ref.data());
    ws.ensure(gpu::workspace_bytes(M, shp, 0));
    for (gpu::LutKernel kernel : {gpu::LutKernel::kAuto, gpu::LutKernel::kCpAsync}) {
      auto y = run_gpu(L, x, M, DType::BF16, nullptr, ws.p, ws.bytes, gpu::Path::kLut, kernel);
      auto y2 = run_gpu(L, x, M, DType::BF16, nullptr, ws.p, ws.bytes, gpu::Path::kLut, kernel);
      ASSERT_EQ(std::memcmp(y.data(), y2.data(), y.size() * 4), 0) << "N=" << shp.N << " M=" << M << " not reproducible";
      EXPECT_LT(rel_err(y, ref), 6e-3) << "N=" << shp.N << " K=" << shp.K << " M=" << M << " kernel " << int(kernel);
    }
  }
}

// One decode-split test case: a layer with a random table (g = 0 means g = K), M random tokens, a
// random bias (used when `bias`), and the CPU reference output with that bias.
struct DecodeCase {
  Layer L;
  std::vector<uint16_t> x, bias;
  std::vector<float> ref;
};
DecodeCase make_decode_case(Shape s, int64_t M, DType dt, bool bias, std::mt19937& rng) {
  if (s.group_size == 0) s.group_size = s.K;
  DecodeCase c{make_layer(s, dt, rng, 2), std::vector<uint16_t>(size_t(M * s.K)), std::vector<uint16_t>(size_t(s.N)), {}};
  std::vector<float> xf(c.x.size()), biasf(c.bias.size());
  std::normal_distribution<float> nd(0.f, 1.f);
  for (size_t i = 0; i < c.x.size(); ++i) { c.x[i] = to_dtype(nd(rng), dt); xf[i] = from_dtype(c.x[i], dt); }
  for (size_t i = 0; i < c.bias.size(); ++i) { c.bias[i] = to_dtype(nd(rng), dt); biasf[i] = from_dtype(c.bias[i], dt); }
  c.ref.resize(size_t(M * s.N));
  reference_matmul(xf.data(), DType::F32, M, c.L.codes.data(), c.L.scales.data(), c.L.table_rounded.data(), s,
                   bias ? biasf.data() : nullptr, c.ref.data());
  return c;
}

// Runs decode case `dc` on `kernel` with the dispatched split twice (bitwise the same output) and once
// forced to Stream-K (DecodeSplit::kStreamK); both within the dtype's tolerance of the CPU reference.
// `what` names the call in failure messages.
struct SplitRuns {
  std::vector<float> y, ysk;  // dispatched split, Stream-K
  double tol;                 // the dtype's tolerance (relative error)
};
SplitRuns run_split_and_stream_k(const DecodeCase& dc, int64_t M, DType dt, bool bias, const Workspace& ws,
                                 gpu::LutKernel kernel, const std::string& what) {
  const auto* b = bias ? &dc.bias : nullptr;
  SplitRuns r{run_gpu(dc.L, dc.x, M, dt, b, ws.p, ws.bytes, gpu::Path::kLut, kernel), {},
              dt == DType::BF16 ? 6e-3 : 1.5e-3};
  const auto y2 = run_gpu(dc.L, dc.x, M, dt, b, ws.p, ws.bytes, gpu::Path::kLut, kernel);
  r.ysk = run_gpu(dc.L, dc.x, M, dt, b, ws.p, ws.bytes, gpu::Path::kLut, kernel, gpu::WgSplit::kAuto,
                  gpu::DecodeSplit::kStreamK);
  EXPECT_EQ(std::memcmp(r.y.data(), y2.data(), r.y.size() * 4), 0) << what << ": not reproducible";
  EXPECT_LT(rel_err(r.y, dc.ref), r.tol) << what;
  EXPECT_LT(rel_err(r.ysk, dc.ref), r.tol) << what << " (Stream-K)";
  return r;
}

// Decode clusters (few tiles: 2, 4 or 8 CTAs per tile reduce through distributed shared memory)
// against the CPU reference and against the same kernel forced to Stream-K: bitwise equal where both
// use the same split (they add the same partials in the same order), close otherwise; both decode
// kernels, every bits, M = 1..32 (the cp.async kernel's 8, 16 and 32-token tiles), rows past N, a
// partial last k-block, bias, fp16.
TEST(Gpu, DecodeClustersAgainstStreamKAndReference) {
  REQUIRE_WGMMA();
  std::mt19937 rng(95);
  Workspace ws;
  struct Case { Shape s; int64_t M; DType dt; bool bias; };
  // Plans on an H100 (printed below): clusters where Stream-K cuts tiles into > 8 pieces or unevenly;
  // 4096x4096 and 8192x8192 stay Stream-K there (too few clusters of 8 / 4 fit), clusters elsewhere.
  const Case cases[] = {{Shape{4096, 4096, 4, 128}, 1, DType::BF16, false},  // 32 tiles: 8 per tile
                        {Shape{8192, 8192, 4, 128}, 16, DType::BF16, true},  // 64 tiles: 4 per tile
                        {Shape{1024, 4096, 2, 64}, 3, DType::F16, false},    // 8 tiles: 8 instead of 32 pieces
                        {Shape{6144, 4096, 3, 32}, 1, DType::BF16, true},    // 48 tiles: 4 instead of Stream-K
                        {Shape{777, 992, 4, 0}, 9, DType::F16, true},        // rows past N, g = K, partial k-block
                        {Shape{300, 2048, 4, 128}, 27, DType::BF16, false},  // 32-token tiles, 128-byte entries
                        {Shape{1024, 4096, 3, 128}, 27, DType::BF16, false}, // 3-bit 32-token tiles (two CTAs per SM), 8 per tile
                        {Shape{4096, 14336, 2, 128}, 5, DType::BF16, false}};
  int clustered = 0, same_split = 0;
  for (const Case& c0 : cases) {
    const DecodeCase dc = make_decode_case(c0.s, c0.M, c0.dt, c0.bias, rng);
    const Shape& s = dc.L.s;
    ws.ensure(gpu::workspace_bytes(c0.M, s, 0));
    for (gpu::LutKernel kernel : {gpu::LutKernel::kCpAsync, gpu::LutKernel::kTma}) {
      if (kernel == gpu::LutKernel::kTma && c0.M > gpu::tma_decode_max_m(0)) continue;
      const gpu::DecodePlan pc = gpu::decode_plan(c0.M, s, c0.dt, 0, kernel);
      const gpu::DecodePlan ps = gpu::decode_plan(c0.M, s, c0.dt, 0, kernel, gpu::DecodeSplit::kStreamK);
      std::printf("N=%lld K=%lld M=%lld bits=%d kernel %d: %d workers in clusters of %d (Stream-K: %d workers)\n",
                  (long long)s.N, (long long)s.K, (long long)c0.M, s.bits, int(kernel), pc.workers, pc.cluster, ps.workers);
      ASSERT_EQ(ps.cluster, 1);
      clustered += pc.cluster > 1;
      // The 3-bit 32-token tiles of the TMA kernel split in clusters too (item 67).
      if (kernel == gpu::LutKernel::kTma && s.bits == 3 && c0.M > 16) EXPECT_GT(pc.cluster, 1) << "3-bit, M = " << c0.M;
      const std::string what = "N=" + std::to_string(s.N) + " K=" + std::to_string(s.K) + " M=" +
                               std::to_string(c0.M) + " kernel " + std::to_string(int(kernel));
      const SplitRuns r = run_split_and_stream_k(dc, c0.M, c0.dt, c0.bias, ws, kernel, what);
      if (pc.workers == ps.workers) {
        ++same_split;
        EXPECT_EQ(std::memcmp(r.y.data(), r.ysk.data(), r.y.size() * 4), 0)
            << "N=" << s.N << " M=" << c0.M << " kernel " << int(kernel) << ": clusters and Stream-K differ on one split";
      }
    }
  }
  EXPECT_GE(clustered, 6);   // an H100 plans them for 1024x4096, 777x992, 300x2048 (both kernels; 2026-11-27)
  EXPECT_GE(same_split, 2);  // 777x992: 8 one-block pieces per tile either way
}

// Tiles of 1, 2 or 4 row blocks (M <= 4, one whole tile per CTA, the CTA's warps splitting its
// k-blocks and adding their sums in shared memory; lut_tile_rows; both decode kernels, dispatched or
// forced) against the CPU reference and the same call on tiles of 8 row blocks with Stream-K: every
// bits, rows past N, a partial last k-block, k-blocks that leave some warps without one in the last
// iteration, g = 32 and g = K (no row tiles on the TMA kernel: its scale box needs g <= 128), bias, fp16;
// at 3 and 4 bits the TMA kernel's tiles sized for three CTAs per SM and for two.
TEST(Gpu, DecodeRowTilesAgainstStreamKAndReference) {
  REQUIRE_GPU();
  std::mt19937 rng(96);
  Workspace ws;
  struct Case { Shape s; int64_t M; DType dt; bool bias; };
  // Plans on an H100 (two CTAs per SM: 264 slots; three: 396), printed below.
  const Case cases[] = {{Shape{4096, 4096, 4, 128}, 1, DType::BF16, false},  // 256 tiles of 1 row block, 4 iterations
                        {Shape{8192, 8192, 3, 64}, 2, DType::F16, true},     // 256 tiles of 2, 16 iterations
                        {Shape{4000, 992, 4, 0}, 1, DType::F16, true},       // 250 tiles of 1, g = K, a partial k-block
                        {Shape{8100, 2048, 2, 32}, 2, DType::BF16, false},   // 254 tiles of 2, the last one half past N
                        {Shape{14720, 1024, 4, 64}, 4, DType::BF16, true},   // 230 tiles of 4
                        {Shape{4096, 1664, 4, 128}, 1, DType::BF16, false},  // 13 k-blocks: 3 warps idle in iteration 2
                        {Shape{8192, 8192, 4, 128}, 1, DType::BF16, true},   // TMA kernel, 256 tiles of 2
                        {Shape{8192, 7616, 4, 64}, 1, DType::F16, false},    // 15 iterations (spread starts), the
                                                                              // last half past K, its k-block partial
                        {Shape{4096, 2048, 4, 64}, 1, DType::F16, true},     // fp16 on the TMA kernel's tiles of 1
                        {Shape{4096, 14336, 3, 128}, 1, DType::BF16, false},  // 3 bits, TMA: 256 tiles sized for 2 per SM
                        {Shape{6144, 4096, 3, 128}, 1, DType::F16, true},      // 3 bits, TMA: 384 tiles sized for 3
                        {Shape{6144, 4096, 4, 128}, 1, DType::BF16, false},    // 4 bits, TMA: 384 tiles sized for 3
                        {Shape{12288, 2048, 4, 128}, 2, DType::F16, true},     // 384 tiles of 2 sized for 3
                        {Shape{6000, 1664, 4, 64}, 1, DType::F16, true}};      // 375 of 1 for 3, 13 k-blocks
  int tiled = 0, tiled_tma = 0, tma3_sized[4] = {}, tma4_sized[4] = {};
  for (const Case& c0 : cases) {
    const DecodeCase dc = make_decode_case(c0.s, c0.M, c0.dt, c0.bias, rng);
    const Shape& s = dc.L.s;
    ws.ensure(gpu::workspace_bytes(c0.M, s, 0));
    for (gpu::LutKernel kernel : {gpu::LutKernel::kAuto, gpu::LutKernel::kCpAsync, gpu::LutKernel::kTma}) {
      if (kernel == gpu::LutKernel::kTma && !gpu::wgmma_supported(0)) continue;  // sm_90 only
      const gpu::DecodePlan pa = gpu::decode_plan(c0.M, s, c0.dt, 0, kernel);
      const gpu::DecodePlan ps = gpu::decode_plan(c0.M, s, c0.dt, 0, kernel, gpu::DecodeSplit::kStreamK);
      std::printf("N=%lld K=%lld M=%lld bits=%d kernel %d: %d workers, tiles of %d row blocks (sized for %d "
                  "CTAs per SM), %s kernel (kStreamK: %d workers, %d)\n", (long long)s.N, (long long)s.K,
                  (long long)c0.M, s.bits, int(kernel), pa.workers, pa.rows_per_tile, pa.ctas_per_sm,
                  pa.tma ? "TMA" : "cp.async", ps.workers, ps.rows_per_tile);
      ASSERT_EQ(ps.rows_per_tile, 8);
      if (pa.rows_per_tile < 8) {
        ++tiled;
        tiled_tma += pa.tma;
        ASSERT_TRUE(pa.ctas_per_sm == 2 || pa.ctas_per_sm == 3) << pa.ctas_per_sm;
        if (pa.tma && s.bits == 3) ++tma3_sized[pa.ctas_per_sm];
        if (pa.tma && s.bits == 4) ++tma4_sized[pa.ctas_per_sm];
        EXPECT_LE(c0.M, pa.rows_per_tile);
        EXPECT_EQ(pa.workers, int((s.row_blocks() + pa.rows_per_tile - 1) / pa.rows_per_tile));  // one tile each
      }
      const std::string what = "N=" + std::to_string(s.N) + " K=" + std::to_string(s.K) + " M=" +
                               std::to_string(c0.M) + " kernel " + std::to_string(int(kernel)) + " rows per tile " +
                               std::to_string(pa.rows_per_tile);
      const SplitRuns r = run_split_and_stream_k(dc, c0.M, c0.dt, c0.bias, ws, kernel, what);
      EXPECT_LT(rel_err(r.y, r.ysk), r.tol) << what;
    }
  }
  EXPECT_GE(tiled, 1);  // an H100 plans row tiles for most of these 30 calls (printed)
  if (gpu::wgmma_supported(0)) {
    EXPECT_GE(tiled_tma, 1);  // (several on the TMA kernel)
    EXPECT_GE(tma3_sized[2], 1);  // 3 bits: both sizes of the TMA kernel's row tiles ran (H100: 132 SMs)
    EXPECT_GE(tma3_sized[3], 1);
    EXPECT_GE(tma4_sized[2], 1);  // 4 bits likewise (sized for three: the 32 KB table)
    EXPECT_GE(tma4_sized[3], 1);
  }
}

// The TMA kernel's 3-bit tiles of 8 row blocks sized for two CTAs per SM instead of three
// (lut_tiles8_tma3): whole tiles (28672x4096: 224 tiles on 264 slots) and Stream-K over 264 workers
// (4096x14336 at M = 5-16), against the CPU reference and the same call forced to Stream-K over three
// CTAs per SM; 8- and 16-token tiles, fp16, bias, g = 64; 6144x4096 at M = 16 keeps three per SM.
TEST(Gpu, ThreeBitTilesSizedForTwoCtasAgainstStreamKAndReference) {
  REQUIRE_WGMMA();
  int sms = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  std::mt19937 rng(97);
  Workspace ws;
  struct Case { Shape s; int64_t M; DType dt; bool bias; int want_ctas; };
  const Case cases[] = {{Shape{28672, 4096, 3, 128}, 1, DType::BF16, false, 2},  // 224 whole tiles
                        {Shape{28672, 4096, 3, 64}, 12, DType::F16, true, 2},    // the same at 16 tokens
                        {Shape{4096, 14336, 3, 128}, 16, DType::F16, true, 2},   // Stream-K over 264
                        {Shape{4096, 14336, 3, 128}, 6, DType::BF16, false, 2},
                        {Shape{6144, 4096, 3, 128}, 16, DType::BF16, false, 0}};  // 25M weights: three
  int two = 0;
  for (const Case& c0 : cases) {
    const DecodeCase dc = make_decode_case(c0.s, c0.M, c0.dt, c0.bias, rng);
    const Shape& s = dc.L.s;
    ws.ensure(gpu::workspace_bytes(c0.M, s, 0));
    const gpu::DecodePlan pa = gpu::decode_plan(c0.M, s, c0.dt, 0, gpu::LutKernel::kTma);
    const gpu::DecodePlan ps = gpu::decode_plan(c0.M, s, c0.dt, 0, gpu::LutKernel::kTma, gpu::DecodeSplit::kStreamK);
    std::printf("N=%lld K=%lld M=%lld: %d workers sized for %d CTAs per SM, tiles of %d (kStreamK: %d workers, %d)\n",
                (long long)s.N, (long long)s.K, (long long)c0.M, pa.workers, pa.ctas_per_sm, pa.rows_per_tile,
                ps.workers, ps.ctas_per_sm);
    ASSERT_EQ(pa.rows_per_tile, 8);
    ASSERT_EQ(ps.ctas_per_sm, 0);
    ASSERT_TRUE(pa.ctas_per_sm == 0 || pa.ctas_per_sm == 2) << pa.ctas_per_sm;
    if (sms == 132) EXPECT_EQ(pa.ctas_per_sm, c0.want_ctas);  // H100 / H200
    if (pa.ctas_per_sm == 2) {
      ++two;
      EXPECT_LE(pa.workers, 2 * sms);
      EXPECT_NE(pa.workers, ps.workers);
    }
    const std::string what = "N=" + std::to_string(s.N) + " K=" + std::to_string(s.K) + " M=" + std::to_string(c0.M);
    const SplitRuns r = run_split_and_stream_k(dc, c0.M, c0.dt, c0.bias, ws, gpu::LutKernel::kTma, what);
    EXPECT_LT(rel_err(r.y, r.ysk), r.tol) << what;
  }
  EXPECT_GE(two, 1);
}

// The TMA kernel's whole tiles (tiles of 8 row blocks filling 80-100% of the slots: one tile per
// worker, no fixups), whose workers start at spread k-blocks (worker w at w % k_iters, wrapping; item
// 92): against the CPU reference and the cp.async kernel (k-blocks in order from 0), reproducible.
// (DecodeSplit::kStreamK keeps these whole tiles: lut_split's rule.) Shapes sized from the SM count
// (85% of two CTAs per SM); at 4 bits they run as whole tiles of 7 row blocks (lut_whole_tile_rows;
// tiles of 8 in LUTMM_EXPERIMENT 15), at 2 and 3 bits of 8. A partial last k-block (g = 32, 64, K) that
// lands mid-walk for most workers, 2, 3 and 4 bits, 8-, 16- and 32-token tiles, fp16, bias, rows past N.
TEST(Gpu, WholeTilesAtSpreadStartsAgainstCpAsyncAndReference) {
  REQUIRE_WGMMA();
  int sms = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const int64_t tiles = 2 * int64_t(sms) * 85 / 100, n_full = tiles * 8 * 16;  // 132 SMs: 224 tiles, 28672 rows
  std::mt19937 rng(98);
  Workspace ws;
  struct Case { Shape s; int64_t M; DType dt; bool bias; };
  const Case cases[] = {{Shape{n_full, 2144, 4, 32}, 1, DType::BF16, false},     // 17 k-blocks, the last one chunk
                        {Shape{n_full - 40, 4096, 4, 128}, 5, DType::F16, true},  // rows past N
                        {Shape{n_full, 2112, 2, 64}, 8, DType::BF16, true},       // the last k-block two chunks
                        {Shape{n_full, 2080, 4, 0}, 1, DType::F16, true},         // g = K
                        {Shape{n_full, 2144, 3, 32}, 3, DType::BF16, false},      // 3 bits, sized for two per SM
                        {Shape{n_full, 2144, 4, 32}, 14, DType::F16, false},      // 16-token tiles
                        {Shape{n_full, 2112, 4, 64}, 24, DType::BF16, true}};     // 32-token tiles (in-step starts)
  for (const Case& c0 : cases) {
    const DecodeCase dc = make_decode_case(c0.s, c0.M, c0.dt, c0.bias, rng);
    const Shape& s = dc.L.s;
    ws.ensure(gpu::workspace_bytes(c0.M, s, 0));
    const gpu::DecodePlan pa = gpu::decode_plan(c0.M, s, c0.dt, 0, gpu::LutKernel::kTma);
    const std::string what = "N=" + std::to_string(s.N) + " K=" + std::to_string(s.K) + " M=" + std::to_string(c0.M) +
                             " bits=" + std::to_string(s.bits) + " g=" + std::to_string(s.group_size);
    ASSERT_TRUE(pa.tma) << what;
    ASSERT_EQ(pa.rows_per_tile, 8) << what;
    ASSERT_EQ(pa.cluster, 1) << what;
    // 4-bit tiles of 8 run two CTAs per SM: the whole tiles those slots take.
    const int rows = s.bits == 4 && LUTMM_EXPERIMENT != 15 ? gpu::lut_whole_tile_rows(s.row_blocks(), 2 * int64_t(sms)) : 8;
    ASSERT_EQ(pa.whole_rows, rows) << what;
    if (s.bits == 4 && LUTMM_EXPERIMENT != 15) ASSERT_EQ(rows, 7) << what;  // the shapes are sized for it
    ASSERT_EQ(pa.workers, int((s.row_blocks() + pa.whole_rows - 1) / pa.whole_rows)) << what << ": not one whole tile per worker";
    const SplitRuns r = run_split_and_stream_k(dc, c0.M, c0.dt, c0.bias, ws, gpu::LutKernel::kTma, what);
    const auto yc = run_gpu(dc.L, dc.x, c0.M, c0.dt, c0.bias ? &dc.bias : nullptr, ws.p, ws.bytes, gpu::Path::kLut,
                            gpu::LutKernel::kCpAsync);
    EXPECT_LT(rel_err(yc, dc.ref), r.tol) << what << " (cp.async kernel)";
    EXPECT_LT(rel_err(r.y, yc), r.tol) << what << " (TMA vs cp.async kernel)";
  }
}

// Tiles copy activation boxes of min(M, 8 * MT) token rows (item 96; row tiles of rpt row blocks
// boxes of min(M, rpt) rows under LUTMM_EXPERIMENT 23): the stage rows past M keep what an earlier
// use left there. A call filling the token tile (M = 8 * MT, or rpt) with NaN activations (its output
// all NaN: the poison reached the stages) leaves NaN rows in the SMs' shared memory; calls at smaller
// M right after it must still match the CPU reference (an MMA's token column depends on its own row
// only). Shared memory is not promised to survive between kernels, so this can miss a leak, never
// invent one.
TEST(Gpu, ShortActivationBoxesIgnoreStaleStageRows) {
  REQUIRE_WGMMA();
  std::mt19937 rng(96);
  Workspace ws;
  struct Case { Shape s; int64_t poison_m; std::vector<int64_t> ms; DType dt; int rows; };  // rows: rows_per_tile
  const Case cases[] = {{Shape{28672, 4096, 2, 128}, 8, {1, 2, 7}, DType::BF16, 8},
                        {Shape{28672, 4096, 4, 128}, 8, {1, 3}, DType::F16, 8},
                        {Shape{28672, 4096, 3, 64}, 8, {1, 5}, DType::BF16, 8},
                        {Shape{28672, 4096, 4, 128}, 16, {9, 15}, DType::BF16, 8},
                        {Shape{8192, 8192, 4, 128}, 2, {1}, DType::BF16, 2}};  // row tiles of 2 (132 SMs)
  for (const Case& c0 : cases) {
    const std::vector<uint16_t> xnan(size_t(c0.poison_m * c0.s.K), uint16_t(c0.dt == DType::BF16 ? 0x7fc0 : 0x7e00));
    for (int64_t M : c0.ms) {
      const DecodeCase dc = make_decode_case(c0.s, M, c0.dt, false, rng);
      const Shape& s = dc.L.s;
      const std::string what = "N=" + std::to_string(s.N) + " K=" + std::to_string(s.K) + " bits=" +
                               std::to_string(s.bits) + " M=" + std::to_string(M) + " after M=" + std::to_string(c0.poison_m);
      const gpu::DecodePlan pp = gpu::decode_plan(c0.poison_m, s, c0.dt, 0, gpu::LutKernel::kTma);
      const gpu::DecodePlan pa = gpu::decode_plan(M, s, c0.dt, 0, gpu::LutKernel::kTma);
      ASSERT_TRUE(pa.tma && pp.tma) << what;
      ASSERT_EQ(pa.rows_per_tile, c0.rows) << what;
      ASSERT_EQ(pp.rows_per_tile, c0.rows) << what;
      ASSERT_EQ(c0.rows < 8 ? c0.rows : M <= 8 ? 8 : 16, c0.poison_m) << what << ": the poison call must fill M's token tile";
      ws.ensure(std::max(gpu::workspace_bytes(M, s, 0), gpu::workspace_bytes(c0.poison_m, s, 0)));
      const auto yp = run_gpu(dc.L, xnan, c0.poison_m, c0.dt, nullptr, ws.p, ws.bytes, gpu::Path::kLut, gpu::LutKernel::kTma);
      ASSERT_TRUE(std::all_of(yp.begin(), yp.end(), [](float v) { return std::isnan(v); })) << what << ": poison call";
      const auto y = run_gpu(dc.L, dc.x, M, c0.dt, nullptr, ws.p, ws.bytes, gpu::Path::kLut, gpu::LutKernel::kTma);
      EXPECT_LT(rel_err(y, dc.ref), c0.dt == DType::BF16 ? 6e-3 : 1.5e-3) << what;
    }
  }
}

// The wgmma kernel likewise (boxes of min(M, TOK) token rows under LUTMM_EXPERIMENT 1; TOK = 64,
// 128, 256 for M <= 64, <= 128, else): a call filling the token tile with NaN activations, then
// smaller M on the same shape against the CPU reference, Stream-K and split-K clusters alike.
TEST(Gpu, WgmmaShortActivationBoxesIgnoreStaleStageRows) {
  REQUIRE_WGMMA();
  std::mt19937 rng(961);
  Workspace ws;
  struct Case { Shape s; int64_t poison_m; std::vector<int64_t> ms; DType dt; };
  const Case cases[] = {{Shape{4096, 4096, 4, 128}, 64, {37, 1}, DType::BF16},
                        {Shape{8192, 4096, 3, 64}, 128, {100}, DType::F16},
                        {Shape{4096, 2048, 2, 128}, 256, {200}, DType::BF16}};
  for (const Case& c0 : cases) {
    const std::vector<uint16_t> xnan(size_t(c0.poison_m * c0.s.K), uint16_t(c0.dt == DType::BF16 ? 0x7fc0 : 0x7e00));
    for (int64_t M : c0.ms) {
      const DecodeCase dc = make_decode_case(c0.s, M, c0.dt, false, rng);
      const Shape& s = dc.L.s;
      ws.ensure(std::max(gpu::wgmma_workspace_bytes(M, s, 0), gpu::wgmma_workspace_bytes(c0.poison_m, s, 0)));
      for (gpu::WgSplit split : {gpu::WgSplit::kAuto, gpu::WgSplit::kStreamK}) {
        const std::string what = "N=" + std::to_string(s.N) + " K=" + std::to_string(s.K) + " bits=" +
                                 std::to_string(s.bits) + " M=" + std::to_string(M) + " after M=" +
                                 std::to_string(c0.poison_m) + " split " + std::to_string(int(split));
        const auto yp = run_gpu(dc.L, xnan, c0.poison_m, c0.dt, nullptr, ws.p, ws.bytes, gpu::Path::kWgmma,
                                gpu::LutKernel::kAuto, split);
        ASSERT_TRUE(std::all_of(yp.begin(), yp.end(), [](float v) { return std::isnan(v); })) << what << ": poison call";
        const auto y = run_gpu(dc.L, dc.x, M, c0.dt, nullptr, ws.p, ws.bytes, gpu::Path::kWgmma, gpu::LutKernel::kAuto, split);
        EXPECT_LT(rel_err(y, dc.ref), c0.dt == DType::BF16 ? 6e-3 : 1.5e-3) << what;
      }
    }
  }
}

// Every work split of the wgmma kernel (Stream-K only, data-parallel waves, both): bitwise the same
// output on every run, and the same values as the LUT kernel (checked against the CPU reference
// elsewhere) up to rounding.
TEST(Gpu, WgmmaWorkSplitsDeterministicAndAgreeWithLut) {
  REQUIRE_WGMMA();
  std::mt19937 rng(98);
  Workspace ws, ws_lut;
  // On 132 SMs: 32 tiles (Stream-K), 128 (one data-parallel wave), 16 (Stream-K), 300 (a data-parallel
  // wave + Stream-K), 256 (two uneven data-parallel waves); then 64-token tiles: 32 (Stream-K, one CTA
  // per SM) and 128 x 32 k-blocks (two CTAs per SM, >= 15 k-blocks each), every bits.
  for (auto [shp, M] : {std::pair{Shape{4096, 4096, 4, 128}, int64_t(256)}, std::pair{Shape{4096, 1024, 3, 64}, int64_t(1000)},
                        std::pair{Shape{1000, 2048, 2, 32}, int64_t(300)}, std::pair{Shape{9600, 1024, 4, 128}, int64_t(1024)},
                        std::pair{Shape{8192, 1024, 4, 64}, int64_t(1024)}, std::pair{Shape{4096, 4096, 4, 128}, int64_t(64)},
                        std::pair{Shape{16384, 4096, 4, 128}, int64_t(40)}, std::pair{Shape{16384, 4096, 3, 64}, int64_t(64)},
                        std::pair{Shape{16384, 4096, 2, 32}, int64_t(33)}}) {
    Layer L = make_layer(shp, DType::BF16, rng, 0);
    std::vector<uint16_t> x(size_t(M * shp.K));
    std::normal_distribution<float> nd(0.f, 1.f);
    for (auto& v : x) v = float_to_bf16(nd(rng));
    ws.ensure(ws_need(gpu::Path::kWgmma, M, shp));
    auto y0 = run_gpu(L, x, M, DType::BF16, nullptr, ws.p, ws.bytes, gpu::Path::kWgmma);
    for (int rep = 0; rep < 2; ++rep) {
      auto y = run_gpu(L, x, M, DType::BF16, nullptr, ws.p, ws.bytes, gpu::Path::kWgmma);
      ASSERT_EQ(std::memcmp(y.data(), y0.data(), y.size() * 4), 0) << "run " << rep << " differs, N=" << shp.N;
    }
    ws_lut.ensure(ws_need(gpu::Path::kLut, M, shp));
    auto yl = run_gpu(L, x, M, DType::BF16, nullptr, ws_lut.p, ws_lut.bytes, gpu::Path::kLut);
    EXPECT_LT(rel_err(y0, yl), 6e-3) << "N=" << shp.N << " K=" << shp.K << " M=" << M;
  }
}

// Split-K clusters (few tiles: clusters of C CTAs split each tile along K and reduce through
// distributed shared memory) and tile-aligned Stream-K (C CTAs per tile, global-memory fixup):
// bitwise the same output on every run, equal to the forced plain Stream-K split and to the LUT
// kernel up to rounding. Every tile
// width (TOK 64, 128, 256), scales before and after the MMA, C = 2, 3, 4, rows past N, bias, fp16.
TEST(Gpu, WgmmaSplitKClusters) {
  REQUIRE_WGMMA();
  int sms = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  // Cluster sizes dispatch picks as the tile count grows (M = 256: one token tile; 4-bit, K = 4096):
  // they depend on how many clusters of each size fit at once (the GPCs' free SMs).
  std::printf("cluster size by tiles (M = 256, K = 4096) on %d SMs:", sms);
  for (int64_t t = 24; t <= 70; ++t) std::printf(" %lld:%d", (long long)t, gpu::wgmma_cluster_size(256, Shape{t * 128, 4096, 4, 128}, 0));
  std::printf("\n");
  std::mt19937 rng(97);
  Workspace ws, ws_lut;
  struct Case { Shape s; int64_t M; DType dt; bool bias; };
  // On the H100 (132 SMs) of 2026-11-26: C = 4 for 27-30 tiles, 3 for 36-39, 2 for 53-66 (47-66 since
  // item 77: clusters of 2 down to 70% of the SMs where the rest would go to plain Stream-K).
  const Case cases[] = {{Shape{8192, 8192, 4, 128}, 256, DType::BF16, false},  // 64 tiles of 256 tokens
                        {Shape{8192, 1024, 3, 64}, 200, DType::F16, true},     // 64 tiles, 8 k-blocks
                        {Shape{4600, 2048, 2, 32}, 100, DType::BF16, true},    // 36 tiles of 128 (rows past N)
                        {Shape{3840, 4096, 4, 128}, 256, DType::BF16, true},   // 30 tiles of 256
                        {Shape{6144, 4096, 4, 128}, 256, DType::BF16, true},   // 48 tiles: C = 2 on 96 SMs
                        {Shape{6144, 4096, 3, 128}, 128, DType::F16, false},   // 48 tiles of 128, scales after
                        {Shape{3840, 4096, 4, 128}, 64, DType::BF16, false},   // 64 tokens, scales after the MMA
                        {Shape{3840, 2048, 4, 128}, 128, DType::F16, true},    // 128 tokens, scales after the MMA
                        {Shape{4096, 4096, 4, 128}, 256, DType::BF16, true},   // 32 tiles of 256 -> 64 of 128
                        {Shape{4096, 2048, 3, 128}, 100, DType::F16, false},   // 32 tiles of 128 -> 64 of 64
                        {Shape{8192, 8192, 4, 128}, 64, DType::BF16, true},    // clusters, not two CTAs per SM
                        {Shape{4096, 14336, 4, 128}, 256, DType::BF16, false}, // tile-aligned Stream-K (4 per tile)
                        {Shape{4096, 4096, 3, 64}, 64, DType::F16, true}};     // tile-aligned, 64 tokens
  int clustered = 0;
  for (const Case& c : cases) {
    const int cs = gpu::wgmma_cluster_size(c.M, c.s, 0);
    std::printf("N=%lld K=%lld M=%lld bits=%d: cluster size %d\n", (long long)c.s.N, (long long)c.s.K, (long long)c.M,
                c.s.bits, cs);
    clustered += cs > 1;
    Layer L = make_layer(c.s, c.dt, rng, 2);
    std::vector<uint16_t> x(size_t(c.M * c.s.K)), bias(size_t(c.s.N));
    std::normal_distribution<float> nd(0.f, 1.f);
    for (auto& v : x) v = to_dtype(nd(rng), c.dt);
    for (auto& v : bias) v = to_dtype(nd(rng), c.dt);
    const auto* b = c.bias ? &bias : nullptr;
    ws.ensure(ws_need(gpu::Path::kWgmma, c.M, c.s));
    auto y = run_gpu(L, x, c.M, c.dt, b, ws.p, ws.bytes, gpu::Path::kWgmma);
    auto y2 = run_gpu(L, x, c.M, c.dt, b, ws.p, ws.bytes, gpu::Path::kWgmma);
    ASSERT_EQ(std::memcmp(y.data(), y2.data(), y.size() * 4), 0) << "N=" << c.s.N << " M=" << c.M << " not reproducible";
    auto y_sk = run_gpu(L, x, c.M, c.dt, b, ws.p, ws.bytes, gpu::Path::kWgmma, gpu::LutKernel::kAuto,
                        gpu::WgSplit::kStreamK);
    // Up to rounding: the sums' order, and where clusters halved the tile's tokens (TOK 256 -> 128,
    // 128 -> 64) the scales may move after the MMA (its rounding: see cuda.h).
    EXPECT_LT(rel_err(y, y_sk), c.dt == DType::BF16 ? 5e-3 : 1.5e-3) << "N=" << c.s.N << " M=" << c.M << " C=" << cs;
    ws_lut.ensure(ws_need(gpu::Path::kLut, c.M, c.s));
    auto yl = run_gpu(L, x, c.M, c.dt, b, ws_lut.p, ws_lut.bytes, gpu::Path::kLut);
    EXPECT_LT(rel_err(y, yl), 6e-3) << "N=" << c.s.N << " M=" << c.M << " C=" << cs;
  }
  // An H100 fits 66 clusters of two: the 64-tile and 48-tile cases at least must have used them.
  if (sms == 132) EXPECT_GE(clustered, 7);
}

// Y at any 2-byte alignment, N a multiple of 8 or not: the same output bit for bit as a 16-byte-
// aligned Y, and nothing written outside Y (run_gpu's guards). The wgmma kernel stores 8 outputs of a
// token at once only where Y is 16-byte aligned and N % 8 == 0 (the others take its one-at-a-time
// stores); the decode kernels store pairs. Split-K clusters (8192 rows at M = 64 and 256) store each
// token from one rank.
TEST(Gpu, OutputAtAnyAlignmentStaysInBounds) {
  REQUIRE_GPU();
  std::mt19937 rng(31);
  Workspace ws;
  struct Case { Shape s; int64_t M; };
  const Case cases[] = {{Shape{77, 512, 4, 128}, 5},    {Shape{136, 512, 3, 64}, 70}, {Shape{200, 1024, 4, 128}, 256},
                        {Shape{8192, 1024, 4, 128}, 64}, {Shape{8192, 1024, 2, 64}, 256}, {Shape{1000, 512, 4, 32}, 300}};
  for (const Case& c : cases)
    for (DType dt : {DType::BF16, DType::F16})
      for (gpu::Path path : {gpu::Path::kLut, gpu::Path::kWgmma}) {
        if (path == gpu::Path::kWgmma && !gpu::wgmma_supported(0)) continue;
        Layer L = make_layer(c.s, dt, rng, 2);
        std::vector<uint16_t> x(size_t(c.M * c.s.K)), bias(size_t(c.s.N));
        std::normal_distribution<float> nd(0.f, 1.f);
        for (auto& v : x) v = to_dtype(nd(rng), dt);
        for (auto& v : bias) v = to_dtype(nd(rng), dt);
        ws.ensure(ws_need(path, c.M, c.s));
        const auto y0 = run_gpu(L, x, c.M, dt, &bias, ws.p, ws.bytes, path);
        ASSERT_TRUE(std::all_of(y0.begin(), y0.end(), [](float v) { return std::isfinite(v); }))
            << "outputs left unwritten: N=" << c.s.N << " M=" << c.M << " path " << int(path);
        for (size_t off : {size_t(1), size_t(3), size_t(4), size_t(8)}) {
          const auto y = run_gpu(L, x, c.M, dt, &bias, ws.p, ws.bytes, path, gpu::LutKernel::kAuto, gpu::WgSplit::kAuto,
                                 gpu::DecodeSplit::kAuto, gpu::Epilogue::kNone, false, 0.f, nullptr, off);
          EXPECT_EQ(std::memcmp(y.data(), y0.data(), y.size() * 4), 0)
              << "Y offset " << off << " elements changed the output: N=" << c.s.N << " M=" << c.M << " path " << int(path)
              << " dtype " << dtype_name(dt);
        }
      }
}

// One workspace serves calls of every shape and path in turn (as lutmm.matmul's per-device one
// does): a call after others, whose Stream-K partials filled the workspace, gives bitwise the output
// it gives on a fresh workspace. (With a counter region sized per call, a call with more counters
// read an earlier call's partials as counters and left tiles unwritten.)
TEST(Gpu, SharedWorkspaceAcrossShapes) {
  REQUIRE_GPU();
  std::mt19937 rng(7);
  const bool wg = gpu::wgmma_supported(0);
  struct Call { Shape s; int64_t M; gpu::Path path; };
  // Small Stream-K calls first (few counters, partials right after them), then larger ones.
  std::vector<Call> calls = {{Shape{1024, 4096, 4, 128}, 1, gpu::Path::kLut}, {Shape{4096, 4096, 4, 128}, 16, gpu::Path::kLut},
                             {Shape{16384, 4096, 4, 128}, 1, gpu::Path::kLut}, {Shape{16384, 4096, 3, 64}, 40, gpu::Path::kLut}};
  if (wg) {
    calls.insert(calls.begin() + 2, {Shape{4096, 4096, 4, 128}, 64, gpu::Path::kWgmma});
    calls.push_back({Shape{16384, 4096, 4, 128}, 40, gpu::Path::kWgmma});
    calls.push_back({Shape{9600, 1024, 4, 128}, 1024, gpu::Path::kWgmma});
  }
  size_t need = 0;
  for (const Call& c : calls) need = std::max(need, ws_need(c.path, c.M, c.s));
  Workspace shared;
  shared.ensure(need);
  for (const Call& c : calls) {
    Layer L = make_layer(c.s, DType::BF16, rng, 0);
    std::vector<uint16_t> x(size_t(c.M * c.s.K));
    std::normal_distribution<float> nd(0.f, 1.f);
    for (auto& v : x) v = float_to_bf16(nd(rng));
    auto y = run_gpu(L, x, c.M, DType::BF16, nullptr, shared.p, shared.bytes, c.path);
    Workspace fresh;
    fresh.ensure(ws_need(c.path, c.M, c.s));
    auto y_fresh = run_gpu(L, x, c.M, DType::BF16, nullptr, fresh.p, fresh.bytes, c.path);
    ASSERT_TRUE(std::all_of(y_fresh.begin(), y_fresh.end(), [](float v) { return std::isfinite(v); }))
        << "fresh workspace left outputs unwritten (NaN poison): N=" << c.s.N << " M=" << c.M;
    EXPECT_EQ(std::memcmp(y.data(), y_fresh.data(), y.size() * 4), 0)
        << "shared workspace changed the output: N=" << c.s.N << " M=" << c.M << " path " << int(c.path);
  }
}

// Calls queued back to back on one stream, each one's Y the next one's X (N = K), ping-ponging two
// buffers (so each call also overwrites the input of the call before it), one workspace for all:
// bitwise the output of the same chain with a device synchronization after every call. Programmatic
// dependent launch lets a kernel start before the previous one ends: this fails if a kernel reads
// its activations, or writes Y or the workspace, before griddepcontrol.wait. Every path and split
// that dispatch picks at M = 1, 16, 64 and 256 (three bit widths in turn), on the legacy default
// stream and on a created stream.
TEST(Gpu, ChainedCallsWithoutSyncMatchSynchronized) {
  REQUIRE_GPU();
  std::mt19937 rng(55);
  const int64_t D = 2048;
  std::vector<Layer> layers;
  std::vector<std::unique_ptr<DevBuf<uint8_t>>> dev;  // packed codes and scales, per layer
  for (int i = 0; i < 6; ++i) {
    layers.push_back(make_layer(Shape{D, D, 4 - i % 3, 128}, DType::BF16, rng, 0));
    const Layer& L = layers.back();
    dev.push_back(std::make_unique<DevBuf<uint8_t>>(L.packed));
    dev.push_back(std::make_unique<DevBuf<uint8_t>>(L.packed_scales));
    ASSERT_TRUE(dev[dev.size() - 2]->p && dev.back()->p);
  }
  cudaStream_t side = nullptr;
  CK(cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking));
  for (int64_t M : {1, 16, 64, 256}) {
    const gpu::Path path = M > 32 && gpu::wgmma_supported(0) ? gpu::Path::kWgmma : gpu::Path::kLut;
    size_t need = 0;
    for (const Layer& L : layers) need = std::max(need, ws_need(path, M, L.s));
    Workspace ws;
    ws.ensure(need);
    std::vector<uint16_t> x0(size_t(M * D));
    std::normal_distribution<float> nd(0.f, 1.f);
    for (auto& v : x0) v = float_to_bf16(nd(rng));
    DevBuf<uint8_t> a(x0.size() * 2), b(x0.size() * 2);
    auto chain = [&](bool sync_each, cudaStream_t stream) {
      // The inputs are set on the chain's own stream: a non-blocking stream does not wait for the
      // legacy stream, so a cudaMemset there could still be poisoning b while the chain's first
      // kernel writes it (seen once on the H100, session 28: M = 256, side stream, run 0).
      EXPECT_EQ(cudaMemcpyAsync(a.p, x0.data(), x0.size() * 2, cudaMemcpyHostToDevice, stream), cudaSuccess);
      EXPECT_EQ(cudaMemsetAsync(b.p, 0xff, x0.size() * 2, stream), cudaSuccess);
      for (size_t i = 0; i < layers.size(); ++i) {
        const Layer& L = layers[i];
        const gpu::GemmProblem p = layer_problem(L, DType::BF16, M, i % 2 ? b.p : a.p, dev[2 * i]->p,
                                                 dev[2 * i + 1]->p, i % 2 ? a.p : b.p);
        if (path == gpu::Path::kWgmma) gpu::wgmma_gemm(p, ws.p, ws.bytes, stream);
        else gpu::lut_gemm(p, ws.p, ws.bytes, stream);
        if (sync_each) EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      }
      EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      std::vector<uint16_t> y(x0.size());  // 6 layers: the last output is in a
      EXPECT_EQ(cudaMemcpy(y.data(), a.p, y.size() * 2, cudaMemcpyDeviceToHost), cudaSuccess);
      return y;
    };
    const auto ref = chain(true, nullptr);
    size_t finite = 0;
    for (uint16_t v : ref) finite += std::isfinite(bf16_to_float(v)) && bf16_to_float(v) != 0.f;
    ASSERT_GT(finite, ref.size() * 9 / 10) << "M=" << M << ": the chain's output is not a real signal";
    for (cudaStream_t st : {cudaStream_t(nullptr), side})
      for (int rep = 0; rep < 3; ++rep) {
        const auto y = chain(false, st);
        EXPECT_EQ(std::memcmp(y.data(), ref.data(), y.size() * 2), 0)
            << "M=" << M << " path " << int(path) << (st ? " side stream" : " default stream") << " run " << rep;
      }
  }
  CK(cudaStreamDestroy(side));
}

TEST(Gpu, RejectsBadArguments) {
  REQUIRE_GPU();
  std::mt19937 rng(1);
  Shape s{64, 256, 4, 128};
  Layer L = make_layer(s, DType::F16, rng, 0);
  DevBuf<uint8_t> dx(size_t(2 * 256 * 2) + 16), dw(L.packed.size()), ds(L.packed_scales.size() * 2), dy(2 * 64 * 2);
  Workspace ws;
  ws.ensure(gpu::workspace_bytes(2, s, 0));
  const gpu::GemmProblem p = layer_problem(L, DType::F16, 2, dx.p, dw.p, ds.p, dy.p);
  EXPECT_NO_THROW(gpu::lut_gemm(p, ws.p, ws.bytes, nullptr));
  gpu::GemmProblem bad = p;
  bad.x = dx.p + 2;
  EXPECT_THROW(gpu::lut_gemm(bad, ws.p, ws.bytes, nullptr), Error);
  EXPECT_THROW(gpu::lut_gemm(p, ws.p, 16, nullptr), Error);
  bad = p; bad.dtype = DType::F32;
  EXPECT_THROW(gpu::lut_gemm(bad, ws.p, ws.bytes, nullptr), Error);
  bad = p; bad.table[3] = NAN;
  EXPECT_THROW(gpu::lut_gemm(bad, ws.p, ws.bytes, nullptr), Error);
  bad = p; bad.shape.bits = 5;
  EXPECT_THROW(gpu::lut_gemm(bad, ws.p, ws.bytes, nullptr), Error);
  // The TMA decode kernel serves M <= 32 (and only sm_90, where tma_decode_max_m is 0 otherwise).
  EXPECT_EQ(gpu::tma_decode_max_m(0), gpu::wgmma_supported(0) ? 32 : 0);
  bad = p; bad.M = 33;
  EXPECT_THROW(gpu::lut_gemm(bad, ws.p, ws.bytes, nullptr, gpu::LutKernel::kTma), Error);
  if (gpu::wgmma_supported(0)) {
    ws.ensure(gpu::wgmma_workspace_bytes(2, s, 0));
    EXPECT_NO_THROW(gpu::wgmma_gemm(p, ws.p, ws.bytes, nullptr));
    bad = p; bad.x = dx.p + 2;
    EXPECT_THROW(gpu::wgmma_gemm(bad, ws.p, ws.bytes, nullptr), Error);
    EXPECT_THROW(gpu::wgmma_gemm(p, ws.p, 0, nullptr), Error);
    bad = p; bad.dtype = DType::F32;
    EXPECT_THROW(gpu::wgmma_gemm(bad, ws.p, ws.bytes, nullptr), Error);
  } else {
    EXPECT_THROW(gpu::wgmma_gemm(p, ws.p, ws.bytes, nullptr), Error);
  }
  CK(cudaDeviceSynchronize());
}
