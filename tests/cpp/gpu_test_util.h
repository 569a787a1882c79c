// Helpers for the GPU tests (lutmm_gpu_tests): skipping without a device, checked CUDA calls, device
// buffers, fp16 / bf16 conversions by DType.
#pragma once
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../../src/half.h"
#include "lutmm/cuda.h"
#include "lutmm/format.h"

#define REQUIRE_GPU() \
  if (!lutmm::gpu::available()) GTEST_SKIP() << "no CUDA device: GPU test skipped"

// Tests of sm_90a-only code (the wgmma kernel, the TMA decode kernel).
#define REQUIRE_WGMMA()                                                   \
  REQUIRE_GPU();                                                          \
  if (!lutmm::gpu::wgmma_supported(0)) GTEST_SKIP() << "not an sm_90 GPU: wgmma test skipped"

#define CK(x) ASSERT_EQ((x), cudaSuccess) << cudaGetErrorString(x)

namespace lutmm_test {

// Device memory of `b` bytes (at least 16), freed on scope exit; p is null when the allocation failed.
template <typename P> struct DevBuf {
  P* p = nullptr;
  size_t bytes = 0;
  explicit DevBuf(size_t b) : bytes(b) { if (cudaMalloc(&p, std::max<size_t>(b, 16)) != cudaSuccess) p = nullptr; }
  // A copy of `host` on the device (a failed copy is a test failure and leaves p null).
  template <typename V>
  explicit DevBuf(const std::vector<V>& host) : DevBuf(host.size() * sizeof(V)) {
    const cudaError_t e = p ? cudaMemcpy(p, host.data(), bytes, cudaMemcpyHostToDevice) : cudaErrorMemoryAllocation;
    if (e == cudaSuccess) return;
    ADD_FAILURE() << "DevBuf: copying " << bytes << " bytes to the device: " << cudaGetErrorString(e);
    cudaFree(p);
    p = nullptr;
  }
  ~DevBuf() { cudaFree(p); }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
};

inline uint16_t to_dtype(float f, lutmm::DType dt) {
  return dt == lutmm::DType::F16 ? lutmm::float_to_half(f) : lutmm::float_to_bf16(f);
}
inline float from_dtype(uint16_t h, lutmm::DType dt) {
  return dt == lutmm::DType::F16 ? lutmm::half_to_float(h) : lutmm::bf16_to_float(h);
}

}  // namespace lutmm_test
