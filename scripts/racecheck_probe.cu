// Does compute-sanitizer's racecheck accept a cp.async write that is waited for, followed by a CTA
// barrier and a release/acquire cluster barrier, and then overwritten by a peer CTA's
// st.shared::cluster? That is the pattern of the cp.async decode kernel's cluster exchange
// (lut_gemm.cu: zero-fill copies in the stages, cp_async_wait<0>, cluster_finish), on which racecheck
// reports "Potential WAW hazard (invalid memcpy_async synchronization)" (docs/performance-log.md
// item 64). Built and run by `SANITIZE_PROBE=1 bash scripts/gpu.sh sanitize` (sm_90a only):
//   ./racecheck_probe V under racecheck, V = variant:
//   0  the kernel's pattern: cp.async zero-fill, wait_group 0, __syncthreads, cluster barrier, peer write
//   1  control: a plain st.shared instead of the copy (no async copy at all)
//   2  a real hazard: no wait_group before the barriers (the copy may land after the peer's write)
//   3  as 0, but another warp of the same CTA overwrites the slot with a plain st.shared after the
//      CTA barrier (no cluster): whether the tool orders a waited-for copy before any other writer
//   4, 5  as 0 and 3 with a real 16-byte copy (src-size 16) instead of the zero-fill (src-size 0)
// If 0 is reported like 2 while 1 is clean, the report on the kernel is the tool's view of a correct
// pattern; if 0 is clean, the kernel differs from the pattern and the report needs another look.
// The program also checks the values: every slot must hold the peer's write (rank + 1).
#include <cstdio>
#include <cstdint>
#include <cuda_runtime.h>

constexpr int kThreads = 256, kCluster = 8, kClusters = 16;

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;\n" ::: "memory");
}

__global__ void __cluster_dims__(kCluster, 1, 1) probe(const float* src, float* out, int arg) {
  const int src_bytes = arg >= 4 ? 16 : 0;             // 4, 5: a real copy of src's zeros
  const int variant = arg == 4 ? 0 : arg == 5 ? 3 : arg;
  __shared__ alignas(16) float buf[kThreads * 4];
  const int t = threadIdx.x;
  uint32_t rank;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
  if (variant == 1) {
    for (int i = 0; i < 4; ++i) buf[t * 4 + i] = 0.f;
  } else {  // 16-byte copy; src-size 0 zero-fills the destination, as the kernel does past N
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(&buf[t * 4])), "l"(src + t * 4),
                 "r"(src_bytes));
    asm volatile("cp.async.commit_group;\n" ::: "memory");
    if (variant != 2) asm volatile("cp.async.wait_group 0;\n" ::: "memory");
  }
  __syncthreads();
  if (variant == 3) {  // slot t written by thread t + 32 of this CTA, the value the peer would write
    const int u = (t + kThreads - 32) % kThreads;
    for (int i = 0; i < 4; ++i) buf[u * 4 + i] = float(rank);
    __syncthreads();
    for (int i = 0; i < 4; ++i) out[blockIdx.x * kThreads * 4 + t * 4 + i] = buf[t * 4 + i];
    return;
  }
  cluster_sync();  // every CTA is done with its buffer
  // Thread t writes slot t of the next rank's buffer (rank r receives rank r - 1's writes).
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(smem_u32(&buf[t * 4])), "r"((rank + 1) % kCluster));
  for (int i = 0; i < 4; ++i)
    asm volatile("st.shared::cluster.f32 [%0], %1;" ::"r"(remote + 4u * i), "f"(float((rank + 1) % kCluster)) : "memory");
  cluster_sync();  // the writes have landed
  if (variant == 2) asm volatile("cp.async.wait_group 0;\n" ::: "memory");
  for (int i = 0; i < 4; ++i) out[blockIdx.x * kThreads * 4 + t * 4 + i] = buf[t * 4 + i];
}

int main(int argc, char** argv) {
  const int variant = argc > 1 ? std::atoi(argv[1]) : 0;
  const int n = kClusters * kCluster * kThreads * 4;
  float *src = nullptr, *out = nullptr;
  if (cudaMalloc(&src, kThreads * 4 * sizeof(float)) != cudaSuccess || cudaMalloc(&out, n * sizeof(float)) != cudaSuccess ||
      cudaMemset(src, 0, kThreads * 4 * sizeof(float)) != cudaSuccess) {
    std::printf("cudaMalloc failed\n");
    return 1;
  }
  probe<<<kClusters * kCluster, kThreads>>>(src, out, variant);
  const cudaError_t e = cudaDeviceSynchronize();
  if (e != cudaSuccess) {
    std::printf("variant %d: %s\n", variant, cudaGetErrorString(e));
    return 1;
  }
  float* h = new float[n];
  cudaMemcpy(h, out, n * sizeof(float), cudaMemcpyDeviceToHost);
  int bad = 0;
  for (int b = 0; b < kClusters * kCluster; ++b)
    for (int j = 0; j < kThreads * 4; ++j) bad += h[b * kThreads * 4 + j] != float(b % kCluster);
  std::printf("variant %d: %d of %d slots differ from the peer's write\n", variant, bad, n);
  delete[] h;
  return variant != 2 && bad != 0;
}
