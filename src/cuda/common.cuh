// Small device helpers shared by the lutmm kernels: element types, cp.async, mma.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <array>
#include <cstdint>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>

#include "lutmm/cuda.h"
#include "lutmm/format.h"

#ifndef LUTMM_EXPERIMENT  // kernel experiment number of A/B builds (CMake sets it; the numbers are listed
                          // in lut_gemm.cu and lut_wgmma.cu; the one definition of the default)
#define LUTMM_EXPERIMENT 0
#endif
// Instrumentation builds that record the TMA decode kernel's per-worker timeline (timeline.cuh): 200,
// and 201 = 200 with experiment 1 (no CTAs of two warp groups; before item 99, 201 had experiment 9's).
#define LUTMM_TIMELINE (LUTMM_EXPERIMENT == 200 || LUTMM_EXPERIMENT == 201)

namespace lutmm {
namespace gpu {

// The decode kernels' ablation builds, LUTMM_EXPERIMENT 40 + mask (lut_gemm.cu's list): whether the
// mask holds `bit` (1, 2, 4: a part left out; 8, 16, 32: lut_stream.cu's variants combined with them).
__host__ __device__ constexpr bool decode_ablation(int bit) {
  return LUTMM_EXPERIMENT >= 40 && ((LUTMM_EXPERIMENT - 40) & bit) != 0;
}

// Throws lutmm::Error with the CUDA error string when `e` is not cudaSuccess.
void check_cuda(cudaError_t e, const char* what);
// Throws lutmm::Error naming the problem unless `ptr` is 16-byte aligned.
void check_aligned(const void* ptr, const char* what);
// Throws lutmm::Error unless the caller's workspace (ws, ws_bytes) is non-null, 16-byte aligned and
// holds at least `need` bytes; `sizer` names the function that tells the size.
void check_workspace(const void* ws, size_t ws_bytes, size_t need, const char* sizer);
// Checks what every fused-kernel call needs (shape, table, dtype, M, pointers, alignment); throws
// lutmm::Error naming the problem.
void validate_problem(const GemmProblem& prob);

// Activation element type traits: fp16 and bf16 behave the same except for the mma instruction.
template <typename T> struct Elem;
template <> struct Elem<__half> {
  static __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ __half from_float(float f) { return __float2half_rn(f); }
  static __device__ __forceinline__ float to_float(__half h) { return __half2float(h); }
  // D (16x8 fp32) += A (16x16, 4 regs) * B (16x8, 2 regs)
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};
template <> struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float f) { return __float2bfloat16_rn(f); }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 h) { return __bfloat162float(h); }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// 16-byte global -> shared copy that bypasses L1; src_bytes = 0 zero-fills the destination.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
}
// 4-byte global -> shared copy (through L1); src_bytes = 0 zero-fills the destination.
__device__ __forceinline__ void cp_async4(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
}
// The "memory" clobbers keep the compiler from moving shared-memory accesses across the commit / wait
// (every wait in the kernels is followed by a barrier, which also does; this does not rely on it).
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Programmatic dependent launch (sm_90; no-ops elsewhere and when the kernel was launched without
// the attribute): wait until the previous kernel in the stream has finished and its writes are
// visible / let the next kernel start launching.
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void grid_dependents_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// A value per device, computed on first use (thread-safe; after that a read costs one atomic load,
// no lock). A computation that throws is tried again on the next call.
template <typename V>
class PerDevice {
 public:
  static constexpr int kMaxDevices = 64;
  template <typename F>
  const V& get(int device, F&& compute) {
    if (device < 0 || device >= kMaxDevices) throw Error("device: index out of range");
    std::call_once(once_[device], [&] { value_[device] = compute(); });
    return value_[device];
  }

 private:
  std::once_flag once_[kMaxDevices];
  V value_[kMaxDevices] = {};
};

// True when `device` supports programmatic dependent launch (compute capability >= 9.0).
bool pdl_supported(int device);
// Streaming multiprocessors of `device` (cached per device).
int sm_count(int device);
// Lets `kernel` use `bytes` of dynamic shared memory on `device` (cudaFuncSetAttribute), once per
// kernel and device; thread-safe. Every launcher calls it before its first launch.
void allow_dynamic_smem(const void* kernel, int bytes, int device);

// log2(group_size / 32), the kernels' group-size parameter; 30 when group_size = K is not 32 x a power
// of two (then one group spans every k-block).
inline int group_log2(int64_t group_size) {
  const int64_t gc = group_size / 32;
  return (gc & (gc - 1)) == 0 ? __builtin_ctzll(uint64_t(gc)) : 30;
}

// Scale groups that intersect one 128-column k-block: 4 (g = 32), 2 (g = 64), 1 (g >= 128), for gl =
// group_log2(g): the width of the TMA kernels' scale boxes and stage rows.
__host__ __device__ __forceinline__ int groups_per_kblock(int gl) { return 4 >> (gl < 2 ? gl : 2); }

// Launches kernel<<<grid, block, smem, stream>>>(args...) on `device` (the current device) allowing it
// to overlap the previous kernel in the stream (programmatic stream serialization) where the device
// supports it; the kernel must call grid_dependency_wait() before touching anything a previous kernel
// writes or reads.
// cluster > 1: in thread-block clusters of `cluster` CTAs along x (sm_90; grid.x a multiple of it).
template <typename... KArgs, typename... Args>
void launch_pdl(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, int device,
                int cluster, Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[2];
  int n = 0;
  if (LUTMM_EXPERIMENT != 7 && pdl_supported(device)) {
    attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n++].val.programmaticStreamSerializationAllowed = 1;
  }
  if (cluster > 1) {
    attr[n].id = cudaLaunchAttributeClusterDimension;
    attr[n].val.clusterDim.x = unsigned(cluster);
    attr[n].val.clusterDim.y = attr[n].val.clusterDim.z = 1;
    ++n;
  }
  cfg.attrs = attr;
  cfg.numAttrs = unsigned(n);
  check_cuda(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...), "kernel launch");
}

// Clusters of c CTAs (c = 2..8: [c]; [0], [1] 0) of `kernel` (`threads` per CTA, `smem` bytes of
// dynamic shared memory, already allowed) that run on `device` at once (how many GPCs hold that many
// free CTA slots; the grid, 32 clusters, only has to be a multiple of c); all 0 below sm_90.
template <typename... KArgs>
std::array<int, 9> max_clusters(void (*kernel)(KArgs...), int threads, int smem, int device) {
  std::array<int, 9> n{};
  if (!pdl_supported(device)) return n;  // compute capability < 9.0: no clusters
  for (int c = 2; c <= 8; ++c) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(unsigned(32 * c));
    cfg.blockDim = dim3(unsigned(threads));
    cfg.dynamicSmemBytes = size_t(smem);
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = unsigned(c);
    attr[0].val.clusterDim.y = attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    if (cudaOccupancyMaxActiveClusters(&n[c], reinterpret_cast<const void*>(kernel), &cfg) != cudaSuccess) n[c] = 0;
    cudaGetLastError();  // clear a refusal
  }
  return n;
}

// Calls f(std::integral_constant<int, B>{}) with B = bits (2, 3 or 4, validated before): turns the
// runtime bit width into the template argument the kernels take; returns what f returns.
template <typename F>
auto with_bits(int bits, F&& f) {
  if (bits == 2) return f(std::integral_constant<int, 2>{});
  if (bits == 3) return f(std::integral_constant<int, 3>{});
  return f(std::integral_constant<int, 4>{});
}

// Inverse of pack.h's pair_index: the two codes behind pair-table entry `idx`.
template <int BITS> __host__ __device__ __forceinline__ void pair_codes(int idx, int& q0, int& q1) {
  q0 = idx & ((1 << BITS) - 1);
  q1 = idx >> BITS;
}

}  // namespace gpu
}  // namespace lutmm
