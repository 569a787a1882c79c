// The replicated pair table in shared memory and the lookups that turn one packed 16 x 128 block
// into tensor-core A registers, plus the code-word helpers. Shared by the decode kernel (lut_gemm.cu,
// mma.sync), the prefill kernel (lut_wgmma.cu, wgmma) and the dequant kernel (dequant.cu): all read
// the same packed layout (docs/format.md).
//
// Table layout: entry e (a pair of codes, or a quad at 2 bits) is kEntryBytes apart; lane l's copy of
// it sits at e * kEntryBytes + l * 4 (quads: l * 8), so lane l always reads bank l (l and l + 16 at 2
// bits, one 64-bit wavefront each): conflict-free whatever the codes. With the 256-byte stride an
// address is one byte permute: prmt puts the code byte into bits 8-15 and the lane's offset into bits
// 0-7. 3-bit pair codes are 6-bit fields of a lane's code stream: a (funnel) shift and a mask.
#pragma once
#include "common.cuh"
#include "../plan.h"

namespace lutmm {
namespace gpu {

// Kernel parameters every fused kernel takes (the decode kernels' Params and the prefill kernel's
// WgParams extend it): the weight, the output, the Stream-K workspace and the problem's sizes.
template <typename T>
struct GemmParams {
  const uint8_t* w;         // packed codes
  const uint16_t* s;        // packed fp16 scales [row_blocks][G][8][2]
  const T* bias;            // N or nullptr
  T* y;                     // M x N (M x N/2 with silu_mul)
  float* partials;          // Stream-K partial tiles (layout: each kernel's)
  int* counters;            // per-tile arrival counters, zero between calls
  float table[16];          // T
  int M, N, K, G;
  int gl;                   // log2(group_size / 32); 30 when group_size = K is not a power of two
  int row_blocks, col_blocks;
  int silu_mul;             // Epilogue::kSiluMul (store_silu_mul)
  const T* residual;        // M x N added to Y, or nullptr (GemmProblem::residual)
  int rms_norm;             // scale each token's sums by rsqrt(mean(x^2) + rms_eps) (row_rms_factors)
  float rms_eps;
};

// Fills the GemmParams part of a kernel's parameters; the workspace holds `counters_bytes` of
// counters, then the partials.
template <typename T>
void fill_gemm_params(GemmParams<T>& p, const GemmProblem& prob, void* ws, size_t counters_bytes) {
  p.w = static_cast<const uint8_t*>(prob.packed);
  p.s = prob.packed_scales;
  p.bias = static_cast<const T*>(prob.bias);
  p.y = static_cast<T*>(prob.y);
  p.counters = static_cast<int*>(ws);
  p.partials = reinterpret_cast<float*>(static_cast<uint8_t*>(ws) + counters_bytes);
  for (int i = 0; i < 16; ++i) p.table[i] = prob.table[i];
  const Shape& s = prob.shape;
  p.M = int(prob.M); p.N = int(s.N); p.K = int(s.K); p.G = int(s.groups());
  p.gl = group_log2(s.group_size);
  p.row_blocks = int(s.row_blocks()); p.col_blocks = int(s.col_blocks());
  p.silu_mul = prob.epilogue == Epilogue::kSiluMul;
  p.residual = static_cast<const T*>(prob.residual);
  p.rms_norm = prob.rms_norm;
  p.rms_eps = prob.rms_eps;
}

// GemmProblem::rms_norm: rs[kNormSlots j] = rsqrt(mean_k x[m0 + j][k]^2 + eps) for the n_tok tokens from m0
// (0 past M), computed by the `threads` threads of the caller's worker (tid in [0, threads), whole warps,
// at most kNormSlots of them); `sync` is a barrier over exactly those threads, and the caller syncs once
// more before reading. The live tokens go to teams of wpt warps (all warps on one token at M = 1, one warp
// per token from 8 tokens); a team's threads read 16-byte vectors of their token's row, 8 loads in flight
// each. Each warp writes its partial sum of squares of token j to rs[kNormSlots j + its rank in the team],
// then thread j adds the wpt partials in rank order (deterministic) into rs[kNormSlots j]. The first
// version (one warp per token, one vector per step) put ~16 dependent L2 round trips (K = 4096) before
// the first MMA: H100, 2026-11-27, 6144x4096 M = 16 18.2 us against 10.6 plain. Every CTA of a call reads
// all of its tokens' rows (8 KB each at K = 4096), so the op keeps this for few tokens (lutmm.layerfold).
// K is a multiple of 32 and x 16-byte aligned, so rows are whole vectors.
constexpr int kNormSlots = 8;
// ss plus the squares of the 8 elements of a 16-byte vector q of a row (fp32, in element order).
template <typename T>
__device__ __forceinline__ float add_squares(const uint4& q, float ss) {
  const T* e = reinterpret_cast<const T*>(&q);
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    const float f = Elem<T>::to_float(e[c]);
    ss = fmaf(f, f, ss);
  }
  return ss;
}
// The sum of squares of one row of `vecs` 16-byte vectors, read by a team of `team_threads` threads (whole
// warps; this thread is tt in [0, team_threads)), 8 loads in flight each; reduced over this thread's warp
// (every lane gets the warp's partial). Thread tt adds vectors tt, tt + team_threads, ... in order.
template <typename T>
__device__ __forceinline__ float row_sum_squares(const uint4* row, int vecs, int tt, int team_threads) {
  constexpr int kInFlight = 8;
  float ss = 0.f;
  for (int v = tt; v < vecs; v += kInFlight * team_threads) {
    uint4 q[kInFlight];
#pragma unroll
    for (int u = 0; u < kInFlight; ++u)
      q[u] = v + u * team_threads < vecs ? row[v + u * team_threads] : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) ss = add_squares<T>(q[u], ss);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  return ss;
}
template <typename T, typename Sync>
__device__ __forceinline__ void row_rms_factors(const GemmParams<T>& p, const T* x, int m0, int n_tok, float* rs,
                                                int tid, int threads, Sync sync) {
  const int lane = tid % 32, warp = tid / 32, warps = threads / 32;
  const int live = max(0, min(n_tok, p.M - m0));
  const int wpt = max(1, warps / max(live, 1));  // warps per token
  const int teams = warps / wpt, team = warp / wpt, rank = warp % wpt;
  const int tt = rank * 32 + lane, team_threads = wpt * 32;
  const int vecs = p.K / 8;  // 16-byte vectors per row
  for (int j = team; j < live && team < teams; j += teams) {
    const float ss = row_sum_squares<T>(reinterpret_cast<const uint4*>(x + int64_t(m0 + j) * p.K), vecs, tt,
                                        team_threads);
    if (lane == 0) rs[kNormSlots * j + rank] = ss;
  }
  sync();
  if (tid < n_tok) {
    float ss = 0.f;
    if (tid < live)
      for (int r = 0; r < wpt; ++r) ss += rs[kNormSlots * tid + r];
    rs[kNormSlots * tid] = tid < live ? rsqrtf(ss / float(p.K) + p.rms_eps) : 0.f;
  }
}

// The deferred norm factor (TMA kernel; docs/performance-log.md item 62): the factor of a single token whose
// row is at most V 16-byte vectors per thread (M = 1, K <= 4096 with 256 compute threads) is read before
// the main loop (rms_defer_issue) and reduced after the first segment (rms_defer_finish), so the L2 round
// trip and row_rms_factors' two barriers leave the path to the first MMA. It costs 4 V registers live
// across the main loop, so only kernels sized for at most two CTAs per SM take it (V > 0): in those sized
// for three (72 registers) ptxas spilled 4-44 bytes and plain calls lost 0.2-0.3 us (H100, 2026-11-27:
// 6144x4096 4-bit M = 1 7.9 -> 8.2 us plain, 9.3 -> 9.0 with the norm; 28672x4096, two CTAs per SM:
// 30.7 -> 29.6 with the norm, plain unchanged). V = 0: never on, no registers.
template <int V>
struct RmsDeferred {
  uint4 q[V > 0 ? V : 1];
  bool on;  // loads issued, factor not yet reduced
};
template <int V, typename T>
__device__ __forceinline__ RmsDeferred<V> rms_defer_issue(const GemmParams<T>& p, const T* x, int m0, int tid,
                                                         int threads) {
  RmsDeferred<V> d;
  const int vecs = p.K / 8;
  d.on = V > 0 && p.rms_norm && p.M - m0 == 1 && vecs <= V * threads;
  if constexpr (V > 0) {
    const uint4* row = reinterpret_cast<const uint4*>(x + int64_t(m0) * p.K);
#pragma unroll
    for (int u = 0; u < V; ++u)
      d.q[u] = d.on && tid + u * threads < vecs ? row[tid + u * threads] : make_uint4(0, 0, 0, 0);
  }
  return d;
}
// Reduces rms_defer_issue's loads into rs as row_rms_factors does (token 0's factor, 0 for the other n_tok - 1
// tokens); `sync` as there. The caller syncs before reading rs.
template <int V, typename T, typename Sync>
__device__ __forceinline__ void rms_defer_finish(const GemmParams<T>& p, const RmsDeferred<V>& d, float* rs, int n_tok,
                                                 int tid, int threads, Sync sync) {
  if constexpr (V > 0) {
    float ss = 0.f;
#pragma unroll
    for (int u = 0; u < V; ++u) ss = add_squares<T>(d.q[u], ss);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if (tid % 32 == 0) rs[tid / 32] = ss;  // partials in slots 0 .. warps - 1 of token 0
    sync();
    if (tid == 0) {
      float t = 0.f;
      for (int w = 0; w < threads / 32; ++w) t += rs[w];
      rs[0] = rsqrtf(t / float(p.K) + p.rms_eps);
    } else if (tid < n_tok) {
      rs[kNormSlots * tid] = 0.f;
    }
  }
}

// A single token's norm factor from the producer warp (its 32 lanes, between the prologue's copies and
// the producer loop; lut_stream_kernel's kProducerNorm, item 63), handed to the compute warps through a
// named barrier they wait on at their first segment end: no registers in the compute warps, which never
// wait for the row. Writes rs as row_rms_factors does (token 0's factor, 0 for tokens 1 .. n_tok - 1).
// Each lane waits for the previous grid itself (griddepcontrol.wait is per thread).
template <typename T>
__device__ __forceinline__ void warp_rms_factor(const GemmParams<T>& p, const T* x, int m0, int n_tok, float* rs,
                                                int lane) {
  grid_dependency_wait();
  const float ss = row_sum_squares<T>(reinterpret_cast<const uint4*>(x + int64_t(m0) * p.K), p.K / 8, lane, 32);
  if (lane == 0) rs[0] = rsqrtf(ss / float(p.K) + p.rms_eps);
  for (int j = 1 + lane; j < n_tok; j += 32) rs[kNormSlots * j] = 0.f;
}

// Epilogue::kSiluMul's output for token m of one lane's accumulator pair: rows n (gate, n % 16 < 8) and
// n + 8 (up) of a 16-row block hold z0 and z1; silu(z0) * z1 goes to Y[m][n / 16 * 8 + n % 8] of the
// M x N/2 output, computed in fp32 and rounded once.
template <typename T>
__device__ __forceinline__ void store_silu_mul(const GemmParams<T>& p, int64_t m, int n, float z0, float z1) {
  const float silu = z0 / (1.f + __expf(-z0));  // z0 -> -inf: z0 / inf = -0
  p.y[m * (p.N / 2) + (n >> 4) * 8 + (n & 7)] = Elem<T>::from_float(silu * z1);
}

// A workspace starts with a fixed region of Stream-K tile counters (int32), which every call leaves
// zeroed; the call's partial sums follow it. Fixed, so that the partials of one call never land on
// counters of a later call with more counters (one workspace serves every shape: lutmm.matmul keeps
// one per device; a shape-dependent counter region let a 16384-row call read a 4096-row call's
// partials as counters and skip half its output tiles, found on the H100, 2026-11-26).
constexpr size_t kCounterRegionBytes = size_t(1) << 20;
// The counter region for `counters` tile counters; throws if they do not fit.
inline size_t counter_region_bytes(int64_t counters) {
  if (counters * 4 > int64_t(kCounterRegionBytes))
    throw Error("shape: " + std::to_string(counters) + " Stream-K tile counters exceed the workspace's " +
                std::to_string(kCounterRegionBytes / 4) + "; split M or N");
  return kCounterRegionBytes;
}

// sk_start / sk_owner (Stream-K's even ranges): ../plan.h, tested on the host.

// atomicAdd with acquire-release semantics at GPU scope; returns the old value.
__device__ __forceinline__ int atomic_add_acq_rel(int* ptr, int v) {
  int old;
  asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], %2;\n" : "=r"(old) : "l"(ptr), "r"(v) : "memory");
  return old;
}

// A Stream-K contributor's arrival at its tile's counter, after it stored its partial: true in every
// calling thread of the contributor that arrives last (of `contributors`), which then sums the
// partials; that one also resets the counter for the next call. Release / acquire through the
// counter (the pattern of CUTLASS's semaphore): the first barrier orders every thread's partial
// stores before thread 0's acq_rel atomic, whose acquire side, passed on by the second barrier,
// orders the last arriver's reads of the others' partials after their stores. `tid`: the thread's
// index among the callers; `sync`: a barrier over them; `flag`: a shared int.
template <typename Sync>
__device__ __forceinline__ bool arrive_last(int* counter, int contributors, int tid, int* flag, Sync sync) {
  sync();
  if (tid == 0) {
    const int arrived = atomic_add_acq_rel(counter, 1);
    const bool is_last = arrived == contributors - 1;
    if (is_last) atomicExch(counter, 0);  // leave the workspace zeroed for the next call
    *flag = is_last;
  }
  sync();
  return *flag;
}

// Entries of the table: pairs (3, 4 bits) or quads (2 bits).
template <int BITS> __host__ __device__ constexpr int lut_entries() { return BITS == 3 ? 64 : 256; }

// The table sits at the start of dynamic shared memory, which on sm_80 and sm_90 begins after the
// 1 KB the system reserves: shared address 0x400 (ptxas itself materialises that constant; kernels
// trap if it ever differs). Passing it as the load's immediate offset saves an add per lookup:
// 32 of ~150 instructions per warp and 4-bit block.
constexpr uint32_t kTableAddr = 0x400;
__device__ __forceinline__ uint32_t lut_load32(uint32_t off) {
  uint32_t v;
  asm volatile("ld.shared.b32 %0, [%1+%2];\n" : "=r"(v) : "r"(off), "n"(kTableAddr));
  return v;
}
__device__ __forceinline__ uint2 lut_load64(uint32_t off) {
  uint2 v;
  asm volatile("ld.shared.v2.b32 {%0, %1}, [%2+%3];\n" : "=r"(v.x), "=r"(v.y) : "r"(off), "n"(kTableAddr));
  return v;
}
// Traps unless the dynamic shared memory (the table) starts at kTableAddr (in the low 24 bits: in a
// cluster launch, bits 24-31 of a CTA's shared addresses hold its rank; lut_wgmma.cu adds them).
__device__ __forceinline__ void check_table_addr(const void* smem) {
  if (threadIdx.x == 0 && (smem_addr(smem) & 0xffffffu) != kTableAddr) __trap();
}

// w >> s for s >= 0, w << -s otherwise (s is a compile-time constant after unrolling).
__device__ __forceinline__ uint32_t shift_right(uint32_t w, int s) { return s >= 0 ? w >> s : w << -s; }

// (code byte `b` of w) << 8 | lane_byte: the table offset of a lane's copy of that entry, one prmt.
// lane_byte's byte 3 (a cluster rank, see LaneOffsets) passes through; its bytes 1-2 must be 0.
__device__ __forceinline__ uint32_t byte_entry(uint32_t w, int b, uint32_t lane_byte) {
  return __byte_perm(w, lane_byte, 0x7504u | (uint32_t(b) << 4));
}

// Fills the replicated value table (T rounded to T's dtype). One entry per 8 (pairs) or 16 (quads)
// threads, 16-byte stores of 4 (2) copies: consecutive threads write consecutive bytes, so the table
// goes out conflict-free. THREADS: the CTA size (all threads call it; it uses warp shuffles).
template <int BITS, int ENTRY_BYTES, int THREADS, typename T>
__device__ __forceinline__ void build_table(uint8_t* lut, const float (&table)[16]) {
  if constexpr (decode_ablation(4)) return;  // ablation: no table build
  constexpr int kChunksPerEntry = (BITS == 2 ? 8 : 4) * 32 / 16;
  const float tv = table[threadIdx.x % 16];  // lane l holds T[l % 16]; shuffles fetch T[q]
  for (int c = threadIdx.x; c < lut_entries<BITS>() * kChunksPerEntry; c += THREADS) {  // same trip count in every lane
    const int e = c / kChunksPerEntry;
    uint32_t lo, hi;
    if (BITS == 2) {  // byte e = codes q0..q3 (2 bits each): registers (T[q0], T[q1]) and (T[q2], T[q3])
      lo = Elem<T>::pack2(__shfl_sync(~0u, tv, e & 3), __shfl_sync(~0u, tv, (e >> 2) & 3));
      hi = Elem<T>::pack2(__shfl_sync(~0u, tv, (e >> 4) & 3), __shfl_sync(~0u, tv, e >> 6));
    } else {
      int q0, q1;
      pair_codes<BITS>(e, q0, q1);
      lo = hi = Elem<T>::pack2(__shfl_sync(~0u, tv, q0), __shfl_sync(~0u, tv, q1));
    }
    *reinterpret_cast<uint4*>(lut + e * ENTRY_BYTES + (c % kChunksPerEntry) * 16) = make_uint4(lo, hi, lo, hi);
  }
}

// A lane's code words of one packed block: wd[0..7] (4 bits: one word per k-step; 2 bits: words 0..3,
// nibbles of pair codes; 3 bits: words 0..3, the first 128 bits of the lane's code stream) and, at 3
// bits, hi[0..1] (the stream's last 64 bits). `lo`: the lane's first 16 bytes (block + lane * 16; at 4
// bits the second 16 sit 512 bytes on); `hi_words`: 3 bits, the lane's other 8 bytes (block + 512 +
// lane * 8).
template <int BITS>
__device__ __forceinline__ void load_code_words(const uint8_t* lo, const uint8_t* hi_words, uint32_t (&wd)[8],
                                                uint32_t (&hi)[2]) {
  const uint4 c0 = *reinterpret_cast<const uint4*>(lo);
  wd[0] = c0.x; wd[1] = c0.y; wd[2] = c0.z; wd[3] = c0.w;
  if (BITS == 4) {
    const uint4 c1 = *reinterpret_cast<const uint4*>(lo + 512);
    wd[4] = c1.x; wd[5] = c1.y; wd[6] = c1.z; wd[7] = c1.w;
  }
  if (BITS == 3) {
    const uint2 h = *reinterpret_cast<const uint2*>(hi_words);
    hi[0] = h.x; hi[1] = h.y;
  }
}
// Pairs of row blocks (compute_pair, lut_mma.cuh): a lane's code words for k-steps 4 h .. 4 h + 3 of a
// block, renumbered as k-steps 0 .. 3 (so pair_code, lookup_a and stream3 read them with ks - 4 h and
// an empty hi). half_code_offset: where the lane's load starts, past block + lane * 16 (4 bits: the
// 16 bytes 512 on for h = 1; 2 bits: 8 bytes, words 2 h and 2 h + 1; 3 bits: the first 16 bytes, with
// the high-bit words `e` beside them). half_code_words: the words from what was loaded (`c`: 16 bytes,
// 8 at 2 bits; `e`: 3 bits only); at 3 bits the stream from bit 96 h is words 0-2 (k-steps 0 .. 3
// never read past word 2: stream3's widest offset there is bit 82 + 14).
template <int BITS>
__host__ __device__ __forceinline__ constexpr int half_code_offset(int h) { return BITS == 4 ? 512 * h : BITS == 2 ? 8 * h : 0; }
template <int BITS>
__host__ __device__ __forceinline__ void half_code_words(uint4 c, uint2 e, int h, uint32_t (&wd)[8]) {
  if (BITS == 3) {
    wd[0] = h ? c.w : c.x; wd[1] = h ? e.x : c.y; wd[2] = h ? e.y : c.z;
  } else {
    wd[0] = c.x; wd[1] = c.y;
    if (BITS == 4) { wd[2] = c.z; wd[3] = c.w; }
  }
}

// The same for the block at `wb` (256 * BITS bytes, shared or global memory) and lane `lane`.
template <int BITS>
__device__ __forceinline__ void load_codes(const uint8_t* wb, int lane, uint32_t (&wd)[8], uint32_t (&hi)[2]) {
  load_code_words<BITS>(reinterpret_cast<const uint8_t*>(reinterpret_cast<const uint4*>(wb) + lane),
                        reinterpret_cast<const uint8_t*>(reinterpret_cast<const uint2*>(wb + 512) + lane), wd, hi);
}

// 3 bits: a lane's 24 code bytes are one 192-bit stream, words wd[0..3] then hi[0..1]; pair i = 4 ks + p
// is bits 6 i .. 6 i + 5 (q0 | q1 << 3). stream3(wd, hi, b) returns the stream shifted right by b
// (b >= -8, compile-time after unrolling; b < 0 shifts left): its bits 0 .. width - 1 are right (those
// the stream has). Pairs that straddle two words come out of one funnel shift.
// Host and device (the host versions let tests/cpp/test_layout.cu check this bit arithmetic on a CPU).
__host__ __device__ __forceinline__ uint32_t funnel_r(uint32_t lo, uint32_t hi, int s) {  // (hi:lo) >> s % 32
#ifdef __CUDA_ARCH__
  return __funnelshift_r(lo, hi, s);
#else
  return uint32_t(((uint64_t(hi) << 32) | lo) >> (s & 31));
#endif
}
__host__ __device__ __forceinline__ uint32_t stream3(const uint32_t (&wd)[8], const uint32_t (&hi)[2], int b,
                                                     int width = 14) {
  if (b < 0) return wd[0] << -b;
  const int w = b / 32, s = b % 32;
  const uint32_t lo = w < 4 ? wd[w] : hi[w - 4];
  if (s + width <= 32 || w == 5) return lo >> s;  // the bits needed are inside word w
  return funnel_r(lo, w + 1 < 4 ? wd[w + 1] : hi[w + 1 - 4], s);
}

// wgmma's 3-bit A fragments (lut_wgmma.cu, QuadCodes): lane t (0..3) of a quad needs, for k-steps 2 j and
// 2 j + 1 of a block, the pairs p = 2 (t & 1) and + 1 of k-step 2 j + (t >> 1) of a quad lane's stream
// st[0..5]: 12 bits at stream bit 48 j + c, c = 24 (t >> 1) + 12 (t & 1) (pairs are 6 bits, k-steps 24).
// For even j they start at bit sh_even of word 3 j / 2 (+1 where up_even), for odd j at bit sh_odd of
// word 3 (j - 1) / 2 + 1 (+1 where up_odd); fixed per lane, so a window is 2 selects and a funnel shift.
struct Quad3Window {
  bool up_even, up_odd;
  int sh_even, sh_odd;
  Quad3Window() = default;
  __host__ __device__ explicit Quad3Window(int t) { init(t); }
  __host__ __device__ __forceinline__ void init(int t) {
    const int c = 24 * (t >> 1) + 12 * (t & 1);
    up_even = c >= 32;
    up_odd = c + 16 >= 32;
    sh_even = c % 32;
    sh_odd = (c + 16) % 32;
  }
  // Bits 0-5: the pair of row g, bits 6-11: of row g + 8 (j compile-time after unrolling).
  __host__ __device__ __forceinline__ uint32_t operator()(const uint32_t (&st)[6], int j) const {
    const int w0 = j % 2 ? 3 * (j - 1) / 2 + 1 : 3 * j / 2;
    const bool up = j % 2 ? up_odd : up_even;
    const uint32_t lo = up ? st[w0 + 1] : st[w0], hi_w = up ? st[w0 + 2 < 6 ? w0 + 2 : 5] : st[w0 + 1];
    return funnel_r(lo, hi_w, j % 2 ? sh_odd : sh_even);
  }
};

// The pair code (index into the pair table, see pair_codes()) of pair p (0..3) of k-step ks in a
// lane's code words (as load_codes() returns them). The decode kernels fold this into table offsets
// (lookup_a); the dequant kernel uses it as is.
template <int BITS>
__host__ __device__ __forceinline__ int pair_code(const uint32_t (&wd)[8], const uint32_t (&hi)[2], int ks, int p) {
  if (BITS == 4) return (wd[ks] >> (8 * p)) & 0xff;
  if (BITS == 3) return stream3(wd, hi, 6 * (4 * ks + p)) & 0x3f;
  return (wd[ks / 2] >> (4 * ((ks % 2) * 4 + p))) & 0xf;
}

// The four A registers (a0..a3 of mma.m16n8k16 / a warp's slice of wgmma's register A) of k-step ks,
// unscaled: pairs (T[q0], T[q1]) in T's dtype. lane_byte: this lane's copy inside an entry
// (lane * 4, or lane * 8 for 2-bit quads).
template <int BITS, int ENTRY_BYTES>
__device__ __forceinline__ void lookup_a(const uint32_t (&wd)[8], const uint32_t (&hi)[2], int ks, uint32_t lane_byte,
                                         uint32_t (&a)[4]) {
  if (BITS == 2) {  // bytes 2(ks%2) and 2(ks%2)+1 of word ks/2 are the quads (a0, a1) and (a2, a3)
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const uint2 v = lut_load64(byte_entry(wd[ks / 2], (ks % 2) * 2 + q, lane_byte));
      a[2 * q] = v.x;
      a[2 * q + 1] = v.y;
    }
  } else {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      uint32_t off;
      if (BITS == 4 && ENTRY_BYTES == 256) {  // byte q of word ks
        off = byte_entry(wd[ks], q, lane_byte);
      } else if (BITS == 4) {                 // 128-byte entries
        off = (shift_right(wd[ks], 8 * q - 7) & 0x7f80u) | lane_byte;
      } else {  // 3 bits: the 6-bit pair code moved to bits 8-13 by one (funnel) shift, then one lop3
        off = (stream3(wd, hi, 6 * (4 * ks + q) - 8) & 0x3f00u) | lane_byte;
      }
      a[q] = lut_load32(off);
    }
  }
}


// Scales of one 16-row block in a pipeline stage: up to 4 groups (g = 32) x 16 rows x fp16, group slot
// j >> min(gl, 2) for 32-column chunk j of the k-block.
constexpr int kScaleBytesPerRb = 4 * 16 * 2;

// Copies the packed codes and scales of one iteration into a pipeline stage: ROW_BLOCKS blocks of a
// tile of rpt consecutive 16-row blocks at ROW_BLOCKS / rpt consecutive k-blocks; block b is row
// block b % rpt at k-block b / rpt (rpt = ROW_BLOCKS: one k-block, warp w computes row block w). Codes
// land at `stage_w` (block b at b * 256 * BITS), scales at `stage_s` (block b at b * kScaleBytesPerRb).
// What each thread copies is fixed for the CTA's life, so the plan is computed once (constructor) and
// a load is a few adds per 16-byte cp.async. (H200, 2026-11-26: the first loader recomputed chunk
// indices and 64-bit addresses per chunk; Nsight Compute counted 394 instructions per warp per 1 KB
// block, ~250 of them outside the lookups and MMAs.) Rows beyond the weight are zero-filled.
// ROW_TILES: rpt may be below ROW_BLOCKS (else it is ROW_BLOCKS, and the k-block offsets fold away).
template <int BITS, int ROW_BLOCKS, int THREADS, bool ROW_TILES = false>
struct WeightLoader {
  static constexpr int kBlockBytes = 256 * BITS;
  static constexpr int kChunksPerBlock = kBlockBytes / 16;                 // 64, 48, 32
  static constexpr int kChunks = ROW_BLOCKS * kChunksPerBlock;             // per stage
  static constexpr int kPer = (kChunks + THREADS - 1) / THREADS;           // chunks per thread
  static_assert(ROW_BLOCKS * 8 <= THREADS, "one thread per half (row block, group) of scales");

  int64_t w_src[kPer];    // byte offset of the chunk from the tile's (row block 0, kb0) block
  int w_rb[kPer];         // local row block of the chunk; ROW_BLOCKS when this slot is unused
  int w_kb[kPer];         // its k-block after kb0
  const uint16_t* s_src;  // this thread's scale row pair (tid < ROW_BLOCKS * 8), at group 0
  int s_rb, s_kb;         // the local row block and k-block after kb0 of those scales

  // rpt: row blocks per tile (a power of two dividing ROW_BLOCKS).
  __device__ WeightLoader(const uint16_t* s, int G, int col_blocks, int rpt = ROW_BLOCKS) {
    const int tid = threadIdx.x;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int c = tid + i * THREADS, b = c / kChunksPerBlock;
      w_rb[i] = c < kChunks ? (ROW_TILES ? b % rpt : b) : ROW_BLOCKS;
      w_kb[i] = ROW_TILES ? b / rpt : 0;
      w_src[i] = (int64_t(w_rb[i]) * col_blocks + w_kb[i]) * kBlockBytes + (c % kChunksPerBlock) * 16;
    }
    s_rb = ROW_TILES ? (tid / 8) % rpt : tid / 8;
    s_kb = ROW_TILES ? (tid / 8) / rpt : 0;
    s_src = s + int64_t(s_rb) * G * 16 + (tid % 2) * 8;
  }

  // w, s: the packed codes and scales; rb0: the tile's first row block; kb0: the iteration's first
  // k-block; gl: log2(g / 32) (30: g = K). Blocks past the weight's rows or k-blocks arrive as zeros.
  __device__ __forceinline__ void load(uint8_t* stage_w, uint8_t* stage_s, const uint8_t* w, const uint16_t* s,
                                       int rb0, int kb0, int row_blocks, int col_blocks, int K, int G, int gl) const {
    const int tid = threadIdx.x;
    const uint8_t* wt = w + (int64_t(rb0) * col_blocks + kb0) * kBlockBytes;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      if (kChunks % THREADS == 0 || w_rb[i] < ROW_BLOCKS) {
        const bool ok = rb0 + w_rb[i] < row_blocks && (!ROW_TILES || kb0 + w_kb[i] < col_blocks);
        cp_async16(stage_w + (tid + i * THREADS) * 16, ok ? wt + w_src[i] : w, ok ? 16 : 0);
      }
    }
    // Scales: the groups that intersect this k-block, 32 B per (row block, group): thread tid copies
    // half (tid % 2) of group (tid % 8) / 2 of block tid / 8.
    if (tid < ROW_BLOCKS * 8) {
      const int kb = kb0 + s_kb;
      const int chunk0 = kb * 4;
      const int nchunks = min(4, (K - kb * kBlockCols) / 32);
      const int g_first = chunk0 >> gl, g_count = ((chunk0 + nchunks - 1) >> gl) - g_first + 1;
      const int grp = (tid % 8) / 2;
      const bool ok = rb0 + s_rb < row_blocks && (!ROW_TILES || kb < col_blocks) && grp < g_count;
      const uint16_t* src = s_src + int64_t(rb0) * G * 16 + (g_first + grp) * 16;
      cp_async16(stage_s + (tid / 8) * kScaleBytesPerRb + grp * 32 + (tid % 2) * 16, ok ? src : s, ok ? 16 : 0);
    }
  }
};

}  // namespace gpu
}  // namespace lutmm
