// A stand-in for the kernel before a linear in a decode step (a norm or SiLU that inductor generates),
// for lutmm_bench's gap modes: it reads X and writes it back unchanged, one element per thread.
// Launched with programmatic dependent launch it behaves as inductor's Triton kernels with
// torch._inductor.config.triton.enable_pdl (torch 2.11: `gdc_wait` before the first load of a buffer
// the previous kernel wrote, `gdc_launch_dependents` after the loads), so the next kernel may start
// its prologue while this one finishes.
#include <cuda_runtime.h>

#include <cstdint>

namespace {

__global__ void filler_kernel(uint16_t* x, int64_t n) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const uint16_t v = i < n ? x[i] : uint16_t(0);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
  if (i < n) x[i] = v;
}

}  // namespace

// Enqueues the filler over the n 16-bit elements at x on `stream`; pdl: with the programmatic
// stream serialization attribute (sm_90), else a plain launch.
cudaError_t bench_launch_filler(void* x, int64_t n, cudaStream_t stream, bool pdl) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(unsigned((n + 255) / 256));
  cfg.blockDim = dim3(256);
  cfg.stream = stream;
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = &attr;
  cfg.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, filler_kernel, static_cast<uint16_t*>(x), n);
}
