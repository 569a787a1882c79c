// Minimal Hopper (sm_90a) warpgroup-MMA helpers for the prefill kernel (lut_wgmma.cu): wgmma with A
// from registers and B from shared memory through a matrix descriptor, and the fences and waits
// around it. Device code is emitted for sm_90a only; elsewhere these compile to nothing and the
// host never launches the kernel (see wgmma_supported()).
#pragma once
#include <cstdint>

#include "common.cuh"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define LUTMM_SM90A 1
#else
#define LUTMM_SM90A 0
#endif

namespace lutmm {
namespace gpu {
namespace wg {

// Shared-memory matrix descriptor of a K-major operand tile with the 128-byte swizzle: rows of 64
// 16-bit elements (128 B), 8-row atoms of 1024 B (the stride byte offset), atoms 1024-byte aligned in
// shared memory; the k16 slice s of a row starts 32 * s bytes further. Bits: [0,14) address >> 4,
// [16,30) leading byte offset >> 4 (unused with this swizzle: 1), [32,46) stride byte offset >> 4,
// [62,64) swizzle mode (1 = 128 B).
__device__ __forceinline__ uint64_t desc_sw128(uint32_t smem_byte_addr) {
  return uint64_t((smem_byte_addr & 0x3FFFF) >> 4) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) |
         (uint64_t(1) << 62);
}
// Byte offset of element (row r, column c) of such a tile: the 16-byte chunk index is XORed with r % 8.
__host__ __device__ constexpr uint32_t sw128_offset(uint32_t r, uint32_t c) {
  return r * 128 + ((((c / 8) ^ (r % 8)) & 7) * 16) + (c % 8) * 2;
}

__device__ __forceinline__ void fence() {
#if LUTMM_SM90A
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void commit() {
#if LUTMM_SM90A
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N> __device__ __forceinline__ void wait() {
#if LUTMM_SM90A
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
// Orders this thread's generic-proxy shared-memory writes (cp.async, st.shared) before later
// async-proxy reads (wgmma operands); use before the barrier that publishes a stage.
__device__ __forceinline__ void fence_proxy_async() {
#if LUTMM_SM90A
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
// ---- mbarriers and the TMA / bulk copies that complete on them (shared::cta addresses) ----------
__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
#if LUTMM_SM90A
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
#endif
}
// Makes mbarrier initialisation visible to the async proxy (TMA) and the other threads' waits;
// follow with a CTA barrier.
__device__ __forceinline__ void mbar_init_fence() {
#if LUTMM_SM90A
  asm volatile("fence.mbarrier_init.release.cluster;\nfence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
#if LUTMM_SM90A
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
#endif
}
// One arrival that also announces `bytes` of async copies completing on this barrier.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
#if LUTMM_SM90A
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
#endif
}
// Blocks until the barrier's phase with parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
#if LUTMM_SM90A
  asm volatile(
      "{\n.reg .pred done;\nwait_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n}\n" ::"r"(bar), "r"(parity) : "memory");
#endif
}
// 2-D tensor tile (TMA) global -> shared, completing on `bar`. c0: innermost coordinate.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const void* tmap, int c0, int c1, uint32_t bar) {
#if LUTMM_SM90A
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n"
      ::"r"(dst), "l"(tmap), "r"(c0), "r"(c1), "r"(bar) : "memory");
#endif
}
// 3-D tensor tile (TMA) global -> shared, completing on `bar`. c0: innermost coordinate.
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const void* tmap, int c0, int c1, int c2, uint32_t bar) {
#if LUTMM_SM90A
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n"
      ::"r"(dst), "l"(tmap), "r"(c0), "r"(c1), "r"(c2), "r"(bar) : "memory");
#endif
}
// Contiguous bulk copy global -> shared (16-byte aligned, size a multiple of 16), completing on `bar`.
__device__ __forceinline__ void bulk_load(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
#if LUTMM_SM90A
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
               ::"r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
#endif
}
// Per-warpgroup register budget (all 4 warps of the warpgroup execute it): producers give registers
// back, consumers take them.
template <int N> __device__ __forceinline__ void regs_dec() {
#if LUTMM_SM90A
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}
template <int N> __device__ __forceinline__ void regs_inc() {
#if LUTMM_SM90A
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}

// Barrier over the first `threads` threads of the CTA (named barrier `id`, 1..15).
__device__ __forceinline__ void named_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Arrival at named barrier `id` without waiting (its `threads` count as in named_sync): the producer side
// of a producer / consumer hand-off, whose consumers wait with named_sync(id, threads); the shared-memory
// writes before the arrival are visible to them after it.
__device__ __forceinline__ void named_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// ---- thread-block clusters (the split-K reduction of lut_wgmma.cu) -----------------------------
// Barrier over every thread of every CTA of the cluster; orders each thread's earlier shared-memory
// writes (local or to another CTA's shared memory) before every thread's later reads. Every thread
// that has not exited must take part (not .aligned: a warp's lanes may arrive apart).
__device__ __forceinline__ void cluster_sync() {
#if LUTMM_SM90A
  asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;\n" ::: "memory");
#endif
}
// The shared::cluster address of shared::cta address `addr` in the CTA of cluster rank `rank`.
__device__ __forceinline__ uint32_t map_to_rank(uint32_t addr, uint32_t rank) {
  uint32_t r = 0;
#if LUTMM_SM90A
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(r) : "r"(addr), "r"(rank));
#endif
  return r;
}
// 32-bit store to a shared::cluster address (another CTA's shared memory, or this one's).
__device__ __forceinline__ void st_cluster(uint32_t addr, float v) {
#if LUTMM_SM90A
  asm volatile("st.shared::cluster.f32 [%0], %1;\n" ::"r"(addr), "f"(v) : "memory");
#endif
}

// Pins registers: the compiler may not move their reads or writes across this point (wgmma writes
// the accumulators asynchronously until wait()).
template <int N> __device__ __forceinline__ void fence_operands(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// D (64 x N fp32, this thread's N / 2 values) += A (64 x 16, 4 registers per thread, the
// mma.m16n8k16 A fragment of the warp's 16 rows) * B (16 x N from shared memory, `desc`); with
// scale_d = 0, D = A * B (D's old values are not read). The asm
// operand lists cannot come from a loop: LUTMM_ACC8(i) names accumulators d[i .. i + 7].
#define LUTMM_ACC8(i)                                                                                    \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), \
      "+f"(d[i + 7])
#define LUTMM_ACC64(i) \
  LUTMM_ACC8(i), LUTMM_ACC8(i + 8), LUTMM_ACC8(i + 16), LUTMM_ACC8(i + 24), LUTMM_ACC8(i + 32), LUTMM_ACC8(i + 40), \
      LUTMM_ACC8(i + 48), LUTMM_ACC8(i + 56)
#define LUTMM_WGMMA_A_DESC "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(scale_d)

#define LUTMM_WGMMA_M64N64K16_RS(TY)                                              \
  asm volatile(                                                                   \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " {"                \
      "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15," \
      "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31" \
      "}, {%32,%33,%34,%35}, %36, p, 1, 1, 0;\n}\n"                              \
      : LUTMM_ACC8(0), LUTMM_ACC8(8), LUTMM_ACC8(16), LUTMM_ACC8(24)              \
      : LUTMM_WGMMA_A_DESC)

#define LUTMM_WGMMA_M64N128K16_RS(TY)                                             \
  asm volatile(                                                                   \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " {"               \
      "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15," \
      "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31," \
      "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47," \
      "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63" \
      "}, {%64,%65,%66,%67}, %68, p, 1, 1, 0;\n}\n"                               \
      : LUTMM_ACC64(0)                                                            \
      : LUTMM_WGMMA_A_DESC)

#define LUTMM_WGMMA_M64N256K16_RS(TY)                                             \
  asm volatile(                                                                   \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"                               \
      "wgmma.mma_async.sync.aligned.m64n256k16.f32." TY "." TY " {"               \
      "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15," \
      "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31," \
      "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47," \
      "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63," \
      "%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79," \
      "%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95," \
      "%96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107,%108,%109,%110,%111," \
      "%112,%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,%126,%127" \
      "}, {%128,%129,%130,%131}, %132, p, 1, 1, 0;\n}\n"                          \
      : LUTMM_ACC64(0), LUTMM_ACC64(64)                                           \
      : LUTMM_WGMMA_A_DESC)

template <int N, typename T> struct Mma;
#if LUTMM_SM90A
#define LUTMM_WGMMA_BODY(N, TY) LUTMM_WGMMA_M64N##N##K16_RS(TY);
#else
#define LUTMM_WGMMA_BODY(N, TY)
#endif
#define LUTMM_WGMMA_MMA(N, T, TY)                                                                    \
  template <> struct Mma<N, T> {                                                                    \
    static __device__ __forceinline__ void run(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc,   \
                                               int scale_d = 1) {                                           \
      LUTMM_WGMMA_BODY(N, TY)                                                                       \
    }                                                                                               \
  };
LUTMM_WGMMA_MMA(64, __nv_bfloat16, "bf16")
LUTMM_WGMMA_MMA(64, __half, "f16")
LUTMM_WGMMA_MMA(128, __nv_bfloat16, "bf16")
LUTMM_WGMMA_MMA(128, __half, "f16")
LUTMM_WGMMA_MMA(256, __nv_bfloat16, "bf16")
LUTMM_WGMMA_MMA(256, __half, "f16")
#undef LUTMM_WGMMA_MMA
#undef LUTMM_WGMMA_BODY

}  // namespace wg
}  // namespace gpu
}  // namespace lutmm
