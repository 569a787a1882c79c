// The gated-MLP epilogue (gpu::Epilogue::kSiluMul: gate and up rows interleaved by 8, Y = silu(gate) * up,
// M x N/2) on every fused kernel and work split, against the CPU reference (reference_silu_mul of the
// reference product) and against the same call's plain output. Without a CUDA device every test skips.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>

#include "lutmm/cuda.h"
#include "lutmm/reference.h"
#include "gpu_layer.h"
#include "gpu_test_util.h"

using namespace lutmm;
using namespace lutmm_test;

namespace {

// silu(Y[m][16j + r]) * Y[m][16j + 8 + r] of a plain output, as the epilogue would write it.
std::vector<float> silu_mul_of(const std::vector<float>& y, int64_t M, int64_t N) {
  std::vector<float> out(size_t(M * N / 2));
  reference_silu_mul(y.data(), M, N, out.data());
  return out;
}

}  // namespace

// Decode kernels (cp.async and TMA; Stream-K, clusters, row tiles of 1, 2 and 4 row blocks, tiles sized
// for two and three CTAs per SM, 8-, 16- and 32-token tiles) and the wgmma kernel (split-K clusters of
// 2, 3 and 4, Stream-K, 64- to 256-token tiles, scales after the MMA); every bits, fp16 and bf16, N / 16
// odd (the last 16-row block holds gate and up rows I - 8 .. I - 1), a partial last k-block, g = K.
TEST(GpuEpilogue, SiluMulOnEveryKernelAndSplit) {
  REQUIRE_GPU();
  const bool hopper = gpu::wgmma_supported(0);
  std::mt19937 rng(2026);
  Workspace ws;
  struct Case { Shape s; int64_t M; DType dt; bool wgmma; };
  const Case cases[] = {{Shape{4096, 4096, 4, 128}, 1, DType::BF16, false},  // row tiles of 1 (three CTAs per SM)
                        {Shape{8192, 8192, 3, 64}, 2, DType::F16, false},    // row tiles of 2
                        {Shape{6144, 4096, 3, 32}, 1, DType::BF16, false},   // row tiles / clusters
                        {Shape{1024, 4096, 2, 64}, 3, DType::F16, false},    // clusters of 8
                        {Shape{2736, 1024, 4, 128}, 16, DType::BF16, false}, // Stream-K, 16 tokens, 171 row blocks
                        {Shape{880, 992, 4, 0}, 9, DType::F16, false},       // g = K, partial k-block
                        {Shape{304, 2048, 2, 128}, 27, DType::BF16, false},  // 32-token tiles (both kernels)
                        {Shape{3840, 4096, 4, 128}, 256, DType::BF16, true}, // split-K clusters of 4
                        {Shape{4608, 2048, 2, 32}, 100, DType::F16, true},   // 36 tiles of 128: clusters of 3
                        {Shape{8192, 1024, 3, 64}, 200, DType::F16, true},   // clusters of 2
                        {Shape{3840, 4096, 4, 128}, 64, DType::BF16, true},  // 64 tokens, scales after the MMA
                        {Shape{2736, 1024, 3, 64}, 700, DType::BF16, true}}; // 256-token tiles, Stream-K
  int runs = 0;
  for (const Case& c0 : cases) {
    if (c0.wgmma && !hopper) continue;
    Shape s = c0.s;
    if (s.group_size == 0) s.group_size = s.K;
    const Layer L = make_layer(s, c0.dt, rng, 2);
    std::vector<uint16_t> x(size_t(c0.M * s.K));
    std::vector<float> xf(x.size());
    std::normal_distribution<float> nd(0.f, 1.f);
    for (size_t i = 0; i < x.size(); ++i) { x[i] = to_dtype(nd(rng), c0.dt); xf[i] = from_dtype(x[i], c0.dt); }
    std::vector<float> z(size_t(c0.M * s.N));
    reference_matmul(xf.data(), DType::F32, c0.M, L.codes.data(), L.scales.data(), L.table_rounded.data(), s, nullptr,
                     z.data());
    const std::vector<float> ref = silu_mul_of(z, c0.M, s.N);
    const double tol = c0.dt == DType::BF16 ? 8e-3 : 2e-3;
    const gpu::Path path = c0.wgmma ? gpu::Path::kWgmma : gpu::Path::kLut;
    ws.ensure(ws_need(path, c0.M, s));
    struct Run { gpu::LutKernel kernel; gpu::WgSplit wsplit; gpu::DecodeSplit dsplit; };
    std::vector<Run> configs;
    if (c0.wgmma) {
      configs = {{gpu::LutKernel::kAuto, gpu::WgSplit::kAuto, gpu::DecodeSplit::kAuto},
                 {gpu::LutKernel::kAuto, gpu::WgSplit::kStreamK, gpu::DecodeSplit::kAuto}};
    } else {
      for (gpu::LutKernel k : {gpu::LutKernel::kCpAsync, gpu::LutKernel::kTma}) {
        if (k == gpu::LutKernel::kTma && (!hopper || c0.M > gpu::tma_decode_max_m(0))) continue;
        configs.push_back({k, gpu::WgSplit::kAuto, gpu::DecodeSplit::kAuto});
        configs.push_back({k, gpu::WgSplit::kAuto, gpu::DecodeSplit::kStreamK});
      }
    }
    for (const Run& r : configs) {
      const std::string what = "N=" + std::to_string(s.N) + " K=" + std::to_string(s.K) + " M=" + std::to_string(c0.M) +
                               " bits=" + std::to_string(s.bits) + " path " + std::to_string(int(path)) + " kernel " +
                               std::to_string(int(r.kernel)) + " split " +
                               std::to_string(c0.wgmma ? int(r.wsplit) : int(r.dsplit));
      const auto y = run_gpu(L, x, c0.M, c0.dt, nullptr, ws.p, ws.bytes, path, r.kernel, r.wsplit, r.dsplit,
                             gpu::Epilogue::kSiluMul);
      EXPECT_LT(rel_err(y, ref), tol) << what;
      // The same call's plain output, then silu * up on the host: the epilogue reads the same sums.
      const auto yp = run_gpu(L, x, c0.M, c0.dt, nullptr, ws.p, ws.bytes, path, r.kernel, r.wsplit, r.dsplit);
      EXPECT_LT(rel_err(y, silu_mul_of(yp, c0.M, s.N)), tol) << what << " (against its plain output)";
      ++runs;
    }
  }
  EXPECT_GE(runs, hopper ? 32 : 14);  // the TMA kernel up to M = 32 (the 27-token case too)
}

// N not a multiple of 16, or a bias, with the epilogue: a clear error from both fused entry points.
TEST(GpuEpilogue, RejectsBadArguments) {
  REQUIRE_GPU();
  std::mt19937 rng(3);
  const Shape s{72, 256, 4, 128};
  const Layer L = make_layer(s, DType::BF16, rng, 0);
  DevBuf<uint8_t> dx(size_t(2 * 256 * 2)), dw(L.packed.size()), ds(L.packed_scales.size() * 2), dy(2 * 72 * 2),
      db(72 * 2);
  Workspace ws;
  ws.ensure(std::max(gpu::workspace_bytes(2, Shape{80, 256, 4, 128}, 0), gpu::workspace_bytes(2, s, 0)));
  gpu::GemmProblem p = layer_problem(L, DType::BF16, 2, dx.p, dw.p, ds.p, dy.p);
  p.epilogue = gpu::Epilogue::kSiluMul;
  auto message = [](auto&& f) {
    try { f(); } catch (const Error& e) { return std::string(e.what()); }
    return std::string("no error");
  };
  EXPECT_NE(message([&] { gpu::lut_gemm(p, ws.p, ws.bytes, nullptr); }).find("multiple of 16"), std::string::npos);
  gpu::GemmProblem b = p;
  b.shape.N = 64;  // a multiple of 16, but a bias
  b.bias = db.p;
  EXPECT_NE(message([&] { gpu::lut_gemm(b, ws.p, ws.bytes, nullptr); }).find("bias"), std::string::npos);
  b = p;
  b.epilogue = gpu::Epilogue(7);
  EXPECT_NE(message([&] { gpu::lut_gemm(b, ws.p, ws.bytes, nullptr); }).find("epilogue"), std::string::npos);
  b = p;  // a folded layer's inputs (GemmProblem::rms_norm, ::residual)
  b.shape.N = 64;
  b.residual = db.p;
  EXPECT_NE(message([&] { gpu::lut_gemm(b, ws.p, ws.bytes, nullptr); }).find("residual: not with the silu_mul"),
            std::string::npos);
  b.epilogue = gpu::Epilogue::kNone;
  b.bias = db.p;
  EXPECT_NE(message([&] { gpu::lut_gemm(b, ws.p, ws.bytes, nullptr); }).find("residual: not with a bias"),
            std::string::npos);
  b = p;
  b.shape.N = 64;
  b.rms_norm = true;
  b.rms_eps = -1.f;
  EXPECT_NE(message([&] { gpu::lut_gemm(b, ws.p, ws.bytes, nullptr); }).find("rms_eps"), std::string::npos);
  if (gpu::wgmma_supported(0)) {
    ws.ensure(gpu::wgmma_workspace_bytes(2, s, 0));
    EXPECT_NE(message([&] { gpu::wgmma_gemm(p, ws.p, ws.bytes, nullptr); }).find("multiple of 16"), std::string::npos);
  }
  CK(cudaDeviceSynchronize());
}

// A folded decoder layer's projections (GemmProblem::rms_norm and ::residual; lutmm.layerfold): each
// token's sums times rsqrt(mean(x^2) + eps), then silu(gate) * up or + residual, on both decode kernels
// (dispatched split and Stream-K; row tiles, clusters, 8-, 16- and 32-token tiles) against the CPU
// reference; the wgmma kernel refuses them.
TEST(GpuEpilogue, RmsNormAndResidualOnDecodeKernels) {
  REQUIRE_GPU();
  const bool hopper = gpu::wgmma_supported(0);
  std::mt19937 rng(2027);
  Workspace ws;
  struct Case { Shape s; int64_t M; DType dt; };
  const Case cases[] = {{Shape{6144, 4096, 4, 128}, 1, DType::BF16},   // row tiles
                        {Shape{4096, 4096, 3, 64}, 3, DType::F16},     // row tiles of 2 / clusters
                        {Shape{2736, 1024, 4, 128}, 16, DType::BF16},  // Stream-K, 16 tokens
                        {Shape{1024, 4096, 2, 32}, 9, DType::BF16},
                        {Shape{304, 2048, 4, 128}, 27, DType::F16},    // 32-token tiles (both kernels)
                        {Shape{256, 10240, 4, 128}, 2, DType::BF16},   // rows of > 4 vectors per thread
                        // The deferred factor (rms_defer_issue: TMA kernels sized for two CTAs per SM, M = 1,
                        // K <= 4096; on the Stream-K split, workers of several segments): K / 8 = 2 vectors
                        // per thread, and fewer vectors than threads
                        {Shape{4096, 4096, 4, 128}, 1, DType::F16},
                        {Shape{2048, 1024, 3, 64}, 1, DType::BF16},
                        // The producer warp's factor (kProducerNorm: kernels sized for three CTAs per SM, M = 1;
                        // the first case above at 4 bits)
                        {Shape{6144, 4096, 3, 128}, 1, DType::F16}};
  const float eps = 1e-5f;
  int runs = 0;
  for (const Case& c : cases) {
    const Shape& s = c.s;
    const Layer L = make_layer(s, c.dt, rng, 2);
    std::vector<uint16_t> x(size_t(c.M * s.K)), res(size_t(c.M * s.N));
    std::vector<float> xf(x.size()), rf(res.size());
    std::normal_distribution<float> nd(0.f, 1.f);
    for (size_t i = 0; i < x.size(); ++i) { x[i] = to_dtype(3.f * nd(rng), c.dt); xf[i] = from_dtype(x[i], c.dt); }
    for (size_t i = 0; i < res.size(); ++i) { res[i] = to_dtype(nd(rng), c.dt); rf[i] = from_dtype(res[i], c.dt); }
    std::vector<float> z(size_t(c.M * s.N));
    reference_matmul(xf.data(), DType::F32, c.M, L.codes.data(), L.scales.data(), L.table_rounded.data(), s, nullptr,
                     z.data());
    for (int64_t m = 0; m < c.M; ++m) {  // z <- r_m z
      double ss = 0;
      for (int64_t k = 0; k < s.K; ++k) ss += double(xf[size_t(m * s.K + k)]) * xf[size_t(m * s.K + k)];
      const double r = 1.0 / std::sqrt(ss / double(s.K) + eps);
      for (int64_t n = 0; n < s.N; ++n) z[size_t(m * s.N + n)] = float(z[size_t(m * s.N + n)] * r);
    }
    std::vector<float> want_res(z.size());
    for (size_t i = 0; i < z.size(); ++i) want_res[i] = z[i] + rf[i];
    const std::vector<float> want_gated = silu_mul_of(z, c.M, s.N);
    const double tol = c.dt == DType::BF16 ? 8e-3 : 2e-3;
    ws.ensure(gpu::workspace_bytes(c.M, s, 0));
    for (gpu::LutKernel k : {gpu::LutKernel::kCpAsync, gpu::LutKernel::kTma}) {
      if (k == gpu::LutKernel::kTma && (!hopper || c.M > gpu::tma_decode_max_m(0))) continue;
      for (gpu::DecodeSplit d : {gpu::DecodeSplit::kAuto, gpu::DecodeSplit::kStreamK}) {
        const std::string what = "N=" + std::to_string(s.N) + " M=" + std::to_string(c.M) + " bits=" +
                                 std::to_string(s.bits) + " kernel " + std::to_string(int(k)) + " split " +
                                 std::to_string(int(d));
        const auto yr = run_gpu(L, x, c.M, c.dt, nullptr, ws.p, ws.bytes, gpu::Path::kLut, k, gpu::WgSplit::kAuto, d,
                                gpu::Epilogue::kNone, true, eps, &res);
        EXPECT_LT(rel_err(yr, want_res), tol) << what << " (rms_norm + residual)";
        const auto yg = run_gpu(L, x, c.M, c.dt, nullptr, ws.p, ws.bytes, gpu::Path::kLut, k, gpu::WgSplit::kAuto, d,
                                gpu::Epilogue::kSiluMul, true, eps);
        EXPECT_LT(rel_err(yg, want_gated), tol) << what << " (rms_norm + silu_mul)";
        ++runs;
      }
    }
    if (hopper) {
      ws.ensure(gpu::wgmma_workspace_bytes(c.M, s, 0));
      EXPECT_THROW(run_gpu(L, x, c.M, c.dt, nullptr, ws.p, ws.bytes, gpu::Path::kWgmma, gpu::LutKernel::kAuto,
                           gpu::WgSplit::kAuto, gpu::DecodeSplit::kAuto, gpu::Epilogue::kNone, true, eps),
                   Error);
    }
  }
  EXPECT_EQ(runs, hopper ? 36 : 18);  // every case on each kernel and split (the TMA kernel: M <= 32, Hopper)
}
