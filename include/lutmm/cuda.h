// GPU entry points on raw device pointers. Everything runs on the caller's stream, never
// synchronizes the host and allocates nothing, so it is safe inside CUDA graph capture.
// Declared in every build; in a build without CUDA each call throws lutmm::Error.
#pragma once
#include <cstddef>
#include <cstdint>

#include "lutmm/format.h"

namespace lutmm {
namespace gpu {

// True when the library was compiled with CUDA kernels and a CUDA device is visible.
bool available();
// Human-readable build/device description (for `lutmm info`).
const char* build_info();

// Kernel paths. kAuto lets dispatch() choose.
//   kLut      fused decode kernels (lut_gemm.cu, lut_stream.cu): pair-table lookups -> mma.sync, Stream-K; any GPU
//   kDequant  dequantize to a dense N x K buffer, then the caller's dense GEMM (cuBLAS)
//   kWgmma    fused prefill kernel (lut_wgmma.cu): pair-table lookups -> Hopper wgmma; sm_90 only
enum class Path : int { kAuto = 0, kLut = 1, kDequant = 2, kWgmma = 3 };

// What the fused kernels write. kNone: Y = X W_hat^T (+ bias), M x N. kSiluMul (a gated MLP's gate and
// up projections in one call): W's rows come in pairs of 8, gate rows 8j .. 8j + 7 as rows 16j .. 16j + 7
// and up rows 8j .. 8j + 7 as rows 16j + 8 .. 16j + 15 (lutmm.interleave_gate_up; in a 16-row block a
// lane's accumulators hold rows r and r + 8, so the two halves meet in one thread), and with Z = X W_hat^T
// in fp32, Y (M x N/2) is Y[m][8j + r] = silu(Z[m][16j + r]) * Z[m][16j + 8 + r], rounded once.
// N must be a multiple of 16; no bias. The kLut and kWgmma paths (lut_gemm, wgmma_gemm) take it.
enum class Epilogue : int { kNone = 0, kSiluMul = 1 };

struct GemmProblem {
  // Activations X: M x K, row-major, fp16 or bf16, 16-byte aligned. Y: M x N, same dtype.
  const void* x = nullptr;
  DType dtype = DType::BF16;
  int64_t M = 0;
  Shape shape;                            // N, K, bits, group size of the weight
  const void* packed = nullptr;           // shape.packed_bytes() bytes (see pack.h), 16-byte aligned
  const uint16_t* packed_scales = nullptr;  // shape.packed_scale_count() fp16 values, 16-byte aligned
  float table[16] = {};                   // T, 2^bits entries (host values, passed by value)
  const void* bias = nullptr;             // N values of dtype, or nullptr
  void* y = nullptr;                      // output, M x N (M x N/2 with Epilogue::kSiluMul)
  Epilogue epilogue = Epilogue::kNone;
  // A decoder layer's RMSNorm and residual add, folded into the projections (the kLut path only):
  // rms_norm: Y = r_m (X W_hat^T)[m] with r_m = rsqrt(mean_k X[m][k]^2 + rms_eps), X the raw residual
  // stream (the norm's weight folded into W's columns offline), before the epilogue; residual: M x N of
  // dtype added to Y (not with kSiluMul).
  bool rms_norm = false;
  float rms_eps = 0.f;
  const void* residual = nullptr;
};

// Which path dispatch picks for this problem on `device` (readable rule, see gemm.cu).
Path choose_path(int64_t M, const Shape& shape, DType dtype, int device);

// Bytes of persistent workspace the LUT path needs for (M, shape) on `device`: a fixed 1 MiB region
// of Stream-K tile counters, then the call's partial sums. The workspace must be zero-filled once
// when allocated; every call leaves the counter region zeroed again, so one workspace (of the largest
// size needed) serves every shape and path in turn. One workspace must not be used by two streams
// at the same time.
size_t workspace_bytes(int64_t M, const Shape& shape, int device);
// Bytes of scratch the dequant path needs (the dequantized N x K weight); contents need no init.
size_t dequant_scratch_bytes(const Shape& shape);

// The two decode kernels of the LUT path. kAuto: the TMA kernel (lut_stream.cu: bulk tensor copies,
// a producer warp, mbarrier pipeline; sm_90 only, M <= 32) where it is measured faster (M <= 32
// and N x K >= 32M, 24M at 3 bits, or 4 bits on row tiles, on the H100; on cards of >= 4 TB/s peak DRAM
// bandwidth (the H200) also every weight with K >= 2048), else the cp.async kernel (lut_gemm.cu; any GPU, any M). Forcing one is
// for tests and A/B timing; forcing kTma where it cannot run throws.
enum class LutKernel : int { kAuto = 0, kCpAsync = 1, kTma = 2 };
// Work split of the decode kernels. kAuto: where a tile's Stream-K workers fit one thread-block
// cluster (sm_90; few tiles: 2, 4 or 8 workers per tile dividing its k-blocks), they reduce through
// distributed shared memory; at M <= 4, where tiles of 1, 2 or 4 row blocks (one per CTA) fill the
// GPU, the kernel's warps split each tile's k-blocks instead (no Stream-K partials);
// elsewhere Stream-K with the fixup through global memory. kStreamK: tiles of 8 row blocks, never the
// clusters (tests and A/B timing). All are deterministic; on the same split they agree bitwise.
enum class DecodeSplit : int { kAuto = 0, kStreamK = 1 };

// Y = X W_hat^T (+ bias) with the LUT path (fused kernel, Stream-K). `workspace` as above (it fits
// every LutKernel and DecodeSplit choice).
void lut_gemm(const GemmProblem& p, void* workspace, size_t workspace_bytes, void* stream,
              LutKernel kernel = LutKernel::kAuto, DecodeSplit split = DecodeSplit::kAuto);
// The split lut_gemm would use for a call on `device` (tests, benchmarks): Stream-K workers, the
// cluster size (1: no clusters), 16-row blocks per tile (8, or 1, 2, 4 at small M where one whole
// tile per CTA fills the GPU: the CTA's warps split its k-blocks), the kernel, and the CTAs per SM
// its grid is sized for where the plan chose them (row tiles; 3 bits on the TMA kernel: 3 or 2).
struct DecodePlan {
  int workers;
  int cluster;
  int rows_per_tile;
  bool tma;
  int ctas_per_sm;  // row tiles, 3-bit tiles of 8 on the TMA kernel sized for two, two-group CTAs (1); 0: the kernel's default
                    // for the tile (3 bits: three CTAs per SM, two for 32-token tiles)
  int whole_rows = 8;  // rows_per_tile = 8 on the TMA kernel: one whole tile per worker of this many row
                       // blocks where 5-7 fill more SMs (4 bits only), else 8
  int warp_groups = 1;  // workers per CTA on the TMA kernel: 2 (one CTA per SM, ctas_per_sm = 1) where 4-bit
                        // Stream-K ranges are long at M <= 8, else 1
};
DecodePlan decode_plan(int64_t M, const Shape& shape, DType dtype, int device, LutKernel kernel = LutKernel::kAuto,
                       DecodeSplit split = DecodeSplit::kAuto);
// The largest M the TMA decode kernel (LutKernel::kTma) serves on `device`; 0 where it cannot run.
int tma_decode_max_m(int device);
// Peak DRAM bandwidth of `device` in bytes/s: memory clock x bus width x 2 (double data rate), as
// the driver reports them; 0 where it does not. The decode dispatch tells the H100 (3.35 TB/s) and
// the H200 (4.8) apart by it (lut_tma_by_size, src/plan.cpp).
double peak_dram_bytes_per_s(int device);

// True when the wgmma prefill kernel can run on `device`: an sm_90 GPU and a build with sm_90a code.
bool wgmma_supported(int device);
// Bytes of persistent workspace the wgmma path needs (same rules as workspace_bytes(); it fits every
// WgSplit choice).
size_t wgmma_workspace_bytes(int64_t M, const Shape& shape, int device);
// Work split of the wgmma kernel. kAuto: where the tiles would leave most SMs idle, clusters of 2-4
// CTAs split each tile along K and reduce through distributed shared memory; elsewhere data-parallel
// waves, then Stream-K over the tail. kStreamK: never the clusters (tests and A/B timing). Both are
// deterministic; they sum in different orders.
enum class WgSplit : int { kAuto = 0, kStreamK = 1 };
// CTAs per split-K cluster that kAuto uses for (M, shape) on `device` (1: none).
int wgmma_cluster_size(int64_t M, const Shape& shape, int device);
// Y = X W_hat^T (+ bias) with the wgmma path. W_hat is rounded to X's dtype before the multiply
// (T[q] * s in fp32, then one rounding: the dequant path's values), except with group_size >= 128
// where the kernel's tiles hold <= 128 tokens and one CTA per SM runs (M <= 128, or M <= 256 where
// split-K clusters halve the tiles): there T[q] (rounded to X's dtype) is multiplied and each
// 128-column block's sum is scaled in fp32, as the LUT path does. Throws where unsupported.
void wgmma_gemm(const GemmProblem& p, void* workspace, size_t workspace_bytes, void* stream,
                WgSplit split = WgSplit::kAuto);

// W_hat (N x K, row-major, `dtype`) from the packed weight, rounding T[q] to `dtype` first and
// multiplying by the scale in fp32 (the same values the LUT path multiplies with).
void dequantize(const void* packed, const uint16_t* packed_scales, const float* table, const Shape& shape,
                DType dtype, void* out, void* stream);

}  // namespace gpu
}  // namespace lutmm
