// Dequantization of the packed layout to a dense N x K weight (the large-M path feeds it to cuBLAS),
// plus the small runtime pieces of the GPU API: error checks, availability, path choice.
#include <cstdio>
#include <mutex>
#include <set>

#include "lut_table.cuh"
#include "lutmm/cuda.h"

namespace lutmm {
namespace gpu {

void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    Msg m;
    m << "CUDA error in " << what << ": " << cudaGetErrorString(e);
    throw Error(m.str());
  }
}

void check_aligned(const void* ptr, const char* what) {
  if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) {
    Msg m;
    m << what << ": address " << ptr << " is not 16-byte aligned";
    throw Error(m.str());
  }
}

void check_workspace(const void* ws, size_t ws_bytes, size_t need, const char* sizer) {
  if (ws == nullptr || ws_bytes < need) {
    Msg m;
    m << "workspace: got " << ws_bytes << " bytes, expected at least " << need << " (" << sizer << ")";
    throw Error(m.str());
  }
  check_aligned(ws, "workspace");
}

void validate_problem(const GemmProblem& prob) {
  validate_shape(prob.shape);
  validate_table(prob.table, prob.shape.table_size(), prob.shape.bits);
  if (prob.dtype != DType::F16 && prob.dtype != DType::BF16)
    throw Error(std::string("x: dtype ") + dtype_name(prob.dtype) + ", expected float16 or bfloat16");
  if (prob.M < 1) throw Error("M: expected >= 1, got " + std::to_string(prob.M));
  if (prob.M > (int64_t(1) << 30) || prob.shape.N > (int64_t(1) << 30) || prob.shape.K > (int64_t(1) << 30))
    throw Error("shape: M, N and K must each be below 2^30");
  check_aligned(prob.x, "x");
  check_aligned(prob.packed, "packed codes");
  check_aligned(prob.packed_scales, "packed scales");
  if (!prob.y) throw Error("y: null output pointer");
  if (prob.epilogue == Epilogue::kSiluMul) {
    if (prob.shape.N % 16 != 0)
      throw Error("epilogue silu_mul: N = " + std::to_string(prob.shape.N) +
                  ", expected a multiple of 16 (gate and up rows interleaved by 8)");
    if (prob.bias) throw Error("epilogue silu_mul: a bias is not supported");
  } else if (prob.epilogue != Epilogue::kNone) {
    throw Error("epilogue: unknown value " + std::to_string(int(prob.epilogue)));
  }
  if (prob.residual && prob.epilogue != Epilogue::kNone) throw Error("residual: not with the silu_mul epilogue");
  if (prob.residual && prob.bias) throw Error("residual: not with a bias (add it to the residual)");
  if (prob.residual) check_aligned(prob.residual, "residual");
  if (prob.rms_norm && !(prob.rms_eps >= 0.f && prob.rms_eps < 1.f))
    throw Error("rms_eps: expected 0 <= eps < 1, got " + std::to_string(prob.rms_eps));
}

bool pdl_supported(int device) {
  static PerDevice<bool> cache;
  if (device < 0 || device >= PerDevice<bool>::kMaxDevices) return false;
  return cache.get(device, [&] {
    int major = 0;
    const bool ok = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess;
    cudaGetLastError();
    return ok && major >= 9;
  });
}

int sm_count(int device) {
  static PerDevice<int> cache;
  return cache.get(device, [&] {
    int n = 0;
    check_cuda(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
    return n;
  });
}

double peak_dram_bytes_per_s(int device) {
  static PerDevice<double> cache;
  return cache.get(device, [&] {
    int clock_khz = 0, bus_bits = 0;
    const bool ok = cudaDeviceGetAttribute(&clock_khz, cudaDevAttrMemoryClockRate, device) == cudaSuccess &&
                    cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, device) == cudaSuccess;
    cudaGetLastError();
    return ok ? 2.0 * clock_khz * 1e3 * bus_bits / 8 : 0.0;  // double data rate
  });
}

void allow_dynamic_smem(const void* kernel, int bytes, int device) {
  static std::mutex mu;
  static std::set<std::pair<const void*, int>> done;  // (kernel, device)
  std::lock_guard<std::mutex> lock(mu);
  if (device < 0 || device >= 64) throw Error("device: index out of range");
  if (done.count({kernel, device})) return;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes), "cudaFuncSetAttribute");
  done.insert({kernel, device});
}

bool available() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) { cudaGetLastError(); return false; }
  return n > 0;
}

const char* build_info() {
  static char buf[256];
  int rt = 0, drv = 0, n = 0;
  cudaRuntimeGetVersion(&rt);
  cudaDriverGetVersion(&drv);
  if (cudaGetDeviceCount(&n) != cudaSuccess) { cudaGetLastError(); n = 0; }
  std::snprintf(buf, sizeof buf, "CUDA kernels built (runtime %d, driver %d, %d device(s))", rt, drv, n);
  return buf;
}

// Dispatch rule (H100, 2026-11-26, bench/bench_kernel.py --paths and lutmm_bench, 4-bit g128;
// docs/performance-log.md, items 24-25): the fused LUT kernels are memory-bound and win while the weight stream
// dominates (M <= 32, one pass of their 32-token tiles). Past it the lookups are paid per token tile
// and the tensor cores set the pace. On Hopper the fused wgmma kernel serves 32 < M <= 3584: at
// M = 33-64 its 64-token tiles beat the LUT kernel's two passes (M = 48: 8192x8192 37.3 vs 57.4 us,
// 57344x8192 207 vs 328 us) and at M = 32 the LUT kernel wins (29.7 vs 37.2 us); since its codes and
// scales arrive as TMA boxes it beats dequantize + cuBLAS up to M = 2048 on every measured shape
// (8192x8192 M = 1024: 197 vs 258 us). Where the dense copy's one extra pass is cheap next to the GEMM,
// dequantize + cuBLAS takes over. 4 bits: H200, 2026-11-28, steady-state timing, both paths forced in
// the same row (item 83), on the 8 LLaMA shapes: M = 2048 the wgmma kernel faster on 7 by 2-7%;
// M = 2560-3584 mixed, within 8% either way (the same wgmma kernel timed twice in one row moved up
// to 7%); M = 4096 dequantize + cuBLAS faster on all 8 by 0.2-5.6% (8192x8192 836 vs 877 us), also
// against the wgmma timing taken first in the row; M = 8192 by 2-7%. Ties go to the wgmma kernel,
// which needs no N x K scratch. 3 bits (two code fields per lookup) hands over at M = 2048: H100, at
// M = 4096 dequantize + cuBLAS was 15% faster (8192x8192: 835 vs 957-967 us), at M = 1024 the wgmma
// kernel (213-236 vs 262 us); H200 (item 83), M = 2048 the wgmma kernel on 6 of 8 shapes by 0.2-2.9%,
// M = 4096 dequantize + cuBLAS on all 8 by 1-13%. Elsewhere (Ampere, or a build without sm_90a code)
// the LUT kernels up to M = 64 and dequantize + cuBLAS above.
constexpr int64_t kLutMaxM = 32, kLutMaxMNoWgmma = 64;
constexpr int64_t wgmma_max_m(int bits) { return bits == 3 ? 2048 : 3584; }
Path choose_path(int64_t M, const Shape& shape, DType dtype, int device) {
  (void)dtype;
  if (M <= kLutMaxM) return Path::kLut;
  const bool wgmma = wgmma_supported(device);
  if (!wgmma) return M <= kLutMaxMNoWgmma ? Path::kLut : Path::kDequant;
  return M <= wgmma_max_m(shape.bits) ? Path::kWgmma : Path::kDequant;
}

size_t dequant_scratch_bytes(const Shape& shape) {
  validate_shape(shape);
  return size_t(shape.N) * size_t(shape.K) * 2;
}

namespace {

constexpr int kDqWarps = 8;
struct Table16 { float v[16]; };

// One warp per 16 x 128 block. Thanks to the permuted column order (docs/format.md), lane (g, t)
// owns, for each 32-column chunk j, the 8 consecutive columns 32 j + 8 t .. +8 of rows g and g + 8:
// (ks = 2j, p = 0/2) and (ks = 2j + 1, p = 0/2) for row g, p = 1/3 for row g + 8. So each lane
// writes 16-byte vectors straight to global memory, no shared-memory transpose.
template <int BITS, typename T>
__global__ void __launch_bounds__(kDqWarps * 32)
dequant_kernel(const uint8_t* __restrict__ w, const uint16_t* __restrict__ s, T* __restrict__ out,
               const Table16 tab, int N, int K, int G, int gl, int row_blocks, int col_blocks) {
  __shared__ float tv[16];  // T rounded to T's dtype, as the LUT path sees it
  if (threadIdx.x == 0) {
#pragma unroll
    for (int i = 0; i < 16; ++i) tv[i] = Elem<T>::to_float(Elem<T>::from_float(tab.v[i]));
  }
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t blk = int64_t(blockIdx.x) * kDqWarps + warp;
  if (blk >= int64_t(row_blocks) * col_blocks) return;
  const int rb = int(blk / col_blocks), kb = int(blk % col_blocks);
  uint32_t wd[8] = {}, hi[2] = {};
  load_codes<BITS>(w + blk * (256 * BITS), lane, wd, hi);
  const int nchunks = min(4, (K - kb * kBlockCols) / 32);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if (j >= nchunks) break;
    const int grp = (kb * 4 + j) >> gl;
    const float2 sc = __half22float2(*reinterpret_cast<const __half2*>(s + (int64_t(rb) * G + grp) * 16 + g * 2));
    uint32_t row0[4], row1[4];  // 8 values each for rows g and g + 8
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int ks = 2 * j + h;
#pragma unroll
      for (int p = 0; p < 4; ++p) {
        const int idx = pair_code<BITS>(wd, hi, ks, p);
        int q0, q1;
        pair_codes<BITS>(idx, q0, q1);
        const float scale = (p & 1) ? sc.y : sc.x;
        const uint32_t v = Elem<T>::pack2(tv[q0] * scale, tv[q1] * scale);
        if (p & 1) row1[2 * h + (p >> 1)] = v; else row0[2 * h + (p >> 1)] = v;
      }
    }
    const int64_t col = int64_t(kb) * kBlockCols + 32 * j + 8 * t;
    const int n0 = rb * 16 + g, n1 = n0 + 8;
    if (n0 < N) *reinterpret_cast<uint4*>(out + int64_t(n0) * K + col) = make_uint4(row0[0], row0[1], row0[2], row0[3]);
    if (n1 < N) *reinterpret_cast<uint4*>(out + int64_t(n1) * K + col) = make_uint4(row1[0], row1[1], row1[2], row1[3]);
  }
}

template <typename T>
void launch_dq(const void* packed, const uint16_t* ps, const float* table, const Shape& s, void* out, cudaStream_t st) {
  Table16 tab;
  for (int i = 0; i < 16; ++i) tab.v[i] = i < s.table_size() ? table[i] : 0.f;
  const int64_t nblk = s.row_blocks() * s.col_blocks();
  const dim3 grid(unsigned((nblk + kDqWarps - 1) / kDqWarps));
  const int gl = group_log2(s.group_size);
  const auto* w = static_cast<const uint8_t*>(packed);
  auto* y = static_cast<T*>(out);
  const int N = int(s.N), K = int(s.K), G = int(s.groups()), rbs = int(s.row_blocks()), cbs = int(s.col_blocks());
  with_bits(s.bits, [&](auto b) {
    dequant_kernel<decltype(b)::value, T><<<grid, kDqWarps * 32, 0, st>>>(w, ps, y, tab, N, K, G, gl, rbs, cbs);
  });
  check_cuda(cudaGetLastError(), "dequant_kernel launch");
}

}  // namespace

void dequantize(const void* packed, const uint16_t* packed_scales, const float* table, const Shape& shape, DType dtype,
                void* out, void* stream) {
  validate_shape(shape);
  validate_table(table, shape.table_size(), shape.bits);
  if (reinterpret_cast<uintptr_t>(packed) % 16 || reinterpret_cast<uintptr_t>(packed_scales) % 4 ||
      reinterpret_cast<uintptr_t>(out) % 16)
    throw Error("dequantize: packed codes and output must be 16-byte aligned, scales 4-byte aligned");
  auto st = static_cast<cudaStream_t>(stream);
  if (dtype == DType::F16) launch_dq<__half>(packed, packed_scales, table, shape, out, st);
  else if (dtype == DType::BF16) launch_dq<__nv_bfloat16>(packed, packed_scales, table, shape, out, st);
  else throw Error(std::string("dtype: ") + dtype_name(dtype) + ", expected float16 or bfloat16");
}

}  // namespace gpu
}  // namespace lutmm
