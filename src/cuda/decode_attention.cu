// Decode attention for grouped-query heads (include/lutmm/attention.h): flash-decoding in two kernels.
//
// attn_mma_kernel<kWarps>: one CTA per (split, KV head, sequence). kMma: 4 warps on attention_split's
// split (rounds of one 64-position chunk); kWide: 16 warps, one split covering every position (rounds
// of 256), so the CTA writes the output itself and no combine kernel runs (kMma does the same when its
// split is one). Warp w takes positions 16w .. 16w + 15 of each round and keeps its own running
// softmax. Both products run on the tensor cores (mma.m16n8k16, fp32 accumulation), transposed so that
// the G <= 8 query heads are the 8 columns (N) and nothing is padded:
//   - Scores S^T = K Q^T: A = K [16 positions x D], B = Q^T [D x 8 heads]. The order of the D
//     dimensions inside a k-step is free as long as K and Q use the same one, so lane (group r =
//     lane / 4, quad = lane % 4) loads 16 bytes = dims c * 32 + quad * 8 .. + 7 of K rows p0 + r and
//     p0 + r + 8 and of Q row r straight from global memory into registers: words 0, 1 are the
//     fragments of k-step 2c, words 2, 3 those of k-step 2c + 1. No shared memory, no shuffles.
//   - O^T += V^T P^T: B = P^T is the scores' C fragment (positions x heads) rounded to T and
//     transposed in registers (movmatrix); A = V^T [dims x 16 positions] needs two consecutive
//     positions of one dim per register, so the lane loads 16 bytes (8 dims) of V rows 2 quad,
//     2 quad + 1, 8 + 2 quad, 9 + 2 quad and pairs them with byte permutes; m-tile (blk, ip) then holds
//     dims blk * 64 + 8 r + 2 ip (rows r) and + 1 (rows r + 8), which the epilogue undoes.
//   Masked positions load nothing (their K and V are zero, their score -inf); the mask bytes of the
//   next block are loaded while this one computes. The warps' (max, sum) meet in shared memory; each
//   lane rescales its output fragments to the CTA's maximum, and the fragments are summed down a
//   binary tree of warps through shared memory (fixed order: deterministic). Warp 0 then writes the
//   normalized output, or the partial output (fp32, not normalized) and (max, sum) per query head to
//   the workspace. Scores are kept in the log2 domain (scale * log2(e) folded in), so every
//   exponential is one ex2.
// The fused decode step (DecodeAttentionProblem::k_new ..., lutmm::gqa_decode_step): q is rotated in
//   registers after its load (rope8: pieces c and c + D/64 of a lane hold dims d and d + D/2), and the CTA
//   whose positions hold *write_pos rotates the new key, writes it and the new value into the cache, and
//   syncs before its warps load any K / V row; no other CTA reads that position (session 15, item 55).
// attn_combine_kernel: one CTA per (KV head, sequence): per query head the splits' maxima and sums
//   are reduced by one warp, weights w_i = 2^(m_i - M) go to shared memory, then each thread sums 4
//   output columns over the splits in order (deterministic).
// Measured (H100, 2026-11-26, bench/bench_attention.py, one layer of 8B heads, us at batch x positions
// in use 1 x 256 / 16 x 256 / 16 x 2048): this kernel 6.2 / 13.2 / 70.7 (the first tensor-core version,
// Q as the 16-row A operand with rows G..15 zero, 178 registers: 5.7 / 13.7 / 60.6), the compiled plain
// ops it replaces 7.5 / 19.3 / 60.8. Two CUDA-core variants (lanes over D, a 5-shuffle all-reduce
// per score) were removed: a warp per position group 16.7 / 41.1 / 238.6, the CTA sharing chunks
// 27.6 / 67.4 / 417.6 (with a combine kernel that walked the splits with dependent loads).
// Both launch with programmatic dependent launch: the split kernel waits for the previous kernel
// before its first load (it has nothing to prefetch: q, k, v and the mask are all fresh).
#include <cmath>

#include "common.cuh"
#include "lutmm/attention.h"

namespace lutmm {
namespace gpu {
namespace {

constexpr int kSplitWarps = 4;                 // kMma: a chunk of 64 positions per round, 16 per warp
constexpr int kWideWarps = int(kAttnWideWarps);  // kWide: 256 positions per round
constexpr int kChunk = int(kAttnChunk);
constexpr int kMaxG = 8;
constexpr int kCombineThreads = 256;
constexpr float kLog2e = 1.4426950408889634f;
static_assert(kChunk == 16 * kSplitWarps, "attn_mma_kernel: kMma's round is one chunk, 16 positions per warp");

struct AttnParams {
  const void* q;
  const void* k;
  const void* v;
  const uint8_t* mask;
  void* out;
  float* part_o;   // [B, Hkv, splits, G, D]
  float* part_ml;  // [B, Hkv, splits, G, 2]: running max (log2-domain scores), sum of 2^(score - max)
  int64_t k_sb, k_sh, v_sb, v_sh, mask_sb;
  int S, G, Hkv, splits, chunks_per_split;  // splits == 1: the split kernel writes `out` itself
  float scale;
  int64_t q_sb;  // elements between sequences of q
  // The fused step (DecodeAttentionProblem::k_new ..., all set or none): rotary on q and k_new, and
  // the rotated k_new and v_new written into the cache at *write_pos by the CTA whose positions hold it.
  const void* k_new;
  const void* v_new;
  const void* cos;
  const void* sin;
  const int64_t* write_pos;
  int64_t new_sb, cs_sb;
};

__device__ __forceinline__ float fast_exp2(float x) {  // 2^x; -inf gives +0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ uint4 ld16(const void* p) { return *reinterpret_cast<const uint4*>(p); }
__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Elements 2i and 2i + 1 of a 16-byte piece of T.
template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t w) {
  const T* e = reinterpret_cast<const T*>(&w);
  return make_float2(Elem<T>::to_float(e[0]), Elem<T>::to_float(e[1]));
}

// The rotary embedding of 8 dims (transformers' rotate_half: dims d < D/2 become x cos - x' sin, the
// others x cos + x' sin, x' the value D/2 away), fp32 math and one rounding, as the compiled model does.
template <typename T>
__device__ __forceinline__ uint4 rope8(const uint4& x, const uint4& partner, const uint4& c, const uint4& s,
                                       bool first_half) {
  const float sign = first_half ? -1.f : 1.f;
  uint32_t out[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 xv = unpack2<T>(word(x, i)), pv = unpack2<T>(word(partner, i));
    const float2 cv = unpack2<T>(word(c, i)), sv = unpack2<T>(word(s, i));
    out[i] = Elem<T>::pack2(xv.x * cv.x + sign * (pv.x * sv.x), xv.y * cv.y + sign * (pv.y * sv.y));
  }
  return make_uint4(out[0], out[1], out[2], out[3]);
}

// The transpose of an 8x8 matrix of 16-bit elements held as one mma fragment register per lane
// (lane: row lane / 4, columns 2 (lane % 4), + 1).
__device__ __forceinline__ uint32_t transpose8x8(uint32_t a) {
  uint32_t d;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(d) : "r"(a));
  return d;
}

// kWarps: 4 (kMma, one chunk per round) or 16 (kWide, four chunks per round).
template <typename T, int D, int kWarps>
__global__ void __launch_bounds__(32 * kWarps) attn_mma_kernel(AttnParams p) {
  constexpr int kRound = 16 * kWarps;  // positions the CTA covers per round
  constexpr int kK32 = D / 32;         // 16-byte pieces of a K (Q) row per lane: two k-steps each
  constexpr int kV64 = D / 64;         // 16-byte pieces of a V row per lane: four m-tiles each
  constexpr int kOut = kV64 * 16;      // output fragment registers per lane
  static_assert(kWarps >= 2 && (kWarps & (kWarps - 1)) == 0, "the warps' merge is a binary tree");
  __shared__ float s_red[kWarps / 2][kOut][32];  // fragments handed down the merge tree, lane-major
  __shared__ float s_m[kWarps][kMaxG], s_l[kWarps][kMaxG];

  const int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int r = lane / 4, quad = lane % 4;  // fragment group (a position, a query head) and column pair
  const int G = p.G;
  const T* k_bh = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh;
  const T* v_bh = static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh;
  const uint8_t* mask_b = p.mask ? p.mask + b * p.mask_sb : nullptr;

  grid_dependency_wait();
  grid_dependents_launch();  // the combine kernel may launch; it waits for this grid to finish

  uint4 qf[kK32];  // B operand Q^T: query head r's dims c * 32 + quad * 8 .. + 7 (zero beyond G)
  {
    const T* q_row = static_cast<const T*>(p.q) + b * p.q_sb + (int64_t(h) * G + r) * D + quad * 8;
#pragma unroll
    for (int c = 0; c < kK32; ++c) qf[c] = r < G ? ld16(q_row + c * 32) : make_uint4(0, 0, 0, 0);
  }
  const int first = split * p.chunks_per_split * kChunk;
  const int last = min(p.S, first + p.chunks_per_split * kChunk);
  if (p.k_new != nullptr) {  // the fused step
    // Pieces c and c + kK32 / 2 of a lane hold dims d and d + D/2: the rotation pairs stay in the lane.
    const T* cs = static_cast<const T*>(p.cos) + b * p.cs_sb + quad * 8;
    const T* sn = static_cast<const T*>(p.sin) + b * p.cs_sb + quad * 8;
    uint4 rq[kK32];
#pragma unroll
    for (int c = 0; c < kK32; ++c)
      rq[c] = rope8<T>(qf[c], qf[(c + kK32 / 2) % kK32], ld16(cs + c * 32), ld16(sn + c * 32), c < kK32 / 2);
#pragma unroll
    for (int c = 0; c < kK32; ++c) qf[c] = r < G ? rq[c] : make_uint4(0, 0, 0, 0);
    // The new position's K and V rows, written by the CTA whose positions hold it (no other CTA reads
    // that position), before any of its warps loads a K / V row: 16 threads for D = 128, 8 dims each.
    const int64_t pos = *p.write_pos;
    if (pos >= first && pos < last) {  // uniform over the CTA
      constexpr int kPieces = D / 8;
      if (tid < 2 * kPieces) {
        const bool is_k = tid < kPieces;
        const int d = 8 * (is_k ? tid : tid - kPieces);
        const T* src = static_cast<const T*>(is_k ? p.k_new : p.v_new) + b * p.new_sb + int64_t(h) * D;
        uint4 val = ld16(src + d);
        if (is_k) {
          const T* cb = static_cast<const T*>(p.cos) + b * p.cs_sb + d;
          const T* sb = static_cast<const T*>(p.sin) + b * p.cs_sb + d;
          val = rope8<T>(val, ld16(src + (d + D / 2) % D), ld16(cb), ld16(sb), d < D / 2);
        }
        T* dst = const_cast<T*>(is_k ? k_bh : v_bh) + pos * D + d;
        *reinterpret_cast<uint4*>(dst) = val;
      }
      __syncthreads();  // the row is visible to the CTA's loads below
    }
  }
  const float sl2 = p.scale * kLog2e;
  float m[2] = {-INFINITY, -INFINITY};  // running max of query heads 2 quad + e (log2 domain)
  float l[2] = {0.f, 0.f};              // this lane's share of their sums
  float o[kV64 * 4][4];  // O^T m-tile blk * 4 + ip: [e] dim blk * 64 + 8 r + 2 ip, [2 + e] the next dim; head 2 quad + e
#pragma unroll
  for (int t = 0; t < kV64 * 4; ++t) o[t][0] = o[t][1] = o[t][2] = o[t][3] = 0.f;

  auto mask_byte = [&](int pos) -> uint32_t {  // nonzero: position pos attends
    return pos < last ? (mask_b ? uint32_t(mask_b[pos]) : 1u) : 0u;
  };
  int p0 = first + warp * 16;
  uint32_t m_raw = mask_byte(p0 + (lane & 15));
  for (; p0 < last; p0 += kRound) {
    const uint32_t on = __ballot_sync(0xffffffffu, m_raw != 0) & 0xffffu;  // bit i: position p0 + i attends
    m_raw = mask_byte(p0 + kRound + (lane & 15));  // the next block's, in flight during this one
    if (on == 0) continue;  // warp-uniform: nothing attends, nothing loads

    uint4 ka[kK32], kb[kK32];  // A operand K: rows p0 + r, p0 + r + 8
    const bool att_a = (on >> r) & 1, att_b = (on >> (r + 8)) & 1;
#pragma unroll
    for (int c = 0; c < kK32; ++c) {
      ka[c] = att_a ? ld16(k_bh + int64_t(p0 + r) * D + quad * 8 + c * 32) : make_uint4(0, 0, 0, 0);
      kb[c] = att_b ? ld16(k_bh + int64_t(p0 + r + 8) * D + quad * 8 + c * 32) : make_uint4(0, 0, 0, 0);
    }
    uint4 vf[4][kV64];  // V rows p0 + {2 quad, 2 quad + 1, 8 + 2 quad, 9 + 2 quad}, dims blk * 64 + 8 r ..
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int off = (i >> 1) * 8 + 2 * quad + (i & 1);
      const bool att = (on >> off) & 1;
#pragma unroll
      for (int c = 0; c < kV64; ++c)
        vf[i][c] = att ? ld16(v_bh + int64_t(p0 + off) * D + r * 8 + c * 64) : make_uint4(0, 0, 0, 0);
    }

    // S^T = K Q^T: [0], [1] position p0 + r, heads 2 quad + e; [2], [3] position p0 + r + 8.
    float sc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int c = 0; c < kK32; ++c)
#pragma unroll
      for (int hlf = 0; hlf < 2; ++hlf) {
        const uint32_t a[4] = {word(ka[c], 2 * hlf), word(kb[c], 2 * hlf), word(ka[c], 2 * hlf + 1),
                               word(kb[c], 2 * hlf + 1)};
        Elem<T>::mma(sc, a, word(qf[c], 2 * hlf), word(qf[c], 2 * hlf + 1));
      }
    float corr[2], pr[4];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      sc[e] = att_a ? sc[e] * sl2 : -INFINITY;
      sc[2 + e] = att_b ? sc[2 + e] * sl2 : -INFINITY;
      float mx = fmaxf(sc[e], sc[2 + e]);
#pragma unroll
      for (int off = 4; off < 32; off *= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      const float m_new = fmaxf(m[e], mx);  // finite: some position attends
      corr[e] = fast_exp2(m[e] - m_new);    // 0 on the first block with something attended
      m[e] = m_new;
      pr[e] = fast_exp2(sc[e] - m_new);
      pr[2 + e] = fast_exp2(sc[2 + e] - m_new);
      l[e] = l[e] * corr[e] + pr[e] + pr[2 + e];
    }
    // P^T as the B operand: the scores' C fragment, rounded to T, transposed in registers.
    const uint32_t pb0 = transpose8x8(Elem<T>::pack2(pr[0], pr[1]));  // heads r; positions 2 quad, + 1
    const uint32_t pb1 = transpose8x8(Elem<T>::pack2(pr[2], pr[3]));  // positions 8 + 2 quad, + 1
    // O^T += V^T P^T, m-tile (blk, ip): rows r -> dim blk * 64 + 8 r + 2 ip, r + 8 -> that dim + 1.
#pragma unroll
    for (int c = 0; c < kV64; ++c)
#pragma unroll
      for (int ip = 0; ip < 4; ++ip) {
        const uint32_t a[4] = {__byte_perm(word(vf[0][c], ip), word(vf[1][c], ip), 0x5410u),
                               __byte_perm(word(vf[0][c], ip), word(vf[1][c], ip), 0x7632u),
                               __byte_perm(word(vf[2][c], ip), word(vf[3][c], ip), 0x5410u),
                               __byte_perm(word(vf[2][c], ip), word(vf[3][c], ip), 0x7632u)};
        float(&acc)[4] = o[c * 4 + ip];
        acc[0] *= corr[0];
        acc[1] *= corr[1];
        acc[2] *= corr[0];
        acc[3] *= corr[1];
        Elem<T>::mma(acc, a, pb0, pb1);
      }
  }

  // The warps meet: M = max over warps, L = sum l 2^(m - M), O = sum o 2^(m - M) (warps that saw
  // nothing, l = 0, weigh 0). Each lane rescales its own fragments, then the fragments are summed down
  // a binary tree through shared memory in a fixed order (deterministic): every warp holds the same
  // fragment layout, so a lane adds exactly the registers its partner lane wrote.
#pragma unroll
  for (int e = 0; e < 2; ++e)
#pragma unroll
    for (int off = 4; off < 32; off *= 2) l[e] += __shfl_xor_sync(0xffffffffu, l[e], off);
  if (r == 0)
#pragma unroll
    for (int e = 0; e < 2; ++e)
      if (2 * quad + e < G) {
        s_m[warp][2 * quad + e] = m[e];
        s_l[warp][2 * quad + e] = l[e];
      }
  __syncthreads();
  float M[2] = {-INFINITY, -INFINITY}, L[2] = {0.f, 0.f};
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int j = 2 * quad + e;
    if (j >= G) continue;
    for (int w = 0; w < kWarps; ++w) M[e] = fmaxf(M[e], s_m[w][j]);
    for (int w = 0; w < kWarps; ++w)
      if (s_l[w][j] > 0.f) L[e] += s_l[w][j] * fast_exp2(s_m[w][j] - M[e]);
    const float f = l[e] > 0.f ? fast_exp2(m[e] - M[e]) : 0.f;
#pragma unroll
    for (int t = 0; t < kV64 * 4; ++t) {
      o[t][e] *= f;
      o[t][2 + e] *= f;
    }
  }
#pragma unroll
  for (int half = kWarps / 2; half >= 1; half /= 2) {
    if (warp >= half && warp < 2 * half)
#pragma unroll
      for (int t = 0; t < kOut; ++t) s_red[warp - half][t][lane] = o[t / 4][t % 4];
    __syncthreads();
    if (warp < half)
#pragma unroll
      for (int t = 0; t < kOut; ++t) o[t / 4][t % 4] += s_red[warp][t][lane];
    __syncthreads();
  }
  if (warp != 0) return;
  // Warp 0 holds the CTA's output: lane (r, quad), head 2 quad + e, dims c * 64 + 8 r + 2 ip and + 1.
  const bool direct = p.splits == 1;  // the whole row of positions: normalize and write `out`
  const int64_t part = (int64_t(b) * p.Hkv + h) * p.splits + split;
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int j = 2 * quad + e;
    if (j >= G) continue;
    if (direct) {
      const float inv = L[e] > 0.f ? 1.f / L[e] : NAN;  // nothing attended: NaN, as torch's softmax
      T* out = static_cast<T*>(p.out) + ((int64_t(b) * p.Hkv + h) * G + j) * D;
#pragma unroll
      for (int c = 0; c < kV64; ++c)
#pragma unroll
        for (int ip = 0; ip < 4; ++ip)
          *reinterpret_cast<uint32_t*>(out + c * 64 + 8 * r + 2 * ip) =
              Elem<T>::pack2(o[c * 4 + ip][e] * inv, o[c * 4 + ip][2 + e] * inv);
    } else {
      float* po = p.part_o + (part * G + j) * D;
#pragma unroll
      for (int c = 0; c < kV64; ++c)
#pragma unroll
        for (int ip = 0; ip < 4; ++ip)
          *reinterpret_cast<float2*>(po + c * 64 + 8 * r + 2 * ip) = make_float2(o[c * 4 + ip][e], o[c * 4 + ip][2 + e]);
      if (r == 0) {
        p.part_ml[(part * G + j) * 2] = M[e];
        p.part_ml[(part * G + j) * 2 + 1] = L[e];
      }
    }
  }
}

// Dynamic shared memory: s_w [splits][G] weights, then s_inv [G].
template <typename T, int D>
__global__ void __launch_bounds__(kCombineThreads) attn_combine_kernel(AttnParams p) {
  extern __shared__ float s_w[];
  const int h = blockIdx.x, b = blockIdx.y;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int G = p.G, splits = p.splits;
  float* s_inv = s_w + splits * G;
  grid_dependency_wait();
  grid_dependents_launch();
  const int64_t part0 = (int64_t(b) * p.Hkv + h) * splits;
  const float* ml = p.part_ml + part0 * G * 2;
  for (int j = warp; j < G; j += kCombineThreads / 32) {  // warp j: query head j's weights
    float M = -INFINITY;
    for (int i = lane; i < splits; i += 32) M = fmaxf(M, ml[(i * G + j) * 2]);
#pragma unroll
    for (int off = 16; off > 0; off /= 2) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, off));
    float L = 0.f;
    for (int i = lane; i < splits; i += 32) {
      const float li = ml[(i * G + j) * 2 + 1];
      const float w = li > 0.f ? fast_exp2(ml[(i * G + j) * 2] - M) : 0.f;  // empty split: nothing
      s_w[i * G + j] = w;
      L += li * w;
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) L += __shfl_xor_sync(0xffffffffu, L, off);
    if (lane == 0) s_inv[j] = L > 0.f ? 1.f / L : NAN;  // nothing attended: NaN, as torch's softmax
  }
  __syncthreads();
  T* out = static_cast<T*>(p.out) + (int64_t(b) * p.Hkv + h) * G * D;
  const float4* po = reinterpret_cast<const float4*>(p.part_o + part0 * G * D);
  for (int idx = tid; idx < G * D / 4; idx += kCombineThreads) {  // 4 columns of head j
    const int j = idx / (D / 4);
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 4
    for (int i = 0; i < splits; ++i) {  // in order: deterministic
      const float w = s_w[i * G + j];
      const float4 v = po[int64_t(i) * G * D / 4 + idx];
      acc.x += w * v.x;
      acc.y += w * v.y;
      acc.z += w * v.z;
      acc.w += w * v.w;
    }
    const float inv = s_inv[j];
    out[4 * idx + 0] = Elem<T>::from_float(acc.x * inv);
    out[4 * idx + 1] = Elem<T>::from_float(acc.y * inv);
    out[4 * idx + 2] = Elem<T>::from_float(acc.z * inv);
    out[4 * idx + 3] = Elem<T>::from_float(acc.w * inv);
  }
}

template <typename T, int D>
void launch(const AttnParams& ap, int64_t B, int64_t Hkv, bool wide, cudaStream_t stream, int device) {
  const dim3 grid(unsigned(ap.splits), unsigned(Hkv), unsigned(B));
  if (wide)
    launch_pdl(&attn_mma_kernel<T, D, kWideWarps>, grid, dim3(32 * kWideWarps), 0, stream, device, 1, ap);
  else
    launch_pdl(&attn_mma_kernel<T, D, kSplitWarps>, grid, dim3(32 * kSplitWarps), 0, stream, device, 1, ap);
  if (ap.splits == 1) return;  // the split kernel wrote `out`
  const size_t smem = size_t(ap.splits + 1) * size_t(ap.G) * sizeof(float);
  launch_pdl(&attn_combine_kernel<T, D>, dim3(unsigned(Hkv), unsigned(B)), dim3(kCombineThreads), smem, stream,
             device, 1, ap);
}

}  // namespace

size_t decode_attention_workspace_bytes(int64_t B, int64_t Hkv, int64_t G, int64_t S, int64_t D, int device) {
  return attention_workspace_bytes(B, Hkv, G, S, D, sm_count(device));
}

void decode_attention(const DecodeAttentionProblem& p, void* workspace, size_t workspace_bytes, void* stream,
                      AttnKernel kernel) {
  validate_decode_attention(p);
  if (kernel != AttnKernel::kAuto && kernel != AttnKernel::kMma && kernel != AttnKernel::kWide)
    throw Error("decode_attention: kernel must be kAuto, kMma or kWide");
  if (p.B > 65535 || p.Hkv > 65535) throw Error("decode_attention: B and Hkv must be <= 65535");
  if (p.S > (int64_t(1) << 30)) throw Error("decode_attention: S must be < 2^30");
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  const int sms = sm_count(device);
  if (kernel == AttnKernel::kAuto) kernel = attention_wide(p.B, p.Hkv, p.S, sms) ? AttnKernel::kWide : AttnKernel::kMma;
  const bool wide = kernel == AttnKernel::kWide;
  const AttnSplit sp = wide ? AttnSplit{1, (p.S + kAttnChunk - 1) / kAttnChunk} : attention_split(p.B, p.Hkv, p.S, sms);
  check_workspace(workspace, workspace_bytes, attention_workspace_bytes(p.B, p.Hkv, p.G, p.S, p.D, sms),
                  "decode_attention_workspace_bytes");
  // The combine kernel's weights: (splits + 1) x G floats of shared memory (splits <= kAttnMaxSplits: 32.8 KB).
  if (size_t(sp.splits + 1) * size_t(p.G) * sizeof(float) > 48 * 1024)
    throw Error("decode_attention: too many splits for the combine kernel's shared memory");
  AttnParams ap;
  ap.q = p.q;
  ap.k = p.k;
  ap.v = p.v;
  ap.mask = p.mask;
  ap.out = p.out;
  ap.part_o = static_cast<float*>(workspace);
  ap.part_ml = ap.part_o + p.B * p.Hkv * sp.splits * p.G * p.D;
  ap.k_sb = p.k_stride_b;
  ap.k_sh = p.k_stride_h;
  ap.v_sb = p.v_stride_b;
  ap.v_sh = p.v_stride_h;
  ap.mask_sb = p.mask_stride_b;
  ap.S = int(p.S);
  ap.G = int(p.G);
  ap.Hkv = int(p.Hkv);
  ap.splits = int(sp.splits);
  ap.chunks_per_split = int(sp.chunks_per_split);
  ap.scale = p.scale;
  ap.q_sb = p.q_stride_b ? p.q_stride_b : p.Hkv * p.G * p.D;
  ap.k_new = p.k_new;
  ap.v_new = p.v_new;
  ap.cos = p.cos;
  ap.sin = p.sin;
  ap.write_pos = p.write_pos;
  ap.new_sb = p.new_stride_b;
  ap.cs_sb = p.cs_stride_b;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const bool bf = p.dtype == DType::BF16;
  if (p.D == 128) {
    if (bf) launch<__nv_bfloat16, 128>(ap, p.B, p.Hkv, wide, st, device);
    else launch<__half, 128>(ap, p.B, p.Hkv, wide, st, device);
  } else {
    if (bf) launch<__nv_bfloat16, 64>(ap, p.B, p.Hkv, wide, st, device);
    else launch<__half, 64>(ap, p.B, p.Hkv, wide, st, device);
  }
}

}  // namespace gpu
}  // namespace lutmm
