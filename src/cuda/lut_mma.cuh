// The decode kernels' shared pieces: parameters, the pipeline-stage layout, the per-warp block
// computation (lookups -> mma.sync), the output store and the Stream-K fixup. Two kernels use them:
// lut_gemm.cu (cp.async pipeline, any sm_80+ GPU) and lut_stream.cu (bulk copies + mbarriers, a
// producer warp and a deep pipeline, sm_90a). Both read the same packed layout (docs/format.md),
// split the same (tile, k-block) iterations with Stream-K, and give bitwise the same results for
// the same grid.
#pragma once
#include "lut_regtable.cuh"
#include "wgmma.cuh"  // cluster barriers and distributed shared memory (sm_90a; nothing elsewhere)

namespace lutmm {
namespace gpu {
namespace lut {

constexpr int kWarps = 8;                         // compute warps per CTA; warp w owns row block w of a tile
                                                  // (lut_stream.cu's 4-bit 16-token tiles: pairs, compute_pair)
constexpr int kThreads = kWarps * 32;
constexpr int kXRowBytes = kBlockCols * 2 + 64;   // one token's 128 activations + 64 B pad: the 8 rows
                                                  // read by a quarter-warp's LDS.128 hit distinct banks

// GemmParams (lut_table.cuh) plus: partials [grid_y][workers][2][kThreads * 4 * MT], counters per
// (grid_y, tile).
template <typename T>
struct Params : GemmParams<T> {
  const T* x;               // M x K activations
  int tiles;                // tiles of rpt row blocks
  int rpt;                  // 16-row blocks per tile: 8, or 1, 2, 4 (lut_tile_rows; cp.async kernel, M <= rpt)
  int k_iters;              // iterations per tile: k-blocks / (8 / rpt), rounded up (each takes 8 / rpt k-blocks)
  int stages;               // pipeline stages in shared memory (per warp group in lut_stream.cu)
  int workers;              // Stream-K workers splitting the iterations: CTAs (lut_gemm.cu) or warp groups
  int cluster;              // > 1: clusters of this many CTAs, one tile each, reduced in shared memory
  int tile_rows;            // 16-row blocks per whole tile of lut_stream.cu's tiles-of-8 kernel: 8, or 5-7
                            // (lut_whole_tile_rows; 4 bits only, short_whole_tiles)
#if LUTMM_TIMELINE
  int timeline_slot;        // timeline.cuh's buffer this launch writes (lut_stream.cu's launch sets it)
#endif
};

// A compute thread's index inside its group of kWarps warps (lut_stream.cu runs two groups per CTA).
__device__ __forceinline__ int group_tid() { return threadIdx.x % kThreads; }

// SMALL_TABLE: the 128-byte entries at 4 bits whatever MT (lut_stream.cu's row tiles sized for three CTAs per SM).
template <int BITS, int MT, bool SMALL_TABLE = false>
struct Layout {
  static constexpr int kBlockBytes = 256 * BITS;
  static constexpr int kLutEntries = lut_entries<BITS>();      // pairs (3, 4 bits) or quads (2 bits)
  // Entry stride: 256 B (32 copies of 4 or 8 B; prmt addressing), except 4 bits with MT = 4, where a
  // 64 KB table would leave one CTA per SM: 128 B (32 KB, shift-and addressing; the lookups are
  // amortised over 4 MMAs there). H200, 2026-11-26: 8192x8192 M = 64 took 91.4 us with 64 KB, 71.6 us
  // with the earlier 32 KB table.
  // Also 128 B for 4-bit row tiles sized for three CTAs per SM (SMALL_TABLE): 64 KB would leave two. H100,
  // 2026-11-27, lutmm_bench M = 1 in one call (LUTMM_EXPERIMENT 31 then put 128 B everywhere): 6144x4096 on
  // 384 tiles of one row block sized for three 9.4 -> 7.6 us, but 4096x4096 (tiles sized for two) 6.0 ->
  // 6.5, 4096x14336 13.6 -> 13.8 and M = 4 6144x4096 9.1 -> 10.1: so only there.
  static constexpr int kEntryBytes = BITS == 4 && (MT == 4 || SMALL_TABLE) ? 128 : 256;
  // No shared table where the lookups read registers (lut_regtable.cuh).
  static constexpr int kLutBytes = kLutSource<BITS> == LutSource::kShared ? kLutEntries * kEntryBytes : 0;
  static constexpr int kStageW = kWarps * kBlockBytes;
  static constexpr int kStageS = kWarps * kScaleBytesPerRb;
  static constexpr int kStageX = 8 * MT * kXRowBytes;
  static constexpr int kStageBytes = kStageW + kStageS + kStageX;  // codes, scales, activations
};

// Row tiles: warp w of a tile of rpt row blocks computes block w of a stage, row block w % rpt at
// k-block (iteration * 8 / rpt + w / rpt) in lut_gemm.cu (its loader puts them there); in lut_stream.cu,
// whose TMA box lands row-major, row block w / (8 / rpt) at k-block w % (8 / rpt).
__device__ __forceinline__ int warp_row(int warp, int rpt) { return warp & (rpt - 1); }
__device__ __forceinline__ int warp_ksub(int warp, int rpt) { return warp / rpt; }

// A lane's byte offsets inside a pipeline stage, fixed for the kernel's life. Made once before the
// k-block loop, so each block adds them to its stage address instead of rederiving them from
// threadIdx (the compiler did that in every iteration: ~15 of the ~125 instructions per warp and
// block of the 2-bit TMA kernel). s_stride: scale bytes per row block in a stage; smem_base: the
// shared address of the table (kTableAddr, plus the CTA's rank << 24 in a cluster launch, which
// lane_byte carries into every lookup's address: see byte_entry).
struct LaneOffsets {
  uint32_t codes;      // this warp's block of codes + lane * 16 (3 bits: low nibbles)
  uint32_t hi;         // 3 bits: the block's high-bit words + lane * 8
  uint32_t scales;     // this warp's scales, rows g and g + 8
  uint32_t x;          // token row g's activations, this lane's 8 columns (+ 64 j for chunk j); with
                       // tiles of rpt < 8 row blocks, row g % rpt of the warp's k-block (tokens >= rpt are
                       // never stored: M <= rpt)
  uint32_t lane_byte;  // this lane's copy inside a table entry
  template <int BITS, int MT>
  // rpt, ksub: row blocks per tile and the warp's k-block within a stage (row tiles; see warp_row).
  static __device__ __forceinline__ LaneOffsets make(int s_stride, uint32_t smem_base, int rpt = kWarps, int ksub = 0) {
    using L = Layout<BITS, MT>;
    const int warp = group_tid() / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    LaneOffsets o;
    o.codes = uint32_t(warp * L::kBlockBytes + lane * 16);
    o.hi = uint32_t(warp * L::kBlockBytes + 512 + lane * 8);
    o.scales = uint32_t(L::kStageW + warp * s_stride + g * 4);
    // Activation rows in a stage: [8 / rpt k-blocks][rpt tokens] (one k-block of 8 * MT tokens at rpt = 8).
    // (At M < 8 most rows are zeros. Lanes of those rows reading a real token's row instead, or not
    // loading at all (predicated, zeros carried), to cut the loads' shared-memory wavefronts: H200,
    // 2026-11-28, A/B in one call each, within 0.5-1% on 57344x8192 and 11-14 other cases at M = 1-8;
    // not kept, docs/performance-log.md item 90.)
    const int xrow = rpt == kWarps ? g : ksub * rpt + (g & (rpt - 1));
    o.x = uint32_t(L::kStageW + L::kStageS + xrow * kXRowBytes + 16 * t);
    o.lane_byte = uint32_t(lane) * (BITS == 2 ? 8u : 4u) | (smem_base & 0xff000000u);  // quads at 2 bits
    return o;
  }
};

// The end of a scale group: part times the group's scales of rows g, g + 8 (one fp16 pair at `scale`)
// added to acc, part cleared.
template <int MT>
__device__ __forceinline__ void flush_scaled(float (&acc)[MT][4], float (&part)[MT][4], const uint8_t* scale) {
  const __half2 sh = *reinterpret_cast<const __half2*>(scale);
  const float2 sc = __half22float2(sh);  // rows g, g + 8
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      acc[mt][e] += part[mt][e] * (e < 2 ? sc.x : sc.y);
      part[mt][e] = 0.f;
    }
  }
}

// One warp, one k-block: adds this block's contribution for its 16 rows x 8*MT tokens to acc.
// FULL: the caller guarantees 4 whole chunks and groups >= 128 columns (one scale flush, at the end),
// so every per-chunk test folds away; the arithmetic, and so the result, is bitwise the same.
// off: LaneOffsets::make<BITS, MT>(scale bytes per row block in a stage, table address).
// ENTRY: the table's entry stride in bytes (Layout::kEntryBytes of the caller's table).
template <int BITS, int MT, typename T, bool FULL = false, int ENTRY = Layout<BITS, MT>::kEntryBytes>
__device__ __forceinline__ void compute_block(const Params<T>& p, const uint8_t* stage, const LaneOffsets& off,
                                              int kb, float (&acc)[MT][4]) {
  if constexpr (decode_ablation(2)) return;  // ablation: no lookups or MMAs
  uint32_t wd[8] = {}, hi[2] = {};
  load_code_words<BITS>(stage + off.codes, stage + off.hi, wd, hi);
  const uint8_t* ss = stage + off.scales;
  const uint8_t* xs = stage + off.x;
  const int nchunks = FULL ? 4 : min(4, (p.K - kb * kBlockCols) / 32);
  // Chunks after which a scale group ends (groups are 2^gl chunks; g >= 128 ends only at the block's end).
  const int glc = FULL ? 2 : min(p.gl, 2);
  const uint32_t flush = FULL ? 0x8u : (glc == 0 ? 0xFu : glc == 1 ? 0xAu : 0x8u) | (1u << (nchunks - 1));
  const uint32_t lane_byte = off.lane_byte;
  const RegTable<BITS, T> rt(p.table);  // unused with the shared table (kLutSource)
  // One partial sum per token tile. (Two chains of MMAs over alternate k-steps, to shorten the chain of
  // dependent MMAs: H200, cp.async kernel, 57344x8192 M = 1 5% and M = 16 11% slower; H100, 2026-11-26,
  // both kernels at M = 1 and 16: within 1%, so not kept.)
  float part[MT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) part[mt][0] = part[mt][1] = part[mt][2] = part[mt][3] = 0.f;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if (j < nchunks) {
      uint4 xv[MT];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
        xv[mt] = *reinterpret_cast<const uint4*>(xs + mt * 8 * kXRowBytes + 64 * j);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int ks = 2 * j + h;
        uint32_t a[4];
        if constexpr (kLutSource<BITS> == LutSource::kShared)
          lookup_a<BITS, ENTRY>(wd, hi, ks, lane_byte, a);
        else
          lookup_a_reg<BITS, T>(wd, hi, ks, rt, a);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
          Elem<T>::mma(part[mt], a, h ? xv[mt].z : xv[mt].x, h ? xv[mt].w : xv[mt].y);
      }
      if (flush & (1u << j)) flush_scaled<MT>(acc, part, ss + (j >> glc) * 32);
    }
  }
}

// Pairs of row blocks (lut_stream.cu's kPairRows): a warp computes two row blocks over half of each
// k-block instead of one row block over all of it, so each activation fragment it reads from shared
// memory feeds both row blocks' MMAs. Nsight Compute (H200, 2026-11-29, 4-bit g128, the TMA kernel's
// tiles of 8, one row block per warp): the shared-memory load wavefronts per warp and block are 32
// table lookups, 8 code words, ~4 scales and 16 * MT activations (counted 61 at M = 8 and 77 at M = 16,
// measured 61 and 77), and at M = 16 on 57344x8192 they kept the LSU data pipe 79% busy; pairs take
// the activations' share from 16 * MT to 8 * MT. The same lookups and MMAs per row block, summed in
// another order (each half over the segment, then the two halves).
// Warp w: row blocks 2 (w / 2) (codes and scales at off, as LaneOffsets::make for that warp) and, where
// TWO, 2 (w / 2) + 1 (one block on), chunks 2 h and 2 h + 1 (h = w % 2); acc[r]: row block 2 (w / 2) + r.
// LUTMM_EXPERIMENT 23 (prepared in session 38, not yet measured): pairs at 2 and 3 bits on 16-token
// tiles too, the 3-bit ones then sized for two CTAs per SM (the geometry in lut_gemm.cu; at three, 72
// registers leave no room for two row blocks' sums).
constexpr bool kPairsAllBits = LUTMM_EXPERIMENT == 23;
// Each row block's code words for k-steps 4 h .. 4 h + 3, renumbered as k-steps 0 .. 3
// (half_code_words, lut_table.cuh; 2 and 3 bits in experiment 23). ENTRY: the table's entry bytes.
template <int BITS, int MT, typename T, bool FULL = false, bool TWO = true, int ENTRY = Layout<BITS, MT>::kEntryBytes>
__device__ __forceinline__ void compute_pair(const Params<T>& p, const uint8_t* stage, const LaneOffsets& off, int kb,
                                             int h, int s_stride, float (&acc)[2][MT][4]) {
  static_assert(kLutSource<BITS> == LutSource::kShared, "pairs of row blocks: the shared table");
  if constexpr (decode_ablation(2)) return;  // ablation: no lookups or MMAs (as compute_block)
  constexpr int R = TWO ? 2 : 1;  // row blocks computed
  using L = Layout<BITS, MT>;
  uint32_t wd[2][8] = {}, hi[2] = {};
#pragma unroll
  for (int r = 0; r < R; ++r) {  // (half_code_words, lut_table.cuh)
    const uint8_t* cb = stage + off.codes + r * L::kBlockBytes + half_code_offset<BITS>(h);
    uint4 c;
    uint2 e = {};
    if constexpr (BITS == 2) {
      const uint2 c2 = *reinterpret_cast<const uint2*>(cb);
      c = make_uint4(c2.x, c2.y, 0u, 0u);
    } else {
      c = *reinterpret_cast<const uint4*>(cb);
    }
    if constexpr (BITS == 3) e = *reinterpret_cast<const uint2*>(stage + off.hi + r * L::kBlockBytes);
    half_code_words<BITS>(c, e, h, wd[r]);
  }
  const uint8_t* ss = stage + off.scales;
  const uint8_t* xs = stage + off.x;
  const int nchunks = FULL ? 4 : min(4, (p.K - kb * kBlockCols) / 32);
  const int glc = FULL ? 2 : min(p.gl, 2);
  const uint32_t lane_byte = off.lane_byte;
  float part[2][MT][4];
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) part[r][mt][0] = part[r][mt][1] = part[r][mt][2] = part[r][mt][3] = 0.f;
#pragma unroll
  for (int jj = 0; jj < 2; ++jj) {
    const int j = 2 * h + jj;  // the chunk
    if (FULL || j < nchunks) {
      uint4 xv[MT];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
        xv[mt] = *reinterpret_cast<const uint4*>(xs + mt * 8 * kXRowBytes + 64 * j);
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          uint32_t a[4];
          lookup_a<BITS, ENTRY>(wd[r], hi, 2 * jj + hh, lane_byte, a);
          // (Ablation bit 8: the first token tile's MMAs only, the others' activations still loaded: what
          // the MMAs past the first 8 tokens cost at M = 9-16.)
#pragma unroll
          for (int mt = 0; mt < (decode_ablation(8) ? 1 : MT); ++mt)
            Elem<T>::mma(part[r][mt], a, hh ? xv[mt].z : xv[mt].x, hh ? xv[mt].w : xv[mt].y);
        }
      if constexpr (decode_ablation(8))
#pragma unroll
        for (int mt = 1; mt < MT; ++mt) asm volatile("" ::"r"(xv[mt].x), "r"(xv[mt].y), "r"(xv[mt].z), "r"(xv[mt].w));
      // A scale group ends after every chunk (g = 32), after the half's second chunk (g >= 64: groups
      // of two chunks start at even ones), or at the k-block's last chunk.
      if (glc == 0 || jj == 1 || j == nchunks - 1) {
#pragma unroll
        for (int r = 0; r < R; ++r) flush_scaled<MT>(acc[r], part[r], ss + r * s_stride + (j >> glc) * 32);
      }
    }
  }
}

// cluster_finish: row blocks (warps) of a tile summed by one rank of a cluster of c CTAs (at most), and
// the bytes of its exchange buffer ([c source ranks][that many row blocks][4 mt][32 lanes] floats).
__host__ __device__ inline constexpr int cluster_rows_per_rank(int c) { return (kWarps + c - 1) / c; }
inline constexpr int cluster_xbuf_bytes(int c, int mt) { return c * cluster_rows_per_rank(c) * 4 * mt * 32 * 4; }

// Writes acc (+ bias) of this warp's 16 rows x 8*MT tokens to Y (p.silu_mul: silu(gate) * up, 8 columns);
// rpt: row blocks per tile (p.rpt, passed as the constant 8 by the kernels without row tiles: a runtime
// value there cost the 3-bit cp.async kernel 19 registers).
template <int MT, typename T>
__device__ __forceinline__ void store_tile(const Params<T>& p, int tile, int m0, const float (&acc)[MT][4],
                                           int rpt = kWarps) {
  const int warp = group_tid() / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int rb = tile * rpt + warp;
  if (p.silu_mul) {  // rows g (gate) and g + 8 (up) of the block meet here: acc[mt][e] and acc[mt][2 + e]
    if (rb * 16 >= p.N) return;  // N is a multiple of 16 (validate_problem)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int m = m0 + mt * 8 + 2 * t + e;
        if (m < p.M) store_silu_mul(p, m, rb * 16 + g, acc[mt][e], acc[mt][2 + e]);
      }
    return;
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int n = rb * 16 + g + 8 * i;
    if (n >= p.N) continue;
    const float b = p.bias ? Elem<T>::to_float(p.bias[n]) : 0.f;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int m = m0 + mt * 8 + 2 * t + e;
        if (m >= p.M) continue;
        const int64_t at = int64_t(m) * p.N + n;
        const float r = p.residual ? Elem<T>::to_float(p.residual[at]) : 0.f;
        p.y[at] = Elem<T>::from_float(acc[mt][2 * i + e] + b + r);
      }
  }
}

// GemmProblem::rms_norm: multiplies this thread's sums by their tokens' factors (row_rms_factors' rs,
// kNormSlots floats per token from the CTA's first token): acc[mt][2 i + e] is token 8 mt + 2 t + e.
template <int MT>
__device__ __forceinline__ void scale_by_rows(float (&acc)[MT][4], const float* rs) {
  const int t = threadIdx.x % 4;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const float r = rs[kNormSlots * (mt * 8 + 2 * t + e)];
      acc[mt][e] *= r;
      acc[mt][2 + e] *= r;
    }
}

// Split-K over a cluster of C = p.cluster CTAs (sm_90a; lut_split, src/plan.cpp): the CTA of rank r
// holds in acc the sum over its k-blocks [r CB / C, (r + 1) CB / C) of the tile; the tile is the sum
// over the ranks. Row block w (warp w) is summed by rank w % C: every warp sends its partial through
// distributed shared memory to that rank's exchange buffer `xbuf` (the drained pipeline stages,
// [source rank][w / C][4 MT][32 lanes] floats, cluster_xbuf_bytes), then the owning warps add the C partials in
// rank order, the order of the Stream-K fixup, so both give bitwise the same Y. No global memory,
// no counters: one cluster barrier pair instead of a write, a fence, an atomic and reads in L2.
// Every thread of every CTA of the cluster must call it (a producer warp calls cluster_sync twice).
template <int MT, typename T>
__device__ __forceinline__ void cluster_finish(const Params<T>& p, int tile, int m0, bool warp_live,
                                               const float (&acc)[MT][4], const float* xbuf) {
#if LUTMM_SM90A
  constexpr int kE = 4 * MT;  // accumulators per thread
  const int C = p.cluster, per = cluster_rows_per_rank(C);  // C in 2..8
  const int warp = group_tid() / 32, lane = threadIdx.x % 32, rank = blockIdx.x % C;
  const uint32_t dst = wg::map_to_rank(smem_addr(xbuf) + uint32_t(((rank * per + warp / C) * kE) * 32 + lane) * 4u,
                                       uint32_t(warp % C));
  wg::cluster_sync();  // every CTA of the cluster is done with its stages
#pragma unroll
  for (int e = 0; e < kE; ++e) wg::st_cluster(dst + uint32_t(e * 32) * 4u, acc[e / 4][e % 4]);
  wg::cluster_sync();  // the partials have landed
  if (warp % C == rank) {
    float sum[MT][4] = {};
    for (int r = 0; r < C; ++r)
#pragma unroll
      for (int e = 0; e < kE; ++e) sum[e / 4][e % 4] += xbuf[((r * per + warp / C) * kE + e) * 32 + lane];
    if (warp_live) store_tile<MT>(p, tile, m0, sum);
  }
#else
  __trap();  // never launched: clusters need sm_90a code (the host plans none without it)
#endif
}

// End of a worker's segment [seg_begin, it] of `tile` (iterations are (tile, k-block) pairs, k
// innermost, split over p.workers workers by sk_start; this is worker `cta`): a whole tile is stored;
// a piece is published as a Stream-K partial and the last contributor to arrive sums all pieces in
// worker order, so the result is bitwise the same on every run. The worker's kThreads compute
// threads all call it; `sync` is a barrier over them. In a cluster launch (p.cluster > 1) the
// worker's only segment goes to cluster_finish with the exchange buffer `xbuf` (drained stages).
template <int MT, typename T, typename Sync>
__device__ __forceinline__ void finish_segment(const Params<T>& p, int cta, int tile, int m0, int seg_begin, int it,
                                               int it_begin, bool warp_live, int* flag, const float (&acc)[MT][4],
                                               const float* xbuf, Sync sync, int rpt = kWarps) {
  if (p.cluster > 1) {
    cluster_finish<MT>(p, tile, m0, warp_live, acc, xbuf);
    return;
  }
  const int64_t total = int64_t(p.tiles) * p.k_iters, grid = p.workers;
  const int tid = group_tid();
  const int tile_begin = tile * p.k_iters, tile_end = tile_begin + p.k_iters;
  if constexpr (decode_ablation(1)) {  // ablation: no Stream-K fixup
    if (warp_live) store_tile<MT>(p, tile, m0, acc, rpt);
    return;
  }
  if (seg_begin == tile_begin && it == tile_end - 1) {
    if (warp_live) store_tile<MT>(p, tile, m0, acc, rpt);
    return;
  }
  // Publish this partial; the last contributor to arrive sums all of them.
  const int slot = seg_begin == it_begin ? 0 : 1;
  const int64_t part_elems = int64_t(kThreads) * 4 * MT;
  float* mine = p.partials + ((int64_t(blockIdx.y) * grid + cta) * 2 + slot) * part_elems;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int e = 0; e < 4; ++e) mine[(mt * 4 + e) * kThreads + tid] = acc[mt][e];
  // (arrive_last's acq_rel counter replaced two sequentially consistent __threadfence()s. H100,
  // 2026-11-26, M = 1: 4096x4096 9.1 -> 8.3 us, 8192x8192 TMA kernel 19.7 -> 18.4 us.)
  const int first = sk_owner(tile_begin, total, grid), last = sk_owner(tile_end - 1, total, grid);
  if (arrive_last(p.counters + int64_t(blockIdx.y) * p.tiles + tile, last - first + 1, tid, flag, sync)) {
    // (Loading 8 / MT contributors' partials at once, then adding them in order, made no difference:
    // H100, 2026-11-26, within 2% on 8192x8192, 57344x8192, 10240x8192, 3-bit 8192x8192: the cost is
    // the chain of the partials' write, the counter's round trip and a read, not the reads' count.)
    float sum[MT][4] = {};
    for (int c = first; c <= last; ++c) {
      const int cslot = tile_begin <= sk_start(c, total, grid) ? 0 : 1;
      const float* src = p.partials + ((int64_t(blockIdx.y) * grid + c) * 2 + cslot) * part_elems;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int e = 0; e < 4; ++e) sum[mt][e] += __ldcg(src + (mt * 4 + e) * kThreads + tid);
    }
    if (warp_live) store_tile<MT>(p, tile, m0, sum, rpt);
  }
  // No barrier needed before the next fixup rewrites *flag: it first passes sync() above.
}

// ---- host side ----------------------------------------------------------------------------------

// Launch geometry of a decode call, shared by workspace_bytes() and the launch so both agree.
struct Geometry {
  int mt;          // token tiles of 8 per warp: 1 (M <= 8), 2 (M <= 16), 4
  bool tma;        // lut_stream.cu's kernel (else lut_gemm.cu's)
  int grid_x;      // Stream-K workers splitting the (tile, k-block) iterations: CTAs, or warp groups (tma)
  int grid_y;      // token slices of 8 * mt
  int tiles;       // tiles of rpt row blocks
  int rpt;         // 16-row blocks per tile (lut_tile_rows; 8 but in the cp.async kernel)
  int ctas;        // CTAs per SM the kernel is sized for, for row tiles (rpt < 8; lut_tile_rows_tma3) and
                   // 3-bit tiles of 8 on the TMA kernel (lut_tiles8_tma3); 0: the TMA kernel's default for
                   // (bits, mt) (stream_workers_per_sm: the 3-bit 32-token tiles are sized for two)
  int col_blocks;  // 128-column k-blocks
  int k_iters;     // iterations per tile: col_blocks / (8 / rpt), rounded up
  int stages;      // pipeline stages (tma)
  int cluster;     // > 1: clusters of this many CTAs per tile (lut_split, src/plan.cpp)
  int device;      // the current device (asked once per call)
  int tile_rows = kWarps;  // row blocks per whole tile of the TMA kernel's tiles of 8 (4 bits: 5-7 where
                           // shorter ones fill more slots, lut_whole_tile_rows, short_whole_tiles); one tile per worker
  int groups = 1;          // workers (warp groups) per CTA of the TMA kernel: 2 on one CTA per SM where
                           // lut_two_group_ctas (src/plan.cpp; 4 bits, 8-token tiles of 8 row blocks)
};
inline size_t counters_bytes(const Geometry& g) { return counter_region_bytes(int64_t(g.grid_y) * g.tiles); }
// (Tiles of fewer than 8 row blocks are one whole tile per CTA: no partials.)
inline size_t partials_bytes(const Geometry& g) {
  return g.rpt < kWarps || g.tile_rows < kWarps ? 0 : size_t(g.grid_y) * g.grid_x * 2 * kThreads * 4 * g.mt * 4;
}

// The kernel parameters of a call (both kernels).
template <typename T>
Params<T> make_params(const GemmProblem& prob, const Geometry& geo, void* ws) {
  Params<T> p;
  fill_gemm_params(p, prob, ws, counters_bytes(geo));
  p.x = static_cast<const T*>(prob.x);
  p.tiles = geo.tiles;
  p.rpt = geo.rpt;
  p.k_iters = geo.k_iters;
  p.stages = geo.stages;
  p.workers = geo.grid_x;
  p.cluster = geo.cluster;
  p.tile_rows = geo.tile_rows;
  return p;
}

// The TMA decode kernel's largest M: 32, with 32-token tiles (MT = 4) for M = 17-32, two CTAs per SM at
// every bit width (3 bits: three would leave 72 registers a thread) and the 32 KB table at 4 bits (Layout).
// H100, 2026-11-27, lutmm_bench A/B in one call, two rounds, M = 32, cp.async kernel -> TMA kernel:
// 8192x8192 4-bit 29.0 -> 24.2 us (M = 17 28.6 -> 24.5), 3-bit 29.2 -> 23.5-24.6, 2-bit 27.1 -> 21.9;
// 28672x4096 48.4 -> 38.5 (3-bit 49.4 -> 37.3); 4096x14336 27.4 -> 23.5; 6144x4096 16.1 -> 13.8;
// 57344x8192 161 -> 126 (3-bit 166 -> 124); M = 16 unchanged (docs/performance-log.md item 65).
// LUTMM_EXPERIMENT 37: up to 16 only, as before.
constexpr int kTmaMaxM = LUTMM_EXPERIMENT == 37 ? 16 : 32;

// At 4 bits the TMA kernel's whole tiles (one per worker) take fewer row blocks where those fill more of
// the slots than tiles of 8 (lut_whole_tile_rows, src/plan.cpp; Geometry::tile_rows; 28672x4096: 256
// tiles of 7 on 264 slots instead of 224 of 8). In practice 7: whole tiles of 8 fill >= 80% of the
// slots (lut_split), so 6 or 5 would not fit. One flag for the plan (lut_gemm.cu's geometry) and the
// kernel (lut_stream.cu). H200, 2026-11-28, lutmm_bench A/B in one call, two rounds, 28672x4096 4-bit
// g128 (docs/performance-log.md item 93): M = 1 24.2-24.3 -> 23.7-23.8 us, M = 4 22.8-23.0 -> 22.7-22.9,
// M = 16 27.5-27.6 -> 26.5-26.7, M = 32 38.6-38.7 -> 37.3-37.5 (predicted ~21.5 at M = 1). 3 and 2 bits
// keep tiles of 8: 3-bit 23.8 -> 24.7-24.8, 2-bit 22.9 -> 23.2. With experiment 32's 9 stages or
// experiment 9's CTAs of two warp groups slower still (24.5-24.6 at M = 1). LUTMM_EXPERIMENT 15: 4-bit
// tiles of 8, as before.
__host__ __device__ constexpr bool short_whole_tiles(int bits) { return bits == 4 && LUTMM_EXPERIMENT != 15; }

// lut_stream.cu: whether its kernel runs on `device` (sm_90 and a build with sm_90a code), its
// Stream-K workers per SM, clusters and pipeline stages per worker for (bits, mt), and the launch.
bool stream_supported(int device);
// Its default size per (bits, mt), one worker per CTA: three CTAs per SM at 3 bits, but two for the
// 32-token tiles (mt = 4). (The two-group CTAs, Geometry::groups, have as many workers per SM as 4 bits' two CTAs.)
int stream_workers_per_sm(int bits, int mt, bool rows = false);
// ctas: CTAs per SM the kernel is sized for (Geometry::ctas; 0: its default); rows: tiles of rpt < 8 row
// blocks; groups: warp groups per CTA (Geometry::groups; 2 only with ctas = 1, mt = 1 and no row tiles).
int stream_stages(int bits, int mt, int device, int ctas = 0, bool rows = false, int groups = 1);
// Clusters of 2..8 CTAs of the TMA kernel for (bits, mt), default size, that fit `device` at once
// (lut_split, src/plan.cpp).
std::array<int, 9> stream_max_clusters(int bits, int mt, int device);
void stream_launch(const GemmProblem& prob, const Geometry& geo, void* ws, cudaStream_t stream);

}  // namespace lut
}  // namespace gpu
}  // namespace lutmm
