// The decode kernel on Hopper (sm_90a): M <= 16 on large weights, M = 17-32 on every weight
// (dispatch: lut_gemm.cu's geometry; by size: lut_tma_by_size, src/plan.cpp); the math of lut_gemm.cu
// (lut_mma.cuh: pair-table lookups -> mma.sync with the weights as the 16-row A operand, scales
// after the MMA, Stream-K with a deterministic fixup), fed by a deeper, cheaper pipeline.
//
// Why a second kernel. At M = 1 the cp.async kernel spends its time waiting, not computing (H100,
// Nsight Compute: issue slots ~55% busy, one eligible warp per scheduler): every thread issues
// 16-byte copies, a CTA-wide barrier ends every k-block, and only 2 k-blocks per CTA (~36 KB per SM)
// are in flight; each CTA also rebuilds the 64 KB table and refills its pipeline for a handful of
// k-blocks. Here:
// * Roles. Warps 0-7 compute (warp w owns row block w of the 128-row tile, exactly as in
//   lut_gemm.cu; at 4 bits and M = 9-16, warps 2i and 2i + 1 share row blocks 2i and 2i + 1, a half
//   k-block each: kPairRows); one thread of warp 8 is the producer: per k-block, one TMA box for the tile's
//   codes (8 row blocks x 256 * BITS bytes), one for their scales, one for the activations; all
//   complete on the stage's "full" mbarrier. (H100, 2026-11-26: one bulk copy per
//   row block and per scale row, issued by 17 lanes, cost ~500 producer instructions per k-block:
//   bulk-copy operands are uniform registers, so ptxas loops over the lanes; 8192x8192 M = 1 took
//   31.4 us, against 20.9 us for the cp.async kernel.)
// * Pipeline. Two CTAs per SM (three at 3 bits), each persistent over its Stream-K range (the table
//   is built once per CTA, not per tile) with as many stages as shared memory holds (4 at 4 bits,
//   M <= 8). A stage is released by each compute warp as soon as its registers hold what it needs
//   ("empty" mbarrier, 8 arrivals); no CTA-wide barrier in the main loop.
// * Programmatic dependent launch as in lut_gemm.cu: the codes and scales of the first stages are
//   requested before griddepcontrol.wait, activations after it.
// * Row tiles (lut_gemm.cu's header; item 40): at M <= 4, one whole tile of R = 1, 2, 4 row blocks
//   per CTA where such tiles fill the GPU. A stage is then one 3-D box of codes (R row blocks x 8 / R
//   k-blocks, landing row-major: warp w computes row block w / (8 / R) at k-block w % (8 / R)), one
//   box of scales, and the activations (see issue_stage); the warps add their sums in shared memory.
// * The remaining cost (docs/performance-log.md, items 16-20): ~5.8 us fixed per call on 8192x8192
//   (launch, table build, first loads, Stream-K fixups) and a 2.75 TB/s marginal rate set by the
//   compute warps (~190 instructions per warp and 4-bit block, ~90 of them lookups and MMAs).
#include <algorithm>
#include <array>

#include "lut_mma.cuh"
#include "timeline.cuh"
#include "tma.cuh"
#include "wgmma.cuh"  // mbarriers, bulk copies, named barriers (sm_90a)

namespace lutmm {
namespace gpu {
namespace lut {
namespace {

// Warp groups per CTA (GROUPS) and CTAs per SM. A group is a Stream-K worker of kWarps compute warps
// with its own producer warp and stage ring; groups of a CTA share the table. One group per CTA, but
// two on one CTA per SM for 4-bit 8-token tiles of 8 row blocks where Stream-K ranges are long
// (lut_two_group_ctas, src/plan.cpp, with the H200's measurements; item 99): two CTAs of an SM run at
// different rates, two groups of one CTA do not. H100, 2026-11-26, M = 1, 4-bit g128: two CTAs of one
// group per SM (4 stages each) ran 8192x8192 in 19.3 us, 57344x8192 in 94.3 us; one CTA of two groups
// (one table, 7 stages per group) 20.4 and 96.4 us; one CTA of one group (8 compute warps per SM, 14
// stages) 22.7 and 111.4 us: the compute warps, not the bytes in flight, set the pace. H200, 2026-11-28,
// two groups on every launch (item 89): 57344x8192 M = 1 75.4-76.0 -> 74.2-75.2 us, 28672x4096
// 27.9-28.1 -> 26.7-27.0, but 10240x8192 18.6 -> 19.6 and 28672x4096 M = 8 22.4 -> 23.6-23.9.
// At 3 bits the table is 16 KB and three CTAs fit (24 compute warps per SM): H100, 2026-11-26,
// 8192x8192 M = 1 22.1 -> 20.9 us (LUTMM_EXPERIMENT 11 keeps two). Row tiles at 3 bits come in two
// sizes (the kernel's CTAS, lut_tile_rows_tma3): for three CTAs per SM, and for two where 256 tiles
// would leave a third of the slots empty. H100, 2026-11-26, M = 1, row tiles sized for three vs two
// (same call): 4096x14336 15.9 vs 13.5 us, 8192x8192 17.8 vs 15.7 (256 tiles do not spread two per SM
// when three fit); 6144x4096: 384 tiles sized for three 7.4 us, Stream-K 9.8 (with only the size for
// two, 384 tiles are too many). LUTMM_EXPERIMENT 24 sizes every 3-bit row tile for two (item 42).
// (Ablation builds LUTMM_EXPERIMENT 40 + mask combine experiment 32 with mask bit 16 and experiment 34
// with bit 32, and combined experiment 9 with bit 8 until item 99: item 91 timed the loads-only kernel,
// 47, at the first two's pipeline depths; item 92 timed 47 with in-step starts, now 79.)
constexpr bool kExp32 = LUTMM_EXPERIMENT == 32 || decode_ablation(16);
// Spread starts. Where every worker takes one whole tile of 8 row blocks (lut_split's 80-100% rule:
// 28672x4096 at M <= 16, 224 tiles on 264 slots), worker w walks its tile's k-blocks from w % k_iters,
// wrapping around, instead of all from k-block 0. Started together, the 224 CTAs would move in step,
// their 1792 row streams reading addresses one row block's codes apart at every moment; Stream-K's
// workers start at spread k-blocks by construction. H200, 2026-11-28 (item 92), lutmm_bench A/B,
// two rounds per call, 4-bit g128: 28672x4096 M = 1 27.8-28.1 -> 24.1-24.4 us, M = 4 26.0 -> 22.7-23.0;
// the loads-only kernel (ablation 79 vs 47) 26.0 -> 22.2 at M = 1; M = 16 (bound by its lookups and
// MMAs) 28.2 -> 28.4 in a first version. The sums of a tile run over its k-blocks from another start:
// same determinism, another rounding order. Not in the 32-token kernels (MT = 4): their two extra
// registers would spill, and M = 16 gained nothing. LUTMM_EXPERIMENT 34 (or ablation bit 32): in-step
// starts, as before.
// 4-bit row tiles (one tile per CTA) start spread too (tile t at iteration t % iterations) where they
// take kSpreadRowsMinIters iterations or more. H200, 2026-11-28 (item 92), two calls of two rounds,
// M = 1 unless noted, us, in-step -> spread: 4-bit g128 8192x8192 (256 tiles of 2 row blocks, 16
// iterations) 15.4-15.5 -> 14.5, M = 2 14.9-15.0 -> 14.5-14.6, 4096x14336 (14 iterations) 12.0-12.1 ->
// 12.1-12.3; but 3-bit 8192x8192 15.1-15.2 -> 15.4-15.5, 2-bit 13.2-13.5 -> 13.4-13.5, 2-bit
// 4096x14336 11.3-11.4 -> 11.4-11.6: so 2 and 3 bits keep in-step row tiles. (6144x4096, 4096x4096:
// 4 iterations, no rotation, yet 7.3 -> 7.3-7.4 and 5.9-6.0 -> 6.0-6.1 from the code.)
// LUTMM_EXPERIMENT 13: in-step 4-bit row tiles, as before.
constexpr bool kSpreadTiles = LUTMM_EXPERIMENT != 34 && !decode_ablation(32);
[[maybe_unused]] constexpr int kSpreadRowsMinIters = 8;
// Activation boxes of min(M, 8 * MT) token rows on tiles (item 96): the rows past M are left as the
// stage last held them (their output columns are never stored: an MMA's output column depends on its
// own token's column of the operand only). Boxes of 8 * MT rows, zero-filled past M by the copy, cost
// 28672x4096 M = 1 22.8 -> 19.8 us at 2 bits, 23.7 -> 21.0 at 4 bits (H200, 2026-11-28): it is the
// copy of the rows past the tensor's end, not X's bytes or its L2 lines (the evict_last hint gained
// nothing). M = 12 (16-token tiles) 4 bits 29.1 -> 26.7. The largest weights lose: 57344x8192 M = 1-4
// 2.0-2.3% at 4 and 3 bits (2 bits unchanged), 8192x28672 3 bits 1.5%, in three calls. Not from the
// kernel's work: under Nsight Compute's locked clocks the same 57344x8192 M = 1 call is 2.2% faster
// with these boxes (99.6 vs 101.8 us) at equal instruction counts and stall mix (item 97).
// LUTMM_EXPERIMENT 3: boxes of 8 * MT rows, as before.
constexpr bool kShortXBox = LUTMM_EXPERIMENT != 3;
// Row tiles of rpt = 2 or 4 row blocks keep boxes of rpt rows at M < rpt: boxes of M rows were
// slower, 8192x8192 M = 1 14.5 -> 15.85 us at 4 bits, 13.3 -> 14.7 at 2, M = 2 14.5 -> 16.05 (H200,
// 2026-11-28, two rounds; experiment 23, item 97), though ablation 104 had gained 14.5 -> 13.7 there.
// Token rows of a stage's activation box (the launch's tensor map uses the same).
template <int MT, bool ROWS>
__host__ __device__ __forceinline__ int x_box_rows(int64_t M, int rpt) {
  if (ROWS) return rpt;
  return kShortXBox && M < 8 * MT ? int(M) : 8 * MT;
}
// short_whole_tiles (lut_mma.cuh; 4 bits): whole tiles of p.tile_rows = 5-7 row blocks (boxes of that
// many rows, warps past them idle). At 2 and 3 bits the constant 8, so their kernels keep their code.
template <int BITS, typename P>
__device__ __forceinline__ int tile_rows(const P& p) { return short_whole_tiles(BITS) ? p.tile_rows : kWarps; }
template <int BITS, bool ROWS, int MT>
constexpr bool kSpread = ROWS ? BITS == 4 && LUTMM_EXPERIMENT != 13 : kSpreadTiles && MT <= 2;
// The first iteration of worker `worker`'s tile (0 unless kSpread: each worker one whole tile).
template <int BITS, bool ROWS, int MT, typename P>
__device__ __forceinline__ int kb_rotation(const P& p, int worker) {
  if constexpr (kSpread<BITS, ROWS, MT>)
    return p.cluster <= 1 && p.workers == p.tiles && (!ROWS || p.k_iters >= kSpreadRowsMinIters) ? worker % p.k_iters
                                                                                                   : 0;
  return 0;
}
// At 4 bits the row tiles come in the same two sizes, those for three CTAs per SM with the 32 KB table
// (KLayout): H100, 2026-11-27, M = 1, 6144x4096 on 384 tiles of one row block 9.4 -> 7.6 us back to
// back, 10.0 -> 9.3 after a PDL kernel (tiles sized for two, 192 of two, before). LUTMM_EXPERIMENT 31
// sizes every 4-bit row tile for two again.
template <int BITS>
constexpr bool kThreeCtaRows = BITS == 3 || (BITS == 4 && LUTMM_EXPERIMENT != 31);
// LUTMM_EXPERIMENT 33: 4-bit tiles of 8 row blocks (Stream-K, whole tiles) on three CTAs per SM too, with
// the 32 KB table. Slower on the H100 (item 59); H200, 2026-11-28 (item 89): 28672x4096 M = 1 27.9-28.1
// -> 26.9 us, but 57344x8192 76.0 -> 78.0-78.9 and 8192x8192 M = 16 17.9 -> 19.7.
template <int BITS, bool ROWS = false>
constexpr int kCtasPerSm = BITS == 3 && LUTMM_EXPERIMENT != 11 && (!ROWS || LUTMM_EXPERIMENT != 24) ? 3
                           : BITS == 4 && ROWS && LUTMM_EXPERIMENT != 31                          ? 3
                           : BITS == 4 && !ROWS && LUTMM_EXPERIMENT == 33                         ? 3
                                                                                                  : 2;
// CTAs per SM of the kernel for tiles of 8 row blocks of 8 * MT tokens: kCtasPerSm, but two for the
// 3-bit 32-token tiles (three per SM would leave 72 registers a thread; item 65).
template <int BITS, int MT>
constexpr int kCtasPerSmMt = BITS == 3 && MT == 4 ? 2 : kCtasPerSm<BITS>;
int ctas_per_sm_mt(int bits, int mt) {
  return with_bits(bits, [&](auto b) {
    constexpr int B = decltype(b)::value;
    return mt == 4 ? kCtasPerSmMt<B, 4> : kCtasPerSm<B>;
  });
}
// The kernel's table and stage layout: 128-byte table entries (32 KB) where 4-bit CTAs are sized for
// three per SM (64 KB would leave room for two). LUTMM_EXPERIMENT 32: the 32 KB table also on 4-bit
// tiles of 8 row blocks at two CTAs per SM, for the stages it frees (9 instead of 5 per CTA). H100,
// 2026-11-27: 28672x4096 M = 1 29.9 -> 30.8 us, 57344x8192 97.8 -> 100.6: not short of bytes in flight.
template <int BITS, int MT, bool ROWS, int CTAS>
using KLayout = Layout<BITS, MT, BITS == 4 && (CTAS == 3 || (!ROWS && kExp32))>;
template <int GROUPS>
constexpr int kComputeThreads = GROUPS * kThreads;
template <int GROUPS>
constexpr int kCtaThreads = kComputeThreads<GROUPS> + GROUPS * 32;  // + one producer warp per group
constexpr int kMaxStages = 32;

// 4-bit tiles of 8 row blocks of 16 tokens (M = 9-16) are computed by pairs of row blocks per warp
// (compute_pair, lut_mma.cuh, with the count that motivated it); the two warps of a pair add their
// halves at each segment's end through shared memory. H200, 2026-11-29 (item 100), lutmm_bench A/B,
// one call, three rounds, one row block per warp -> pairs, us: M = 16 57344x8192 102.4 -> 97.3,
// 8192x8192 18.1 -> 17.0, 4096x14336 17.0 -> 16.0, 8192x28672 52.4 -> 49.8, 6144x4096 10.2 -> 9.8,
// 28672x4096 (whole tiles of 7) 27.5 -> 27.0; in an earlier call also 10240x8192 21.9 -> 20.9 and
// M = 12 8192x8192 18.1 -> 16.6. On 8-token tiles (M <= 8) pairs moved -2% to +1%: 57344x8192 M = 1
// 73.9 -> 72.4 in one call, 76.3 -> 76.3 in the other, M = 8 -1.4% / -0.6%, 10240x8192 M = 1 -1.1%,
// 8192x28672 M = 4 -0.8%, but 28672x4096 (whole tiles of 7) M = 1 21.8 -> 22.1 and M = 8 +0.4%: not
// kept there (LUTMM_EXPERIMENT 4 puts them on 8-token tiles too). Not at 2 and 3 bits (a half's code
// words are not one load there: kPairsAllBits, experiment 23) nor on 32-token tiles (registers), nor in
// kernels sized for three CTAs per SM (72 registers). LUTMM_EXPERIMENT 30: no pairs.
template <int BITS, int MT, bool ROWS, int CTAS>
constexpr bool kPairRows = LUTMM_EXPERIMENT != 30 && !ROWS && CTAS <= 2 &&
                           ((BITS == 4 && (MT == 2 || (MT == 1 && LUTMM_EXPERIMENT == 4))) || (kPairsAllBits && MT == 2));
// Row tiles (ROWS: tiles of rpt < 8 row blocks, one per CTA; lut_tile_rows): the 8 warps' sums meet
// in shared memory, [warp][4][32 lanes] floats after the flags, per group; kPairRows: [warp][2][32
// lanes], two of a thread's sums at a time (4 KB would cost the 8-token tiles a pipeline stage).
template <bool ROWS, bool PAIRS = false>
constexpr int kRedBytes = ROWS ? kWarps * 4 * 32 * 4 : PAIRS ? kWarps * 2 * 32 * 4 : 0;
// GemmProblem::rms_norm's per-token factors, 16 tokens (32 with MT = 4) x kNormSlots floats per group
// (row_rms_factors).
template <int MT>
constexpr int kNormTokens = MT == 4 ? 32 : 16;
template <int MT, int GROUPS>
constexpr int kNormBytes = GROUPS * kNormTokens<MT> * kNormSlots * 4;
static_assert(kWarps <= kNormSlots, "row_rms_factors: one partial slot per warp of a worker");
// Shared memory: table | stages[GROUPS][S] | mbarriers full[S], empty[S] per group | flag per group |
// red per group (row tiles, pairs) | rs.
template <int BITS, int MT, bool ROWS, int CTAS, int GROUPS>
constexpr int smem_bytes(int stages) {
  using L = KLayout<BITS, MT, ROWS, CTAS>;
  return L::kLutBytes + GROUPS * stages * (L::kStageBytes + 16) + 16 + GROUPS * kRedBytes<ROWS, kPairRows<BITS, MT, ROWS, CTAS>> +
         kNormBytes<MT, GROUPS>;
}

#if LUTMM_SM90A
// The iteration of a tile that its kb-th one works on: (kb + rot) % k_iters (kb_rotation's rot).
template <int BITS, bool ROWS, int MT>
__device__ __forceinline__ int rotated_kb(int kb, int rot, int k_iters) {
  if constexpr (kSpread<BITS, ROWS, MT>) return kb + rot < k_iters ? kb + rot : kb + rot - k_iters;
  return kb;
}

// The three TMA descriptors a producer reads from (kernel parameters, __grid_constant__).
struct Maps {
  const CUtensorMap* w;  // codes: row blocks x (col_blocks * 256 * BITS / 4) 32-bit words, boxes of 8 x one block
                         // (row tiles: row blocks x col_blocks x one block, boxes of rpt x 8 / rpt x one block)
  const CUtensorMap* s;  // scales: row blocks x (G * 16) fp16, boxes of 8 x (16 * gpk) (row tiles: rpt x 8 / rpt k-blocks' groups)
  const CUtensorMap* x;  // activations: M x K, boxes of 8 * MT tokens x 160 columns (row tiles: rpt tokens)
};

// Issues the copies of one (tile, k-block) iteration into a stage (shared addresses), from the
// producer thread: with `weights`, the codes of the tile's 8 row blocks (one TMA box of 8 rows x
// 256 * BITS bytes; rows past the weight arrive as zeros) and their scales (one box of 8 rows x the
// k-block's gpk groups); with `acts`, the activations (one box of 8 * MT tokens x 160 columns: the
// k-block's 128 and 32 of the next, which land in the 64-byte row pad of kXRowBytes, so rows keep the
// conflict-free stride; tokens >= M and columns >= K arrive as zeros); with `expect`, first the
// stage's total bytes on its full barrier (whole boxes, zero-filled parts included).
// Row tiles (ROWS): iteration kb of the tile covers k-blocks [kb * 8 / rpt, (kb + 1) * 8 / rpt) of
// its rpt row blocks; one box of codes lands them row-major (block r * 8 / rpt + k), one of scales
// likewise, and 8 / rpt boxes of rpt tokens bring the activations ([k][token] rows of kXRowBytes).
// At rpt = 1 those boxes would start 320 bytes apart, but a tensor copy's destination must be
// 128-byte aligned (misaligned-address faults, H100): there one 3-D box brings the token's 8
// k-blocks densely, [k][128 columns] (x_rows_1d; K a multiple of 128, so no k-block runs past a row).
// with_x = false (ablation 40 + 64 only): the stage brings no activations at all (neither expected nor
// copied; the compute warps read whatever the stage held).
template <int BITS, int MT, typename T, bool ROWS>
__device__ __forceinline__ void issue_stage(const Params<T>& p, const Maps& maps, uint32_t stage, uint32_t full, int tile,
                                            int kb, int m0, bool weights, bool acts, bool expect, bool with_x = true) {
  using L = Layout<BITS, MT>;
  static_assert(kXRowBytes == 160 * 2, "activation boxes fill whole padded rows");
  const int gpk = groups_per_kblock(p.gl);  // scale groups per k-block (box width)
  const int x_bytes = !with_x ? 0
                      : ROWS ? (p.rpt == 1 ? kWarps * kBlockCols * 2 : L::kStageX)  // 8 token rows in all
                             : x_box_rows<MT, ROWS>(p.M, kWarps) * kXRowBytes;      // one box
  acts = acts && with_x;
  const int boxes = ROWS ? kWarps : tile_rows<BITS>(p);  // blocks of codes and scales per stage
  if (expect) wg::mbar_arrive_expect_tx(full, uint32_t(boxes * (L::kBlockBytes + 32 * gpk) + x_bytes));
  if constexpr (ROWS) {
    const int rpt = p.rpt, kpt = kWarps / rpt, kb0 = kb * kpt;
    if (weights) {
      wg::tma_load_3d(stage, maps.w, 0, kb0, tile * rpt, full);
      wg::tma_load_2d(stage + L::kStageW, maps.s, kb0 * gpk * 16, tile * rpt, full);
    }
    if (acts) {
      if (rpt == 1) {
        wg::tma_load_3d(stage + L::kStageW + L::kStageS, maps.x, 0, kb0, m0, full);
      } else {
        for (int k = 0; k < kpt; ++k)
          wg::tma_load_2d(stage + L::kStageW + L::kStageS + uint32_t(k * rpt * kXRowBytes), maps.x,
                          (kb0 + k) * kBlockCols, m0, full);
      }
    }
  } else {
    if (weights) {
      wg::tma_load_2d(stage, maps.w, kb * (L::kBlockBytes / 4), tile * boxes, full);
      wg::tma_load_2d(stage + L::kStageW, maps.s, ((kb * 4) >> p.gl) * 16, tile * boxes, full);
    }
    if (acts) wg::tma_load_2d(stage + L::kStageW + L::kStageS, maps.x, kb * kBlockCols, m0, full);
  }
}

// The producer (one thread): iteration q of the CTA's range goes to stage q % S, after the compute
// warps have released that stage's previous use.
// part 0: the prologue; part 1: the rest (the producer warp's norm factor, kProducerNorm, runs between
// them); part 2: both.
// rot: kb_rotation (iteration kb of a tile loads k-block (kb + rot) % k_iters).
template <int BITS, int MT, typename T, bool ROWS>
__device__ __forceinline__ void produce(const Params<T>& p, const Maps& maps, int it_begin, int it_end, int m0,
                                        uint32_t stage0, uint32_t bars, int part = 2, int rot = 0) {
  using L = Layout<BITS, MT>;
  const int S = p.stages, n = it_end - it_begin, n0 = min(S, n);
  const int tile0 = it_begin / p.k_iters, kb0 = it_begin % p.k_iters;
  // Prologue: codes and scales of the first n0 iterations (constant for the kernel's life, so they
  // may be read before the previous kernel ends), then, after griddepcontrol.wait, their activations.
  for (int pass = 0; pass < 2 && part != 1; ++pass) {
    if (pass == 1) grid_dependency_wait();
    int tile = tile0, kb = kb0;
    for (int q = 0; q < n0; ++q) {
      issue_stage<BITS, MT, T, ROWS>(p, maps, stage0 + uint32_t(q) * L::kStageBytes, bars + 8 * q, tile,
                                     rotated_kb<BITS, ROWS, MT>(kb, rot, p.k_iters), m0, pass == 0, pass == 1, pass == 0);
      if (++kb == p.k_iters) { kb = 0; ++tile; }
    }
  }
  if (part == 0) return;
  int tile = tile0 + (kb0 + n0) / p.k_iters, kb = (kb0 + n0) % p.k_iters;
  int st = 0, use = 1;  // stage of iteration q and how often it was filled before
  for (int q = n0; q < n; ++q) {
    wg::mbar_wait(bars + 8 * (S + st), (use - 1) & 1);  // released by all compute warps
    // (Ablation 40 + 64: activations in the prologue's stages only, so later stages reuse theirs.)
    issue_stage<BITS, MT, T, ROWS>(p, maps, stage0 + uint32_t(st) * L::kStageBytes, bars + 8 * st, tile,
                                   rotated_kb<BITS, ROWS, MT>(kb, rot, p.k_iters), m0, true, true, true,
                                   !decode_ablation(64));
    if (++kb == p.k_iters) { kb = 0; ++tile; }
    if (++st == S) { st = 0; ++use; }
  }
}
#endif  // LUTMM_SM90A

// CTAS: CTAs per SM the kernel is sized for (registers here, shared memory at the launch); GROUPS:
// workers (warp groups) per CTA, 1 or 2 (2 with CTAS = 1: the same registers per thread as two CTAs).
template <int BITS, int MT, typename T, bool ROWS, int CTAS = kCtasPerSm<BITS, ROWS>, int GROUPS = 1>
__global__ void __launch_bounds__(kCtaThreads<GROUPS>, CTAS)
lut_stream_kernel(const Params<T> p, const __grid_constant__ CUtensorMap tm_w, const __grid_constant__ CUtensorMap tm_s,
                  const __grid_constant__ CUtensorMap tm_x) {
  static_assert(!ROWS || (MT == 1 && GROUPS == 1), "row tiles: one token row per k-block, one worker per CTA");
#if LUTMM_SM90A
  using L = KLayout<BITS, MT, ROWS, CTAS>;
  extern __shared__ __align__(16) uint8_t smem[];
  check_table_addr(smem);  // the table first, at shared address kTableAddr: lookups add no base
  // The table's shared address: kTableAddr, plus the CTA's rank << 24 in a cluster launch (H100: an
  // address without it reaches rank 0's memory or faults; docs/performance-log.md item 31).
  const uint32_t smem_base = smem_addr(smem);
  const int S = p.stages;  // per group
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const bool producer = warp >= GROUPS * kWarps;
  const int group = producer ? warp - GROUPS * kWarps : warp / kWarps;
  const uint32_t ring = uint32_t(group * S) * L::kStageBytes;          // this group's stages
  uint8_t* stages = smem + L::kLutBytes + ring;
  const uint32_t stage0 = smem_base + L::kLutBytes + ring;
  const uint32_t bars = smem_base + L::kLutBytes + uint32_t(GROUPS * S) * L::kStageBytes + 16 * S * group;  // full[S], empty[S]
  int* flag = reinterpret_cast<int*>(smem + L::kLutBytes + GROUPS * S * (L::kStageBytes + 16)) + group;
  constexpr bool kPairs = kPairRows<BITS, MT, ROWS, CTAS>;
  constexpr int kRedFloats = kRedBytes<ROWS, kPairs> / 4;  // per group
  float* red0 = reinterpret_cast<float*>(smem + L::kLutBytes + GROUPS * S * (L::kStageBytes + 16) + 16);  // ROWS, kPairs
  float* red = red0 + (GROUPS > 1 ? kRedFloats * group : 0);                              // this group's
  float* rs = red0 + GROUPS * kRedFloats + kNormTokens<MT> * kNormSlots * group;  // rms_norm factors of this group's tokens

  const int worker = blockIdx.x * GROUPS + group;
  const int64_t total = int64_t(p.tiles) * p.k_iters;  // < 2^31 (checked on the host)
  const bool active = worker < p.workers;
  // Stream-K's even ranges, or in a cluster launch rank r's share of tile worker / C (cluster_start).
  const int64_t b0 = p.cluster > 1 ? cluster_start(worker, p.k_iters, p.cluster) : sk_start(worker, total, p.workers);
  const int64_t b1 = p.cluster > 1 ? cluster_start(worker + 1, p.k_iters, p.cluster) : sk_start(worker + 1, total, p.workers);
  const int it_begin = active ? int(b0) : 0;
  const int it_end = active ? int(b1) : 0;
  const int m0 = blockIdx.y * 8 * MT;
  const int kb_rot = kb_rotation<BITS, ROWS, MT>(p, worker);  // the tile's first iteration (spread starts)
#if LUTMM_TIMELINE
  const bool tl_thread = active && !producer && warp % kWarps == 0 && lane == 0;  // records the group's timeline
  const int tl_slot = p.timeline_slot;
#else
  constexpr bool tl_thread = false;
  constexpr int tl_slot = 0;
#endif
  if (tl_thread) timeline_mark(tl_slot, worker, kTlEntry);

  if (threadIdx.x == 0) {
    for (int i = 0; i < GROUPS * S; ++i) {  // group-major: full[S], empty[S] of group 0, then group 1
      const uint32_t b = smem_base + L::kLutBytes + uint32_t(GROUPS * S) * L::kStageBytes + 16 * S * (i / S);
      wg::mbar_init(b + 8 * (i % S), 1);            // the producer's arrive.expect_tx
      wg::mbar_init(b + 8 * (S + i % S), kWarps);   // one arrival per compute warp of the group
    }
    wg::mbar_init_fence();
  }
  __syncthreads();
  // A single token's norm factor, in kernels sized for three CTAs per SM: from the producer warp
  // (warp_rms_factor, item 63), between its prologue and its loop. The compute warps wait for it at their
  // first segment end (no registers: item 62's deferral spilled there). Kernels sized for one or two CTAs
  // take item 62's deferral instead: the producer's reduction delays its first refill, which cost them
  // more than it saved (H100, 2026-11-27, same call, M = 1 with the norm: 28672x4096 4-bit 29.4 -> 30.2
  // us, 4096x4096 6.6 -> 7.2, 8192x8192 18.0 -> 19.3; three CTAs per SM: 6144x4096 4-bit 9.3 -> 8.5,
  // 3-bit 9.1 -> 7.8).
  constexpr bool kProducerNorm = CTAS >= 3 && MT == 1;
  const bool norm_by_producer = kProducerNorm && p.rms_norm && p.M - m0 == 1;
  const int norm_bar = 4 + group, norm_threads = kThreads + 32;  // the group's compute warps + its producer
  if (producer) {
    if (norm_by_producer && active) {  // the prologue, the factor (all 32 lanes), then the loop
      if (lane == 0)
        produce<BITS, MT, T, ROWS>(p, Maps{&tm_w, &tm_s, &tm_x}, it_begin, it_end, m0, stage0, bars, 0, kb_rot);
      __syncwarp();
      warp_rms_factor(p, p.x, m0, 8 * MT, rs, lane);
      __syncwarp();
      wg::named_arrive(norm_bar, norm_threads);
      if (lane == 0)
        produce<BITS, MT, T, ROWS>(p, Maps{&tm_w, &tm_s, &tm_x}, it_begin, it_end, m0, stage0, bars, 1, kb_rot);
    } else if (lane == 0 && active) {
      produce<BITS, MT, T, ROWS>(p, Maps{&tm_w, &tm_s, &tm_x}, it_begin, it_end, m0, stage0, bars, 2, kb_rot);
    }
    if (p.cluster > 1) {  // the two cluster barriers of cluster_finish
      wg::cluster_sync();
      wg::cluster_sync();
    }
    return;
  }

  // Compute warps.
  if constexpr (kLutSource<BITS> == LutSource::kShared)
    build_table<BITS, L::kEntryBytes, kComputeThreads<GROUPS>, T>(smem, p.table);
  wg::named_sync(1, kComputeThreads<GROUPS>);
  if (!active) return;
  grid_dependency_wait();    // outputs and the workspace are written only after the previous kernel
  grid_dependents_launch();  // the next kernel may start its prologue as our CTAs finish
  if (tl_thread) timeline_mark(tl_slot, worker, kTlDepWait);

  const int gwarp = warp % kWarps;  // block of a stage: row block of the tile (row tiles: see warp_row)
  // A single token's norm factor is deferred past the first segment (rms_defer_issue, item 62) or comes
  // from the producer warp (kProducerNorm); otherwise each token's factor is read here, while the
  // producer's first stages are in flight.
  constexpr int kDeferVecs = CTAS <= 2 && MT == 1 ? 2 : 0;
  RmsDeferred<kDeferVecs> rdef = rms_defer_issue<kDeferVecs>(p, p.x, m0, int(threadIdx.x % kThreads), kThreads);
  bool norm_pending = norm_by_producer;  // the producer warp's factor, not yet waited for
  if (p.rms_norm && !rdef.on && !norm_by_producer) {
    row_rms_factors(p, p.x, m0, 8 * MT, rs, int(threadIdx.x % kThreads), kThreads,
                    [group] { wg::named_sync(2 + group, kThreads); });
    wg::named_sync(2 + group, kThreads);
  }
  const int rpt = ROWS ? p.rpt : kWarps, kpt = kWarps / rpt;  // row blocks per tile, k-blocks per iteration
  const int trows = ROWS ? rpt : tile_rows<BITS>(p);           // row blocks per tile for the output rows
  const int w_row = ROWS ? gwarp / kpt : gwarp, w_ksub = ROWS ? gwarp % kpt : 0;
  const int s_stride = 32 * groups_per_kblock(p.gl);  // scale bytes per block in a stage (the TMA box row)
  LaneOffsets off = LaneOffsets::make<BITS, MT>(s_stride, smem_base, rpt, w_ksub);
  if (ROWS && rpt == 1)  // the dense [k][128 columns] activations (issue_stage): every lane reads token 0
    off.x = uint32_t(L::kStageW + L::kStageS + w_ksub * kBlockCols * 2 + 16 * (lane % 4));
  const int half = gwarp & 1, pair_row = gwarp & ~1;  // kPairs: chunks 2 half, 2 half + 1 of row blocks pair_row, + 1
  if (kPairs) {
    off.codes -= uint32_t(half * L::kBlockBytes);
    if (BITS == 3) off.hi -= uint32_t(half * L::kBlockBytes);  // (elsewhere unused)
    off.scales -= uint32_t(half * s_stride);
  }
  float acc[MT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) acc[mt][0] = acc[mt][1] = acc[mt][2] = acc[mt][3] = 0.f;
  float acc2[kPairs ? 2 : 1][MT][4];  // kPairs: row blocks pair_row + r, this warp's half of each k-block
#pragma unroll
  for (int r = 0; r < (kPairs ? 2 : 1); ++r)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) acc2[r][mt][0] = acc2[r][mt][1] = acc2[r][mt][2] = acc2[r][mt][3] = 0.f;
  // Segment by segment (the iterations of one tile), so the inner loop over k-blocks carries no
  // segment-end test, and k-blocks with 4 whole chunks and groups >= 128 (all but a partial last one)
  // take compute_block's FULL path.
  const int full_kbs = p.gl >= 2 ? p.K / kBlockCols : 0;  // k-blocks [0, full_kbs) are FULL
  int tile = it_begin / p.k_iters, kb0 = it_begin % p.k_iters;
  // The current stage and its full barrier as running addresses (advanced, not recomputed from the
  // stage index: a few instructions per block off the chain); its empty barrier is S barriers on.
  uint32_t stage_off = uint32_t(stages - smem);  // the current stage: smem + stage_off
  uint32_t full = bars, phase = 0;
  const uint32_t empty_off = 8 * S;
  uint32_t ring_base = stage_off;                      // as stages, bars, bars + 8 S: copies the
  uint32_t ring_bars = bars, ring_end = bars + 8 * S;  // compiler cannot rederive (see the loop)
  const int kb_last = p.k_iters - 1 - kb_rot;  // the iteration on the tile's last k-block(s)
  if (tl_thread && it_begin < it_end) {  // the first stage's arrival (waited for again in the loop)
    wg::mbar_wait(bars, 0);
    timeline_mark(tl_slot, worker, kTlFirstData);
  }
  for (int seg_begin = it_begin; seg_begin < it_end; ++tile, kb0 = 0) {
    const int seg_end = min(it_end, seg_begin + p.k_iters - kb0);
    const bool warp_live = (ROWS || !short_whole_tiles(BITS) || w_row < trows) && tile * trows + w_row < p.row_blocks;
    // kPairs: the pair computes while its first row block is live, and its second where the tile has it
    // (whole tiles of 7: not the last pair's); one past the weight's rows reads zeros, never stored.
    const bool pair_live = (!short_whole_tiles(BITS) || pair_row < trows) && tile * trows + pair_row < p.row_blocks;
    const bool pair_two = !short_whole_tiles(BITS) || pair_row + 1 < trows;
    int seg_last = seg_end;
    for (int kb = kb0, it = seg_begin; it < seg_last; ++it, ++kb) {
      // Loop-carried as far as the compiler knows, so ptxas keeps these in registers instead of
      // rederiving them from threadIdx and the stage count in every iteration (it did: ~20 of ~105
      // instructions per warp and 2-bit block). H100, 2026-11-26, A/B in one call: 3-bit M = 1
      // 57344x8192 101.7 -> 95.8 us, 8192x8192 20.1 -> 19.5; 2 and 4 bits within 1%.
      asm volatile("" : "+r"(off.codes), "+r"(off.hi), "+r"(off.scales), "+r"(off.x), "+r"(off.lane_byte));
      asm volatile("" : "+r"(ring_base), "+r"(ring_bars), "+r"(ring_end), "+r"(seg_last));
      // (Two whole k-blocks per pass, both stages waited for first, so ptxas could interleave one block's
      // lookups with the other's MMAs, which it did: H200, 2026-11-28, A/B twice in one call, 4 bits,
      // 57344x8192 M = 1 75.8 -> 79.0 us, M = 16 98.5 -> 110.8, 28672x4096 27.9 -> 28.5; not kept, item 88.)
      wg::mbar_wait(full, phase);
      const uint8_t* stage = smem + stage_off;
      // This warp's k-block, as far as the loop needs it: in the tile's last iteration (kb_last under
      // spread starts), the true one, which may be partial or (row tiles) past the weight; elsewhere any
      // whole one (compute_block reads kb only to count a partial block's chunks): one compare per
      // block instead of the rotation.
      const int wkb = (kb == kb_last ? p.k_iters - 1 : 0) * (ROWS ? kpt : 1) + w_ksub;
      if constexpr (kPairs) {
        if (pair_live && pair_two) {
          if (wkb < full_kbs) compute_pair<BITS, MT, T, true, true, L::kEntryBytes>(p, stage, off, wkb, half, s_stride, acc2);
          else compute_pair<BITS, MT, T, false, true, L::kEntryBytes>(p, stage, off, wkb, half, s_stride, acc2);
        } else if (pair_live) {
          if (wkb < full_kbs) compute_pair<BITS, MT, T, true, false, L::kEntryBytes>(p, stage, off, wkb, half, s_stride, acc2);
          else compute_pair<BITS, MT, T, false, false, L::kEntryBytes>(p, stage, off, wkb, half, s_stride, acc2);
        }
      } else if (warp_live && (!ROWS || wkb < p.col_blocks)) {
        if (wkb < full_kbs) compute_block<BITS, MT, T, true, L::kEntryBytes>(p, stage, off, wkb, acc);
        else compute_block<BITS, MT, T, false, L::kEntryBytes>(p, stage, off, wkb, acc);
      }
      __syncwarp();
      if (lane == 0) wg::mbar_arrive(full + empty_off);  // this warp is done with the stage
      full += 8;
      stage_off += L::kStageBytes;
      if (full == ring_end) { full = ring_bars; stage_off = ring_base; phase ^= 1; }
    }
    if (tl_thread) timeline_mark(tl_slot, worker, kTlLoopEnd);  // the last segment's is kept
    const int bar = 2 + group;
    if (rdef.on) {  // the first segment end: the deferred factor (uniform over the group)
      rms_defer_finish(p, rdef, rs, 8 * MT, int(threadIdx.x % kThreads), kThreads, [bar] { wg::named_sync(bar, kThreads); });
      wg::named_sync(bar, kThreads);
      rdef.on = false;
    }
    if (norm_pending) {  // the first segment end: the producer warp's factor (warp_rms_factor)
      wg::named_sync(norm_bar, norm_threads);
      norm_pending = false;
    }
    if constexpr (kPairs) {  // row block gwarp = its own half + the partner's, two sums at a time
      const int pbar = 8 + 4 * group + gwarp / 2;  // the pair's named barrier (64 threads)
#pragma unroll
      for (int q = 0; q < 2 * MT; ++q) {
        const int mt = q / 2, e0 = 2 * (q % 2);
#pragma unroll
        for (int i = 0; i < 2; ++i)  // the partner's row block, this warp's half
          red[((gwarp ^ 1) * 2 + i) * 32 + lane] = half ? acc2[0][mt][e0 + i] : acc2[1][mt][e0 + i];
        wg::named_sync(pbar, 64);
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          acc[mt][e0 + i] = (half ? acc2[1][mt][e0 + i] : acc2[0][mt][e0 + i]) + red[(gwarp * 2 + i) * 32 + lane];
          acc2[0][mt][e0 + i] = acc2[1][mt][e0 + i] = 0.f;
        }
        wg::named_sync(pbar, 64);  // red is free again
      }
    }
    if (p.rms_norm) scale_by_rows<MT>(acc, rs);
    bool store_live = warp_live;
    if constexpr (ROWS) {  // warp r < rpt adds the sums of row block r's kpt warps, in k order
      const float* mine = &acc[0][0];
#pragma unroll
      for (int e = 0; e < 4; ++e) red[(gwarp * 4 + e) * 32 + lane] = mine[e];
      wg::named_sync(bar, kThreads);
      if (gwarp < rpt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float sum = 0.f;
          for (int k = 0; k < kpt; ++k) sum += red[((gwarp * kpt + k) * 4 + e) * 32 + lane];
          acc[0][e] = sum;
        }
      wg::named_sync(bar, kThreads);  // red is free again
      store_live = gwarp < rpt && tile * rpt + gwarp < p.row_blocks;
    }
    finish_segment<MT>(p, worker, tile, m0, seg_begin, seg_end - 1, it_begin, store_live, flag, acc,
                       reinterpret_cast<const float*>(stages), [bar] { wg::named_sync(bar, kThreads); }, trows);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) acc[mt][0] = acc[mt][1] = acc[mt][2] = acc[mt][3] = 0.f;
    seg_begin = seg_end;
  }
  if (tl_thread) timeline_mark(tl_slot, worker, kTlExit);
#endif
}

// Stages per group that fit beside the table.
template <int BITS, int MT, bool ROWS, int CTAS, int GROUPS = 1>
int stages_for(int budget_bytes) {
  using L = KLayout<BITS, MT, ROWS, CTAS>;
  const int s = (budget_bytes - L::kLutBytes - 16 - GROUPS * kRedBytes<ROWS, kPairRows<BITS, MT, ROWS, CTAS>> - kNormBytes<MT, GROUPS>) /
                (GROUPS * (L::kStageBytes + 16));
  return std::max(2, std::min(kMaxStages, s));
}

// Dynamic shared memory per CTA when `ctas` CTAs share an SM.
int smem_budget(int device, int ctas) {
  if (ctas < 1 || ctas > 3) throw Error("internal: 1-3 CTAs per SM, got " + std::to_string(ctas));
  static PerDevice<std::array<int, 4>> cache;  // [ctas]
  return cache.get(device, [&] {
    int optin = 0, per_sm = 0;
    check_cuda(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), "cudaDeviceGetAttribute");
    check_cuda(cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device),
               "cudaDeviceGetAttribute");
    std::array<int, 4> b{};
    for (int c = 1; c <= 3; ++c) b[c] = std::min(optin, per_sm / c - 1024);  // 1 KB per CTA is the system's
    return b;
  })[ctas];
}

template <int BITS, int MT, typename T, bool ROWS, int CTAS = kCtasPerSm<BITS, ROWS>, int GROUPS = 1>
void launch_kernel(const GemmProblem& prob, const Geometry& geo, void* ws, cudaStream_t stream) {
  auto* kernel = &lut_stream_kernel<BITS, MT, T, ROWS, CTAS, GROUPS>;
  const int dev = geo.device;
  allow_dynamic_smem(reinterpret_cast<const void*>(kernel), smem_budget(dev, CTAS), dev);
  const Shape& s = prob.shape;
  const int rpt = geo.rpt, kpt = kWarps / rpt;
  const CUtensorMap tm_w = ROWS ? codes_tensor_map_3d<BITS>(prob, rpt, kpt)
                                : codes_tensor_map<BITS>(prob, geo.tile_rows, Layout<BITS, MT>::kBlockBytes / 4);  // one block
  const CUtensorMap tm_s = ROWS ? scales_tensor_map(prob, rpt, kpt) : scales_tensor_map(prob, geo.tile_rows);
  const CUtensorMapDataType xt = prob.dtype == DType::F16 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  const CUtensorMap tm_x = ROWS && rpt == 1 ? x_rows_1d(prob.x, xt, prob.M, s.K)
                                            : tensor_map_2d(prob.x, xt, prob.M, s.K, s.K * 2, x_box_rows<MT, ROWS>(prob.M, rpt),
                                                            kXRowBytes / 2, CU_TENSOR_MAP_SWIZZLE_NONE, "x");
  if (geo.cluster > 1 && GROUPS != 1) throw Error("internal: clusters need one warp group per CTA");
  if (geo.cluster > 1 && cluster_xbuf_bytes(geo.cluster, MT) > geo.stages * Layout<BITS, MT>::kStageBytes)
    throw Error("internal: the cluster exchange buffer does not fit the pipeline stages");
  Params<T> params = make_params<T>(prob, geo, ws);
#if LUTMM_TIMELINE
  params.timeline_slot = g_timeline_launches++ % kTimelineSlots;
#endif
  launch_pdl(kernel, dim3((geo.grid_x + GROUPS - 1) / GROUPS, geo.grid_y), kCtaThreads<GROUPS>,
             smem_bytes<BITS, MT, ROWS, CTAS, GROUPS>(geo.stages), stream, dev, geo.cluster, params, tm_w, tm_s, tm_x);
}
template <int BITS, int MT, typename T>
void launch(const GemmProblem& prob, const Geometry& geo, void* ws, cudaStream_t stream) {
  if (geo.groups != 1) {  // one CTA per SM of two groups (lut_two_group_ctas): 4-bit 8-token tiles of 8 only
    if constexpr (BITS == 4 && MT == 1)
      if (geo.groups == 2 && geo.rpt == kWarps && geo.cluster == 1 && geo.ctas == 1 && geo.tile_rows == kWarps)
        return launch_kernel<BITS, MT, T, false, 1, 2>(prob, geo, ws, stream);
    throw Error("internal: two warp groups per CTA serve 4-bit 8-token tiles of 8 row blocks on one CTA per SM only");
  }
  if constexpr (MT == 1) {
    if (geo.rpt < kWarps) {
      if (geo.ctas != kCtasPerSm<BITS, true> && !(kThreeCtaRows<BITS> && geo.ctas == 2))
        throw Error("internal: row tiles sized for " + std::to_string(geo.ctas) + " CTAs per SM");
      if constexpr (kThreeCtaRows<BITS> && kCtasPerSm<BITS, true> != 2)
        if (geo.ctas == 2) return launch_kernel<BITS, MT, T, true, 2>(prob, geo, ws, stream);
      return launch_kernel<BITS, MT, T, true>(prob, geo, ws, stream);
    }
  }
  if (geo.rpt != kWarps) throw Error("internal: row tiles need M <= 8");
  if constexpr (kCtasPerSmMt<BITS, MT> != kCtasPerSm<BITS>) {  // 3-bit 32-token tiles: only sized for two
    if (geo.ctas != 0 && geo.ctas != kCtasPerSmMt<BITS, MT>)
      throw Error("internal: 3-bit 32-token tiles are sized for two CTAs per SM");
    launch_kernel<BITS, MT, T, false, kCtasPerSmMt<BITS, MT>>(prob, geo, ws, stream);
  } else {
    if constexpr (BITS == 3 && kCtasPerSm<BITS> != 2)  // sized for two (lut_tiles8_tma3)
      if (geo.ctas == 2) return launch_kernel<BITS, MT, T, false, 2>(prob, geo, ws, stream);
    if (geo.ctas != 0 && geo.ctas != kCtasPerSm<BITS>)
      throw Error("internal: tiles of 8 row blocks sized for " + std::to_string(geo.ctas) + " CTAs per SM");
    launch_kernel<BITS, MT, T, false>(prob, geo, ws, stream);
  }
}

template <typename T, int MT>
void launch_bits(const GemmProblem& prob, const Geometry& geo, void* ws, cudaStream_t st) {
  with_bits(prob.shape.bits, [&](auto b) { launch<decltype(b)::value, MT, T>(prob, geo, ws, st); });
}

// Clusters of 2..8 CTAs of the tiles-of-8 kernel <B, MT, CTAS> that fit `device` at once, cached per
// instantiation and device (fp16 has the same resources as bf16: threads, shared memory budget).
template <int B, int MT, int CTAS>
std::array<int, 9> clusters_that_fit(int device) {
  static PerDevice<std::array<int, 9>> cache;
  return cache.get(device, [&] {
    const int smem = smem_budget(device, CTAS);
    auto* k = &lut_stream_kernel<B, MT, __nv_bfloat16, false, CTAS>;
    allow_dynamic_smem(reinterpret_cast<const void*>(k), smem, device);
    return max_clusters(k, kCtaThreads<1>, smem, device);
  });
}

}  // namespace

bool stream_supported(int device) { return wgmma_supported(device); }  // same requirement: sm_90 + sm_90a code

int stream_workers_per_sm(int bits, int mt, bool rows) {
  return rows ? with_bits(bits, [](auto b) { return kCtasPerSm<decltype(b)::value, true>; }) : ctas_per_sm_mt(bits, mt);
}

std::array<int, 9> stream_max_clusters(int bits, int mt, int device) {
  // MT = 2 has the same resources as MT = 1, and so does MT = 4 but at 3 bits (two CTAs per SM)
  return with_bits(bits, [&](auto b) {
    constexpr int B = decltype(b)::value;
    if constexpr (kCtasPerSmMt<B, 4> != kCtasPerSm<B>)
      if (mt == 4) return clusters_that_fit<B, 4, kCtasPerSmMt<B, 4>>(device);
    return clusters_that_fit<B, 1, kCtasPerSm<B>>(device);
  });
}

int stream_stages(int bits, int mt, int device, int ctas, bool rows, int groups) {
  if (groups != 1 && (groups != 2 || ctas != 1 || mt != 1 || rows))
    throw Error("internal: two warp groups per CTA need one CTA per SM, 8-token tiles and no row tiles");
  return with_bits(bits, [&](auto b) {
    constexpr int B = decltype(b)::value;
    if (groups == 2) return stages_for<B, 1, false, 1, 2>(smem_budget(device, 1));
    const int c = ctas ? ctas : rows ? kCtasPerSm<B, true> : ctas_per_sm_mt(B, mt);
    const int budget = smem_budget(device, c);
    if (mt == 1 && rows) return c == 3 ? stages_for<B, 1, true, 3>(budget) : stages_for<B, 1, true, 2>(budget);
    if (mt == 1) return c == 3 ? stages_for<B, 1, false, 3>(budget) : stages_for<B, 1, false, 2>(budget);
    if (mt == 2) return c == 3 ? stages_for<B, 2, false, 3>(budget) : stages_for<B, 2, false, 2>(budget);
    return c == 3 ? stages_for<B, 4, false, 3>(budget) : stages_for<B, 4, false, 2>(budget);
  });
}

void stream_launch(const GemmProblem& prob, const Geometry& geo, void* ws, cudaStream_t stream) {
  if (8 * geo.mt > kTmaMaxM) throw Error("internal: the TMA decode kernel serves M <= " + std::to_string(kTmaMaxM));
  const bool f16 = prob.dtype == DType::F16;
  if (geo.mt == 1) f16 ? launch_bits<__half, 1>(prob, geo, ws, stream) : launch_bits<__nv_bfloat16, 1>(prob, geo, ws, stream);
  else if (geo.mt == 2) f16 ? launch_bits<__half, 2>(prob, geo, ws, stream) : launch_bits<__nv_bfloat16, 2>(prob, geo, ws, stream);
  else if constexpr (kTmaMaxM >= 32)
    f16 ? launch_bits<__half, 4>(prob, geo, ws, stream) : launch_bits<__nv_bfloat16, 4>(prob, geo, ws, stream);
}

}  // namespace lut

int decode_timeline(uint64_t* out, int max_workers, int back) {
#if LUTMM_TIMELINE
  if (back < 0 || back >= lut::kTimelineSlots || lut::g_timeline_launches <= back || max_workers <= 0) return 0;
  const int slot = (lut::g_timeline_launches - 1 - back) % lut::kTimelineSlots;
  const int rows = std::min(max_workers, lut::kTimelineWorkers);
  constexpr size_t kRowBytes = sizeof(uint64_t) * lut::kTlEvents;
  check_cuda(cudaMemcpyFromSymbol(out, lut::g_timeline, rows * kRowBytes, size_t(slot) * lut::kTimelineWorkers * kRowBytes),
             "cudaMemcpyFromSymbol (timeline)");
  return rows;
#else
  (void)out; (void)max_workers; (void)back;
  return 0;
#endif
}

void decode_timeline_clear() {
#if LUTMM_TIMELINE
  void* a = nullptr;
  check_cuda(cudaGetSymbolAddress(&a, lut::g_timeline), "cudaGetSymbolAddress (timeline)");
  check_cuda(cudaMemset(a, 0, sizeof(lut::g_timeline)), "cudaMemset (timeline)");
#endif
}

}  // namespace gpu
}  // namespace lutmm
