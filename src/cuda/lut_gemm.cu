// The fused LUT GEMM: Y (M x N) = X (M x K) * W_hat^T, W_hat = T[Q] * S, read from the packed layout.
//
// How it works (see docs/format.md for the packed layout it reads):
//
// * Transposed problem. Tokens are few at decode, so the weight is the 16-row A operand of
//   mma.m16n8k16 and the tokens are its 8-wide N side: a warp computes Y^T for 16 weight rows x
//   8*MT tokens. With M = 1 only 1/8 of the tensor-core work is wasted instead of 15/16.
// * Vectorized LUT. The packed byte for a pair of codes indexes a shared-memory table of value
//   pairs (2^(2 bits) entries of half2/bf162), so one 32-bit shared load yields one A register;
//   at 2 bits a whole byte (4 codes) indexes a table of value quads, one 64-bit load = 2 registers.
//   The table is replicated 32 times: entry e, lane l's copy sits at byte e * 256 + l * 4 (quads:
//   l * 8), so lane l always reads bank l (l and l + 16 at 2 bits, one 64-bit wavefront each):
//   conflict-free whatever the codes. The 256-byte entry stride makes an address a single byte
//   permute: prmt puts the code byte into bits 8-15 and the lane's offset into bits 0-7, so a 4-bit
//   or 2-bit lookup is 2 instructions (prmt, lds). 3-bit codes are split over two fields and take
//   shifts and masks. Cost: 64 KB (4 and 2 bits), 16 KB (3 bits) of shared memory per CTA.
//   (H200, 2026-11-26: the earlier 128-byte stride with shift/and/add addressing ran 8192x8192 M=1
//   in 30.5 us; see docs/performance-log.md for this layout's number.)
// * Scales after the MMA. The table values are looked up unscaled; each 32-column chunk's product
//   is accumulated in fp32 `part` and multiplied by the row's group scale when the group ends
//   (acc += part * s). This removes the per-weight multiply and keeps the scale in fp32.
// * Pipeline. A CTA of 8 warps owns a tile of 128 rows (warp w: row block w) and walks k-blocks of
//   128 columns; each k-block's weights, scales and activations arrive through a 3-stage cp.async
//   pipeline shared by the CTA, so 2 iterations of loads stay in flight per CTA.
// * Stream-K. All (tile, k-block) iterations are flattened, k innermost, and split evenly over a
//   grid that fills the GPU, so shapes with few tiles still keep every SM streaming. A tile cut
//   between CTAs is finished by whichever contributor arrives last (per-tile counter), which sums
//   all partials from the workspace in CTA order: the result is bitwise the same on every run.
//   Where few tiles leave room (sm_90, lut_split in src/plan.cpp), each tile's CTAs form a
//   thread-block cluster instead and add their partials through distributed shared memory
//   (cluster_finish, lut_mma.cuh): no workspace round trips, the same sums.
// * Row tiles. At M <= 4, where tiles of R = 1, 2 or 4 row blocks number 70-100% of the CTA slots
//   (lut_tile_rows, src/plan.cpp; 4096x4096: 256 tiles of one row block), each CTA takes one whole
//   tile instead: a stage holds its R row blocks at 8 / R consecutive k-blocks (block w: row block
//   w % R, k-block w / R), so each warp still computes one 16 x 128 block per stage, and at the end
//   warp w % R adds the 8 / R warps' sums of its row block in shared memory, in k order. No Stream-K
//   partials, no counters: the global fixup was 2-2.3 us of a 7.7 us 4096x4096 call (item 38).
//   lut_stream.cu's kernel does the same with TMA boxes (item 40).
#include <algorithm>
#include <array>
#include <optional>

#include "lut_mma.cuh"
#include "lutmm/cuda.h"

// Kernel experiments for A/B builds (cmake -DLUTMM_EXPERIMENT=N, `EXPERIMENTS=2 bash scripts/gpu.sh kab`):
//   0  the default kernel
//   2  4 pipeline stages instead of 3 (H200, 2026-11-26: no change at M = 1, M = 16 up to 38% slower)
//   7  no programmatic dependent launch (the prologue waits for the previous kernel to finish)
//   1  no CTAs of two warp groups (lut_two_group_ctas, src/plan.cpp): two CTAs of one group per SM, as
//      before item 99
//  (8: row tiles sized for two or three workers per SM as that many warp groups of one CTA per SM;
//   4-20% slower, item 100, removed)
//  (9: one CTA per SM of two warp groups sharing one table on every TMA launch; adopted where
//   Stream-K ranges are long, item 99: lut_two_group_ctas)
//  11  lut_stream.cu: two CTAs per SM at 3 bits instead of three
//  20  2 and 3 bits: the table in registers, looked up with byte permutes (lut_regtable.cuh), no shared table
//  21  2 and 3 bits: the pair table spread over the lanes, looked up with warp shuffles, no shared table
//  (20, 21: docs/performance-log.md item 36; the shared tables were kept. 23, a 2-bit pair table, was
//   measured at commit a4a87fb and removed)
//  18  src/plan.cpp: decode clusters of any size 2-8, each tile's k-blocks in near-equal ranges
//      (cluster_start), where 2, 4, 8 do not fit or divide them: slower (item 38)
//  19  src/plan.cpp: no row tiles (lut_tile_rows returns 8; item 39)
//  22  no row tiles on the TMA kernel (item 40)
//  24  lut_stream.cu: two CTAs per SM at 3 bits for row tiles (item 42)
//  25  2- and 3-bit weights below the TMA threshold keep the cp.async kernel where the TMA kernel's row
//      tiles apply (item 42)
//  26  src/plan.cpp: row tiles only where they fill 80% of the slots, not 70% (item 43)
//  (27, 28: measured and adopted as lut_tiles8_tma3, src/plan.cpp, item 46; the numbers now name
//   lut_wgmma.cu ablations, as do 16, 17)
//  30  lut_stream.cu: one row block per warp on 4-bit 16-token tiles, as before item 100 (no pairs of
//      row blocks, kPairRows). (30 until session 38: branch exp/l2-prefetch only, TMA weight copies
//      without the evict-first hint.)
//  31  4 bits: the TMA kernel's row tiles sized for two CTAs per SM only, with the 64 KB table, as
//      before item 56 (measured first as the reverse: the 32 KB table everywhere and the tiles for three)
//  32  4 bits: the 32 KB table (128-byte entries) on the TMA kernel's tiles of 8 row blocks too, at two
//      CTAs per SM: more pipeline stages (H100: 1-3% slower, item 58)
//  33  4 bits: the TMA kernel's tiles of 8 row blocks on three CTAs per SM with the 32 KB table
//      (H100: slower, item 59; H200: 28672x4096 M = 1 3.5% faster, the rest 1-10% slower, item 89)
//  34  lut_stream.cu: whole-tile workers all start at k-block 0, as before item 92 (no spread starts)
//  13  lut_stream.cu: 4-bit row tiles all start at iteration 0, as before item 92 (no spread starts)
//  15  4 bits: the TMA kernel's whole tiles of 8 row blocks only, as before item 93 (no tiles of 6-7
//      where they fill more slots, lut_whole_tile_rows; short_whole_tiles, lut_mma.cuh)
//  (29, 8: tiles of 6-7 with experiment 32's table and experiment 9's CTAs; slower, item 93)
//  (36, the decode kernels without their epilogue options' code, was measured at commit 9f31708 and
//   removed: 0-0.3 us on plain calls, item 64; then, at 260c05e, dynamic units on the TMA kernel's
//   tiles of 8 at M <= 8 (workers taking fixed units from a counter, partials added in unit order):
//   correct and deterministic, but 1.3-7x slower, and removed, item 98)
//  35  M = 17-32: 3-bit weights of < 32 tiles and < 16M weights on the cp.async kernel (item 66's
//      rule, dropped in item 68)
//  37  the TMA kernel up to M = 16 only, M = 17-32 on the cp.async kernel (kTmaMaxM, lut_mma.cuh; item 65)
//  38  M = 17-32: weights below the TMA thresholds on the cp.async kernel, as at M <= 16 (item 66)
//  39  3-bit 32-token tiles on the TMA kernel without clusters (Stream-K only; item 67)
//  12  the H200's decode rules on every card: the TMA kernel for every weight with K >= 2048 at M <= 16
//      (item 85), and two-group CTAs (item 99)
//   3  lut_stream.cu: activation boxes of 8 * MT token rows at every M, as before item 96 (not of
//      min(M, 8 * MT))
//   4  lut_stream.cu: pairs of row blocks per warp on 4-bit 8-token tiles too (M <= 8; -2% to +1%,
//      item 100). (4 until session 38: activations copied with the L2 hint evict_last; gained nothing,
//      item 96.)
//  23  pairs of row blocks per warp at 2 and 3 bits on 16-token tiles too, the 3-bit ones sized for two
//      CTAs per SM (kPairsAllBits, lut_mma.cuh; prepared in session 38, not yet measured). (23 until
//      session 38: row tiles' activation boxes of M token rows at M < rpt; 9-11% slower, item 97.)
//  40 + mask: ablations that time a part of both decode kernels by leaving it out (wrong results on
//      purpose: run with AB_SKIP_TESTS): +1 no Stream-K fixup (each worker stores its own partial),
//      +2 no lookups or MMAs, +4 no table build (item 38); with them, in lut_stream.cu, +16 experiment
//      32's 32 KB table (deeper pipelines; item 91) and +32 experiment 34's in-step starts (79: the
//      loads-only kernel 47 with them; item 92); +8, the TMA kernel's pairs of row blocks (M = 9-16, 4
//      bits): the first 8 tokens' MMAs only, the other activations still read (48: what the MMAs past
//      the first 8 tokens cost; prepared in session 38; until item 99 bit 8 was experiment 9's CTAs of
//      two groups, item 91); +64, the TMA kernel only: activations in the prologue's stages only, none
//      after (item 95: what the per-stage X reads cost at M = 1-2; 104 alone)
// 200  instrumentation, not an experiment: lut_stream.cu records each worker's timeline
//      (src/cuda/timeline.cuh; `gpu.sh timeline`, LUTMM_BENCH_TIMELINE=1 lutmm_bench). Same results;
//      the 3-bit 32-token kernels spill 4 bytes there. 201: the same with experiment 1 (no CTAs of two
//      warp groups; `TIMELINE_EXPERIMENT=201 gpu.sh timeline`). (Before item 99, 201 was the timeline
//      with experiment 9.)

namespace lutmm {
namespace gpu {
namespace {

using namespace lut;

constexpr int kStages = LUTMM_EXPERIMENT == 2 ? 4 : 3;  // cp.async pipeline depth (k-blocks); 3 lets 2 CTAs
                                                        // (MT <= 2) share an SM beside their 64 KB tables
// ROWS: the kernel for tiles of rpt < 8 row blocks (MT = 1), whose warps add their partial sums in
// shared memory ([warp][4][32 lanes] floats after the flag). A separate instantiation, so that the
// kernel for tiles of 8 keeps its instruction count: the runtime rpt cost it 5% (H100, 2026-11-26,
// 4096x4096 M = 4, 7.7 -> 8.1 us).
template <bool ROWS>
constexpr int kRedBytes = ROWS ? kWarps * 4 * 32 * 4 : 0;
static_assert(kWarps <= kNormSlots, "row_rms_factors: one partial slot per warp");
template <int BITS, int MT, bool ROWS = false>
constexpr int kSmemBytes = Layout<BITS, MT>::kLutBytes + kStages * Layout<BITS, MT>::kStageBytes + 16 + kRedBytes<ROWS> +
                           32 * kNormSlots * 4;  // + flag, red, rms_norm factors of up to 32 tokens

// Copies one iteration's weights, scales (WeightLoader, lut_table.cuh) and activations into a
// pipeline stage. Activation rows at or beyond M are never loaded: zero_rows() clears them once in
// every stage.
template <int BITS, int MT, typename T, bool ROWS>
struct StageLoader {
  using L = Layout<BITS, MT>;
  static constexpr int kXChunks = 8 * MT * 16;                                 // 8*MT tokens x 16 chunks
  static constexpr int kXPer = (kXChunks + kThreads - 1) / kThreads;

  WeightLoader<BITS, kWarps, kThreads, ROWS> wl;
  const T* x_src[kXPer];  // token row + chunk column at kb0 = 0; nullptr when unused (rows >= M)
  int x_col[kXPer];       // first column of the chunk at kb0 = 0

  // Stage row q of the activations is token q (rpt = 8), or token q % rpt at k-block kb0 + q / rpt.
  __device__ StageLoader(const Params<T>& p, int m0, int rpt) : wl(p.s, p.G, p.col_blocks, rpt) {
    const int tid = threadIdx.x;
#pragma unroll
    for (int i = 0; i < kXPer; ++i) {
      const int c = tid + i * kThreads, q = c / 16;
      const int r = rpt == kWarps ? q : q % rpt, ksub = rpt == kWarps ? 0 : q / rpt;
      x_col[i] = ksub * kBlockCols + (c % 16) * 8;
      x_src[i] = c < kXChunks && m0 + r < p.M ? p.x + int64_t(m0 + r) * p.K + x_col[i] : nullptr;
    }
  }

  // Clears the activation rows that are never loaded (tokens >= M) in every stage.
  __device__ void zero_rows(uint8_t* stages) const {
#pragma unroll
    for (int i = 0; i < kXPer; ++i) {
      const int c = threadIdx.x + i * kThreads;
      if (c < kXChunks && x_src[i] == nullptr)
        for (int st = 0; st < kStages; ++st)
          *reinterpret_cast<uint4*>(stages + st * L::kStageBytes + L::kStageW + L::kStageS + (c / 16) * kXRowBytes +
                                    (c % 16) * 16) = make_uint4(0, 0, 0, 0);
    }
  }

  // Row blocks per tile: a constant 8 but in the ROWS kernel.
  static __device__ __forceinline__ int rpt(const Params<T>& p) { return ROWS ? p.rpt : kWarps; }
  // One iteration: the tile's rpt row blocks at k-blocks [kb0, kb0 + 8 / rpt).
  __device__ __forceinline__ void load(const Params<T>& p, uint8_t* stage, int tile, int kb0) const {
    load_weights(p, stage, tile, kb0);
    load_x(p, stage, kb0);
  }
  // Codes and scales: constant for the kernel's life, so safe to read before the previous kernel ends.
  __device__ __forceinline__ void load_weights(const Params<T>& p, uint8_t* stage, int tile, int kb0) const {
    wl.load(stage, stage + L::kStageW, p.w, p.s, tile * rpt(p), kb0, p.row_blocks, p.col_blocks, p.K, p.G, p.gl);
  }
  __device__ __forceinline__ void load_x(const Params<T>& p, uint8_t* stage, int kb0) const {
    const int tid = threadIdx.x;
    // Activations of tokens < M: 128 columns per k-block (zero beyond K).
#pragma unroll
    for (int i = 0; i < kXPer; ++i) {
      if (x_src[i] != nullptr) {
        const int c = tid + i * kThreads;
        const bool ok = kb0 * kBlockCols + x_col[i] < p.K;
        cp_async16(stage + L::kStageW + L::kStageS + (c / 16) * kXRowBytes + (c % 16) * 16,
                   ok ? x_src[i] + kb0 * kBlockCols : p.x, ok ? 16 : 0);
      }
    }
  }
};

template <int BITS, int MT, typename T, bool ROWS>
__global__ void __launch_bounds__(kThreads, 2) lut_gemm_kernel(const Params<T> p) {
  static_assert(!ROWS || MT == 1, "tiles of fewer than 8 row blocks hold one token row per k-block");
  using L = Layout<BITS, MT>;
  extern __shared__ __align__(16) uint8_t smem[];
  uint8_t* lut = smem;  // first, at shared address kTableAddr (checked): lookups add no base
  check_table_addr(smem);
  uint8_t* stages = smem + L::kLutBytes;
  int* flag = reinterpret_cast<int*>(stages + kStages * L::kStageBytes);
  float* red = reinterpret_cast<float*>(stages + kStages * L::kStageBytes + 16);  // kRedBytes<ROWS>
  float* rs = red + kRedBytes<ROWS> / 4;  // rms_norm factors, 8 * MT tokens x kNormSlots

  // Iterations: (tile, i) pairs, i innermost; iteration i of a tile covers k-blocks [i kpt, (i + 1) kpt).
  const int rpt = StageLoader<BITS, MT, T, ROWS>::rpt(p);
  const int kpt = kWarps / rpt;  // k-blocks per iteration: 1, or 8 / rpt with tiles of rpt row blocks
  const int64_t total = int64_t(p.tiles) * p.k_iters;  // < 2^31 (checked on the host)
  const int64_t grid = gridDim.x;
  const int cta = blockIdx.x;
  // Stream-K's even ranges, or in a cluster launch rank r's share of tile cta / C (cluster_start).
  const int it_begin = int(p.cluster > 1 ? cluster_start(cta, p.k_iters, p.cluster) : sk_start(cta, total, grid));
  const int it_end = int(p.cluster > 1 ? cluster_start(cta + 1, p.k_iters, p.cluster) : sk_start(cta + 1, total, grid));
  const int m0 = blockIdx.y * 8 * MT;
  const StageLoader<BITS, MT, T, ROWS> loader(p, m0, rpt);
  loader.zero_rows(stages);

  // Prologue: start the first k-blocks' weight loads, build the replicated pair table meanwhile, and
  // only then wait for the previous kernel in the stream (programmatic dependent launch: this much
  // overlaps its tail; nothing before the wait reads activations or writes global memory), then load
  // the first k-blocks' activations (one more cp.async group, waited for at the first iteration).
  // (tile, kb) of the next iteration to load and of the one to compute: advanced by one each step
  // (a 64-bit division per iteration cost ~100 instructions per thread).
  int ld_tile = int(it_begin / p.k_iters), ld_kb = int(it_begin % p.k_iters);
  int tile = ld_tile, kb = ld_kb;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (it_begin + s < it_end) {
      loader.load_weights(p, stages + s * L::kStageBytes, ld_tile, ld_kb * kpt);
      if (++ld_kb == p.k_iters) { ld_kb = 0; ++ld_tile; }
    }
    cp_async_commit();
  }
  if constexpr (kLutSource<BITS> == LutSource::kShared)
    build_table<BITS, L::kEntryBytes, kThreads, T>(lut, p.table);
  grid_dependency_wait();
  grid_dependents_launch();  // the next kernel may start its own prologue as our CTAs finish
  {
    int x_kb = kb;
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (it_begin + s < it_end) {
        loader.load_x(p, stages + s * L::kStageBytes, x_kb * kpt);
        if (++x_kb == p.k_iters) x_kb = 0;
      }
    }
    cp_async_commit();
  }
  if (p.rms_norm) {  // each token's factor, read while the first activations are in flight
    row_rms_factors(p, p.x, m0, 8 * MT, rs, int(threadIdx.x), kThreads, [] { __syncthreads(); });
    __syncthreads();
  }

  float acc[MT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) acc[mt][0] = acc[mt][1] = acc[mt][2] = acc[mt][3] = 0.f;
  const int warp = int(threadIdx.x / 32);
  const int w_row = ROWS ? warp_row(warp, rpt) : warp, w_ksub = ROWS ? warp_ksub(warp, rpt) : 0;
  LaneOffsets off = LaneOffsets::make<BITS, MT>(kScaleBytesPerRb, smem_addr(smem), rpt, w_ksub);
  int seg_begin = it_begin;  // first iteration of the current tile segment
  uint8_t* st_cmp = stages;                                 // stage to compute
  uint8_t* st_ld = stages + (kStages - 1) * L::kStageBytes;  // stage to load
  uint8_t* const st_last = stages + (kStages - 1) * L::kStageBytes;

  for (int it = it_begin; it < it_end; ++it) {
    // Loop-carried as far as the compiler knows, so ptxas keeps the lane offsets in registers instead
    // of rederiving them from threadIdx in every iteration (as in lut_stream.cu).
    asm volatile("" : "+r"(off.codes), "+r"(off.hi), "+r"(off.scales), "+r"(off.x), "+r"(off.lane_byte));
    if (it == it_begin) cp_async_wait<0>();  // the prologue's activations came last
    else cp_async_wait<kStages - 2>();
    __syncthreads();
    if (it + kStages - 1 < it_end) {
      loader.load(p, st_ld, ld_tile, ld_kb * kpt);
      if (++ld_kb == p.k_iters) { ld_kb = 0; ++ld_tile; }
    }
    cp_async_commit();
    st_ld = st_ld == st_last ? stages : st_ld + L::kStageBytes;
    const bool row_live = tile * rpt + w_row < p.row_blocks;
    const int wkb = kb * kpt + w_ksub;  // this warp's k-block
    if (row_live && wkb < p.col_blocks) {
      // Whole k-blocks with g >= 128 take the specialised path (one scale flush, no per-chunk tests).
      // H200, 2026-11-26: 57344x8192 M = 16 126 us with it, 151 us without (M = 1: 12-21% faster).
      if (p.gl >= 2 && (wkb + 1) * kBlockCols <= p.K)
        compute_block<BITS, MT, T, true>(p, st_cmp, off, wkb, acc);
      else
        compute_block<BITS, MT, T, false>(p, st_cmp, off, wkb, acc);
    }
    st_cmp = st_cmp == st_last ? stages : st_cmp + L::kStageBytes;

    if (kb == p.k_iters - 1 || it == it_end - 1) {  // end of this CTA's segment of `tile`
      if (p.rms_norm) scale_by_rows<MT>(acc, rs);
      if constexpr (ROWS) {
        if (kpt > 1) {  // tiles of rpt < 8 row blocks: warp w_row (w_ksub = 0) adds the others' sums in order
#pragma unroll
          for (int e = 0; e < 4; ++e) red[(warp * 4 + e) * 32 + threadIdx.x % 32] = acc[0][e];
          __syncthreads();
          if (w_ksub == 0)
            for (int k = 1; k < kpt; ++k)
#pragma unroll
              for (int e = 0; e < 4; ++e) acc[0][e] += red[((warp + k * rpt) * 4 + e) * 32 + threadIdx.x % 32];
          // (the next writes to red come after the next segment's __syncthreads)
        }
      }
      if (p.cluster > 1) cp_async_wait<0>();  // the stages become the exchange buffer (only empty groups left)
      finish_segment<MT>(p, cta, tile, m0, seg_begin, it, it_begin, row_live && w_ksub == 0, flag, acc,
                         reinterpret_cast<const float*>(stages), [] { __syncthreads(); }, rpt);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) acc[mt][0] = acc[mt][1] = acc[mt][2] = acc[mt][3] = 0.f;
      seg_begin = it + 1;
    }
    if (++kb == p.k_iters) { kb = 0; ++tile; }
  }
  cp_async_wait<0>();
}

int mt_for(int64_t M) { return M <= 8 ? 1 : (M <= 16 ? 2 : 4); }

// How the kernel fits a device: CTAs per SM, and clusters of 2, 4, 8 CTAs at once (lut_split; none
// without sm_90a code, where cluster_finish is absent).
struct Fit {
  int ctas_per_sm;
  std::array<int, 9> clusters;
};
template <int BITS, int MT, typename T, bool ROWS = false>
const Fit& fit(int dev) {
  // Resolved once per instantiation and device; kernel attributes must allow the large smem first.
  static PerDevice<Fit> cache;
  return cache.get(dev, [&] {
    auto* k = &lut_gemm_kernel<BITS, MT, T, ROWS>;
    constexpr int smem = kSmemBytes<BITS, MT, ROWS>;
    allow_dynamic_smem(reinterpret_cast<const void*>(k), smem, dev);
    Fit f{};
    check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&f.ctas_per_sm, k, kThreads, smem),
               "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
    f.ctas_per_sm = std::max(1, f.ctas_per_sm);
    if (stream_supported(dev) && !ROWS) f.clusters = max_clusters(k, kThreads, smem, dev);
    return f;
  });
}
template <typename T, int MT, bool ROWS = false>
Fit fit_bits(int bits, int dev) {
  return with_bits(bits, [&](auto b) { return fit<decltype(b)::value, MT, T, ROWS>(dev); });
}
// CTAs per SM of the kernel for tiles of fewer than 8 row blocks (MT = 1).
int rows_ctas_per_sm(int bits, DType dt, int dev) {
  return (dt == DType::F16 ? fit_bits<__half, 1, true>(bits, dev) : fit_bits<__nv_bfloat16, 1, true>(bits, dev)).ctas_per_sm;
}
Fit fit_any(int bits, int mt, DType dt, int dev) {
  if (dt == DType::F16)
    return mt == 1 ? fit_bits<__half, 1>(bits, dev) : mt == 2 ? fit_bits<__half, 2>(bits, dev) : fit_bits<__half, 4>(bits, dev);
  return mt == 1 ? fit_bits<__nv_bfloat16, 1>(bits, dev)
                 : mt == 2 ? fit_bits<__nv_bfloat16, 2>(bits, dev) : fit_bits<__nv_bfloat16, 4>(bits, dev);
}

// The DRAM bandwidth the decode rules measured on the H200 read (lut_tma_by_size, lut_two_group_ctas):
// the card's peak; LUTMM_EXPERIMENT 12 puts the H200's rules on every card.
double rules_peak_bytes_per_s(int device) {
  return LUTMM_EXPERIMENT == 12 ? kFastHbmBytesPerS : peak_dram_bytes_per_s(device);
}
// Whether the TMA kernel takes this weight at M <= 16 by its size alone (Hopper; the rule and its
// measurements: lut_tma_by_size, src/plan.cpp).
bool tma_by_size(const Shape& s, int device) {
  return lut_tma_by_size(s.N, s.K, s.bits, rules_peak_bytes_per_s(device));
}
// Whether the TMA kernel can serve M tokens on `device` (sm_90 with sm_90a code, M <= kTmaMaxM).
bool tma_serves(int64_t M, int device) { return M <= kTmaMaxM && stream_supported(device); }

// The kernel for a call (see LutKernel) and its launch geometry; auto_split = false (DecodeSplit::
// kStreamK): tiles of 8 row blocks and Stream-K only (the workspace bound: no plan needs more).
Geometry geometry(int64_t M, const Shape& s, DType dt, int device, LutKernel kernel, bool auto_split = true) {
  Geometry g;
  g.mt = mt_for(M);
  const bool tma_ok = tma_serves(M, device);
  if (kernel == LutKernel::kTma && !tma_ok)
    throw Error("lut kernel: the TMA decode kernel needs an sm_90 GPU, a build with sm_90a code and M <= " +
                std::to_string(kTmaMaxM));
  g.rpt = kWarps;
  g.ctas = 0;
  g.tiles = int((s.row_blocks() + kWarps - 1) / kWarps);
  g.col_blocks = int(s.col_blocks());
  g.k_iters = g.col_blocks;
  g.grid_y = int((M + 8 * g.mt - 1) / (8 * g.mt));
  g.device = device;
  auto split = [&](bool tma, int64_t& slots) {  // src/plan.cpp
    Fit f = tma ? Fit{stream_workers_per_sm(s.bits, g.mt), stream_max_clusters(s.bits, g.mt, device)}
                : fit_any(s.bits, g.mt, dt, device);
    // The 3-bit 32-token tiles (two CTAs per SM) split in clusters too (item 67; LUTMM_EXPERIMENT 39:
    // Stream-K only, as before).
    if (tma && LUTMM_EXPERIMENT == 39 && s.bits == 3 && g.mt == 4) f.clusters = {};
    int clusters[9] = {};  // one token slice (grid_y = 1) only: the capacity counts one slice's clusters
    if (auto_split && g.grid_y == 1) std::copy(f.clusters.begin(), f.clusters.end(), clusters);
    slots = int64_t(sm_count(device)) * f.ctas_per_sm;
    return lut_split(g.tiles, g.col_blocks, slots, clusters);
  };
  // Row blocks per tile (lut_tile_rows, src/plan.cpp) for either kernel: 8 where row tiles do not apply
  // (on the TMA kernel also where its boxes cannot bring them: lut_tma_rows_ok).
  // At 3 and 4 bits the TMA kernel's row tiles come sized for three or two CTAs per SM (lut_tile_rows_tma3).
  auto rows_for = [&](bool tma) {
    RowTiles t{kWarps, 0};
    if (!auto_split || g.mt != 1 || (tma && LUTMM_EXPERIMENT == 22)) return t;
    const int ctas = tma ? stream_workers_per_sm(s.bits, 1, true) : rows_ctas_per_sm(s.bits, dt, device);
    if (tma && ctas == 3)
      t = lut_tile_rows_tma3(M, s.row_blocks(), s.col_blocks(), sm_count(device),
                             s.bits == 4 ? kRowTileFill4 : kRowTileFill);
    else t = {lut_tile_rows(M, s.row_blocks(), s.col_blocks(), int64_t(sm_count(device)) * ctas), ctas};
    if (tma && !lut_tma_rows_ok(t.rows, group_log2(s.group_size), s.K)) t.rows = kWarps;
    return t;
  };
  // The TMA kernel's tiles of 8 split over two workers per SM without clusters (Stream-K or, where tiles
  // fill 80-100% of those slots, whole tiles: lut_split), on CTAs sized for `ctas` per SM of `groups`
  // warp groups each.
  auto two_workers_per_sm = [&](int ctas, int groups) {
    const int no_clusters[9] = {};
    g.grid_x = int(lut_split(g.tiles, g.col_blocks, 2 * int64_t(sm_count(device)), no_clusters).workers);
    g.cluster = 1;
    g.ctas = ctas;
    g.groups = groups;
    g.stages = stream_stages(s.bits, g.mt, device, ctas, false, groups);
  };
  int64_t slots = 0;
  LutSplit sp;
  std::optional<RowTiles> tma_rows;  // rows_for(true), where the dispatch below already asked
  if (kernel == LutKernel::kAuto && tma_ok) {
    sp = split(true, slots);
    g.tma = tma_by_size(s, device) || (sp.cluster > 1 && sp.workers * 10 >= slots * 7);
    // 32-token tiles (M = 17-32) take the TMA kernel on every weight. (H100, 2026-11-27, lutmm_bench,
    // forced paths in one call, TMA vs cp.async kernel, M = 32, us: 4-bit 4096x4096 12.8 vs 12.8,
    // 3072x4096 10.6 vs 11.0, 2048x4096 9.2 vs 10.2, 2048x2048 7.3 vs 7.5, 1024x4096 7.0 vs 8.0,
    // 1024x2048 5.8 vs 6.2; 2-bit 4096x4096 11.0 vs 12.6, 2048x4096 9.1 vs 10.2; item 66. 3-bit, once
    // its 32-token tiles ran in clusters (item 67): 1024x4096 6.9 vs 8.0, 2048x4096 9.2 vs 10.4,
    // 3072x4096 10.2 vs 11.0, 2048x2048 7.2 vs 7.5.) LUTMM_EXPERIMENT 38 keeps the weight thresholds
    // alone (before item 66); 35 keeps item 66's 3-bit rule (from 32 tiles or 16M weights; item 68).
    if (g.mt == 4 && LUTMM_EXPERIMENT != 38 &&
        (LUTMM_EXPERIMENT != 35 || s.bits != 3 || g.tiles >= 32 || s.N * s.K >= (int64_t(16) << 20)))
      g.tma = true;
    // Smaller weights take the TMA kernel too where its row tiles apply. (H100, 2026-11-26,
    // lutmm_bench, M = 1: 4096x4096 TMA kernel on 256 tiles of one row block 6.0 us, the cp.async
    // kernel's 6.6; 2 bits 6.0-6.1 vs 6.7, 3 bits (tiles sized for two CTAs per SM) 6.0 vs 6.6:
    // docs/performance-log.md items 40, 42; LUTMM_EXPERIMENT 25 keeps 2 and 3 bits on the cp.async kernel.)
    if (!g.tma && (s.bits == 4 || LUTMM_EXPERIMENT != 25)) {
      tma_rows = rows_for(true);
      g.tma = tma_rows->rows < kWarps;
    }
  } else {
    g.tma = kernel == LutKernel::kTma;
  }
  // 4 bits at M <= 8 with long Stream-K ranges over tiles of 8: one CTA per SM of two warp groups, on the
  // same 2 x SMs workers and ranges as two CTAs (so bitwise the same results as DecodeSplit::kStreamK),
  // ahead of row tiles and clusters (lut_two_group_ctas, src/plan.cpp, with its measurements).
  if (g.tma && auto_split && g.grid_y == 1 &&
      lut_two_group_ctas(s.bits, M, g.tiles, g.col_blocks, sm_count(device), rules_peak_bytes_per_s(device))) {
    two_workers_per_sm(1, 2);
    return g;
  }
  if (sp.workers == 0 || !g.tma) sp = split(g.tma, slots);
  g.grid_x = int(sp.workers);
  g.cluster = sp.cluster;
  g.stages = g.tma ? stream_stages(s.bits, g.mt, device) : kStages;
  // The cp.async kernel on tiles of fewer row blocks, one whole tile per CTA, where they fill the GPU
  // (lut_tile_rows, src/plan.cpp). H100, 2026-11-26, lutmm_bench A/B in one call, M = 1, against
  // Stream-K over 256 workers (32 tiles x 8, fixup through global memory): 4096x4096 4-bit 7.7 -> 6.6
  // us, 3-bit 8.2 -> 7.4, 2-bit 7.8 -> 6.8. Not where the TMA kernel serves (its deeper pipeline
  // wins on long ranges): 4096x14336 15.3 (TMA, Stream-K) vs 16.0 (cp.async, 256 tiles of 1),
  // 8192x8192 16.6 vs 17.9 (tiles of 2), 3-bit 19.8 vs 22.2, 2-bit 13.4 vs 17.4.
  // Row tiles on the TMA kernel too (item 40; same call, M = 1, Stream-K -> row tiles: 4096x14336
  // 15.4 -> 13.7 us (tiles of 1), 2-bit 12.5 -> 11.3; 8192x8192 16.7 -> 16.7 (tiles of 2), 8192x28672
  // 49.8 -> 49.2).
  {
    const RowTiles t = g.tma && tma_rows ? *tma_rows : rows_for(g.tma);
    const int r = t.rows;
    if (r < kWarps) {
      g.rpt = r;
      g.tiles = int((s.row_blocks() + r - 1) / r);
      g.k_iters = (g.col_blocks + kWarps / r - 1) / (kWarps / r);
      g.grid_x = g.tiles;
      g.cluster = 1;
      g.ctas = t.ctas_per_sm;
      if (g.tma) g.stages = stream_stages(s.bits, g.mt, device, t.ctas_per_sm, true);
    }
  }
  // 3-bit tiles of 8 row blocks on the TMA kernel sized for two CTAs per SM instead of three, whole
  // or Stream-K (lut_tiles8_tma3, src/plan.cpp, with its measurements; no clusters): lut_split over
  // the two-per-SM slots gives both (its whole-tile rule is lut_tiles8_tma3's; test_plan.cpp checks).
  // (The 32-token tiles, mt = 4, are only sized for two: their default, stream_workers_per_sm.)
  // (Experiment 23: every 3-bit 16-token tile of 8 sized for two, for its pairs of row blocks.)
  if (g.tma && s.bits == 3 && auto_split && g.mt < 4 && g.rpt == kWarps && g.grid_y == 1) {
    if (lut_tiles8_tma3(M, g.tiles, s.N * s.K, sm_count(device)).ctas_per_sm == 2 || (kPairsAllBits && g.mt == 2))
      two_workers_per_sm(2, 1);
  }
  // 4 bits: whole tiles of 5-7 row blocks where they fill more slots (short_whole_tiles, lut_mma.cuh).
  if (short_whole_tiles(s.bits) && g.tma && auto_split && g.rpt == kWarps && g.cluster == 1 && g.grid_y == 1 &&
      g.grid_x == g.tiles) {
    const int64_t slots = int64_t(sm_count(device)) * (g.ctas ? g.ctas : stream_workers_per_sm(s.bits, g.mt));
    g.tile_rows = lut_whole_tile_rows(s.row_blocks(), slots);
    g.tiles = int((s.row_blocks() + g.tile_rows - 1) / g.tile_rows);
    g.grid_x = g.tiles;
  }
  return g;
}

template <int BITS, int MT, typename T>
void launch(const GemmProblem& prob, const Geometry& geo, void* ws, cudaStream_t stream) {
  if (geo.cluster > 1 && cluster_xbuf_bytes(geo.cluster, MT) > kStages * Layout<BITS, MT>::kStageBytes)
    throw Error("internal: the cluster exchange buffer does not fit the pipeline stages");
  const Params<T> p = make_params<T>(prob, geo, ws);
  dim3 grid(geo.grid_x, geo.grid_y);
  if constexpr (MT == 1) {
    if (geo.rpt < kWarps) {
      fit<BITS, MT, T, true>(geo.device);  // sets the smem attribute on this device
      launch_pdl(&lut_gemm_kernel<BITS, MT, T, true>, grid, kThreads, kSmemBytes<BITS, MT, true>, stream, geo.device, 1, p);
      return;
    }
  }
  if (geo.rpt != kWarps) throw Error("internal: tiles of fewer than 8 row blocks need M <= 8");
  fit<BITS, MT, T>(geo.device);  // sets the smem attribute on this device
  launch_pdl(&lut_gemm_kernel<BITS, MT, T, false>, grid, kThreads, kSmemBytes<BITS, MT>, stream, geo.device, geo.cluster, p);
}

template <typename T, int MT>
void launch_bits(const GemmProblem& prob, const Geometry& geo, void* ws, cudaStream_t st) {
  with_bits(prob.shape.bits, [&](auto b) { launch<decltype(b)::value, MT, T>(prob, geo, ws, st); });
}
template <typename T>
void launch_mt(const GemmProblem& prob, const Geometry& geo, void* ws, cudaStream_t st) {
  if (geo.mt == 1) launch_bits<T, 1>(prob, geo, ws, st);
  else if (geo.mt == 2) launch_bits<T, 2>(prob, geo, ws, st);
  else launch_bits<T, 4>(prob, geo, ws, st);
}

size_t need_bytes(const Geometry& g) { return counters_bytes(g) + partials_bytes(g); }

}  // namespace

size_t workspace_bytes(int64_t M, const Shape& shape, int device) {
  validate_shape(shape);
  // Enough for either kernel and dtype (fp16 and bf16 have the same resources; take the larger).
  size_t need = 0;
  const bool tma = tma_serves(M, device);
  for (DType dt : {DType::BF16, DType::F16}) {
    need = std::max(need, need_bytes(geometry(M, shape, dt, device, LutKernel::kCpAsync, false)));
    if (tma) need = std::max(need, need_bytes(geometry(M, shape, dt, device, LutKernel::kTma, false)));
  }
  return need;
}

int tma_decode_max_m(int device) { return stream_supported(device) ? kTmaMaxM : 0; }

DecodePlan decode_plan(int64_t M, const Shape& shape, DType dtype, int device, LutKernel kernel, DecodeSplit split) {
  validate_shape(shape);
  if (M < 1) throw Error("decode_plan: M must be >= 1");
  const Geometry g = geometry(M, shape, dtype, device, kernel, split == DecodeSplit::kAuto);
  return DecodePlan{g.grid_x, g.cluster, g.rpt, g.tma, g.ctas, g.tile_rows, g.groups};
}

void lut_gemm(const GemmProblem& prob, void* ws, size_t ws_bytes, void* stream, LutKernel kernel, DecodeSplit split) {
  validate_problem(prob);
  if ((prob.shape.row_blocks() + kWarps - 1) / kWarps * prob.shape.col_blocks() >= (int64_t(1) << 31))
    throw Error("shape: N x K too large for one call (more than 2^31 tiles x k-blocks); split N");
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  const Geometry geo = geometry(prob.M, prob.shape, prob.dtype, dev, kernel, split == DecodeSplit::kAuto);
  check_workspace(ws, ws_bytes, need_bytes(geo), "workspace_bytes()");
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (geo.tma) stream_launch(prob, geo, ws, st);
  else if (prob.dtype == DType::F16) launch_mt<__half>(prob, geo, ws, st);
  else launch_mt<__nv_bfloat16>(prob, geo, ws, st);
}

}  // namespace gpu
}  // namespace lutmm
