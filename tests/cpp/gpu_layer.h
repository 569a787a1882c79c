// Helpers for the GEMM GPU tests (test_gpu.cpp, test_gpu_splits.cpp, test_gpu_epilogue.cpp): a random
// packed layer, one fused-kernel call on it (output poisoned first), the relative error, a growing
// workspace.
#pragma once
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "lutmm/cuda.h"
#include "lutmm/pack.h"
#include "lutmm/tables.h"
#include "gpu_test_util.h"
#include "test_util.h"

namespace lutmm_test {
using namespace lutmm;

struct Layer {
  Shape s;
  std::vector<float> table, table_rounded;  // table as given / as the kernel sees it (rounded to dtype)
  std::vector<uint8_t> codes, packed;
  std::vector<uint16_t> scales, packed_scales;
};

inline Layer make_layer(const Shape& s, DType dt, std::mt19937& rng, int table_kind) {
  Layer L;
  L.s = s;
  const int T = s.table_size();
  if (table_kind == 0) L.table = nf_table(s.bits);
  else if (table_kind == 1) L.table = int_table(s.bits);
  else {  // random, non-monotone, negative and large values
    std::uniform_real_distribution<float> d(-40.f, 25.f);
    for (int i = 0; i < T; ++i) L.table.push_back(d(rng));
  }
  for (float v : L.table) L.table_rounded.push_back(from_dtype(to_dtype(v, dt), dt));
  L.codes = random_codes(size_t(s.N * s.K), s.bits, rng());
  L.scales = random_scales(size_t(s.N * s.groups()), rng(), 0.002f, 0.05f);
  L.packed.resize(size_t(s.packed_bytes()));
  L.packed_scales.resize(size_t(s.packed_scale_count()));
  pack_codes(L.codes.data(), s, L.packed.data());
  pack_scales(L.scales.data(), s, L.packed_scales.data());
  return L;
}

// The GemmProblem of layer L (shape, table) for M rows of activations x of dtype dt, its packed codes
// and scales at `packed` and `scales` on the device, and the output y (no bias, no epilogue).
inline gpu::GemmProblem layer_problem(const Layer& L, DType dt, int64_t M, const void* x, const void* packed,
                                      const void* scales, void* y) {
  gpu::GemmProblem p;
  p.x = x; p.dtype = dt; p.M = M; p.shape = L.s; p.packed = packed;
  p.packed_scales = static_cast<const uint16_t*>(scales); p.y = y;
  for (int i = 0; i < L.s.table_size(); ++i) p.table[i] = L.table[size_t(i)];
  return p;
}

// Workspace bytes the fused path `path` needs.
inline size_t ws_need(gpu::Path path, int64_t M, const Shape& s) {
  return path == gpu::Path::kWgmma ? gpu::wgmma_workspace_bytes(M, s, 0) : gpu::workspace_bytes(M, s, 0);
}

// Runs a fused kernel (kLut, with `kernel` choosing the decode kernel, or kWgmma); returns Y as
// floats (M x N, or M x N/2 with Epilogue::kSiluMul). Y is poisoned with NaN first, and so are
// kGuardElems elements on each side of it, which must stay untouched (a failed expectation names
// the first one written). y_offset_elems: Y starts that many 2-byte elements past a 256-byte-aligned
// allocation's guard (odd: an unaligned Y).
constexpr size_t kGuardElems = 64;
inline std::vector<float> run_gpu(const Layer& L, const std::vector<uint16_t>& x, int64_t M, DType dt,
                                  const std::vector<uint16_t>* bias, void* ws, size_t ws_bytes,
                                  gpu::Path path = gpu::Path::kLut, gpu::LutKernel kernel = gpu::LutKernel::kAuto,
                                  gpu::WgSplit split = gpu::WgSplit::kAuto,
                                  gpu::DecodeSplit dsplit = gpu::DecodeSplit::kAuto,
                                  gpu::Epilogue epilogue = gpu::Epilogue::kNone, bool rms_norm = false,
                                  float rms_eps = 0.f, const std::vector<uint16_t>* residual = nullptr,
                                  size_t y_offset_elems = 0) {
  const Shape& s = L.s;
  const size_t y_elems = size_t(M * (epilogue == gpu::Epilogue::kSiluMul ? s.N / 2 : s.N));
  const size_t y_begin = kGuardElems + y_offset_elems, y_alloc = y_begin + y_elems + kGuardElems;
  const std::vector<uint16_t> none;
  DevBuf<uint8_t> dx(x), dw(L.packed), ds(L.packed_scales), dy(y_alloc * 2), db(bias ? *bias : none),
      dr(residual ? *residual : none);
  cudaMemset(dy.p, 0xff, y_alloc * 2);  // NaN in fp16 and bf16, guards included
  gpu::GemmProblem p = layer_problem(L, dt, M, dx.p, dw.p, ds.p, dy.p + y_begin * 2);
  p.bias = bias ? db.p : nullptr;
  p.epilogue = epilogue;
  p.rms_norm = rms_norm;
  p.rms_eps = rms_eps;
  p.residual = residual ? dr.p : nullptr;
  if (path == gpu::Path::kWgmma) gpu::wgmma_gemm(p, ws, ws_bytes, nullptr, split);
  else gpu::lut_gemm(p, ws, ws_bytes, nullptr, kernel, dsplit);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<uint16_t> all(y_alloc);
  cudaMemcpy(all.data(), dy.p, all.size() * 2, cudaMemcpyDeviceToHost);
  for (size_t i = 0; i < y_alloc; ++i)
    if ((i < y_begin || i >= y_begin + y_elems) && all[i] != 0xffff) {
      ADD_FAILURE() << "output guard written: element " << (int64_t(i) - int64_t(y_begin)) << " of Y (M=" << M
                    << " x " << y_elems / size_t(M) << ", Y offset " << y_offset_elems << " elements)";
      break;
    }
  std::vector<float> y(y_elems);
  for (size_t i = 0; i < y.size(); ++i) y[i] = from_dtype(all[y_begin + i], dt);
  return y;
}

// Relative Frobenius error; NaN anywhere (an unwritten output) returns +inf.
inline double rel_err(const std::vector<float>& y, const std::vector<float>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < y.size(); ++i) {
    if (!std::isfinite(y[i])) return INFINITY;
    num += (double(y[i]) - ref[i]) * (double(y[i]) - ref[i]);
    den += double(ref[i]) * ref[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

struct Workspace {
  void* p = nullptr;
  size_t bytes = 0;
  void ensure(size_t b) {
    if (b <= bytes) return;
    cudaFree(p);
    cudaMalloc(&p, b);
    cudaMemset(p, 0, b);
    bytes = b;
  }
  ~Workspace() { cudaFree(p); }
};


}  // namespace lutmm_test
