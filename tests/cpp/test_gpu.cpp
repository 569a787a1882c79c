// GPU differential tests: the fused kernels (LUT decode kernel, wgmma prefill kernel) and the dequant
// kernel against the CPU reference. The decode kernels' work splits and tile shapes, and the stale
// stage rows of short activation boxes, are in test_gpu_splits.cpp.
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
