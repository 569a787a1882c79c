// Work splits of the GPU kernels: how the (tile, k-block) iterations go to CTAs, and for the wgmma
// prefill kernel (src/cuda/lut_wgmma.cu) also the tile width and CTAs per SM. Pure logic on a few
// device limits, so the rules are tested on the CPU (tests/cpp/test_plan.cpp) as well as timed on
// the GPU; the Stream-K range arithmetic is shared with the kernels.
//
// Three ways to hand out a GEMM's (tile, k-block) iterations, here 3 tiles of 8 k-blocks:
//
//   Stream-K,       tile 0: c0 c0 c0 c0 c0 c1 c1 c1 | tile 1: c1 c1 c2 c2 c2 c2 c2 c3 | tile 2: c3 c3 c3 c3 c4 c4 c4 c4
//   5 CTAs          even ranges over all CTAs: a CTA may end mid-tile and go on in the next; every
//                   piece of a tile is an fp32 partial in global memory, summed by its last arriver.
//   tile-aligned,   tile 0: c0 c0 c0 c0 c1 c1 c1 c1 | tile 1: c2 c2 c2 c2 c3 c3 c3 c3 | tile 2: c4 ... c5
//   C = 2           the same even ranges over tiles x C CTAs, C dividing the k-blocks: one partial per
//                   CTA, none mid-range (decode kernels: lut_workers; wgmma: WgPlan::aligned).
//   clusters,       tile 0: r0 r0 r0 r0 r1 r1 r1 r1 | tile 1: r0 r0 r0 r0 r1 r1 r1 r1 | tile 2: r0 ... r1
//   C = 2           a thread-block cluster per tile, rank r on its share of the k-blocks; the partial
//                   sums meet in distributed shared memory, not global memory (WgPlan::split;
//                   decode kernels: LutSplit::cluster).
//
// Data-parallel waves (whole tiles per CTA) come first wherever the tiles fill the SMs.
#pragma once
#include <cstdint>

#include "lutmm/format.h"

#if defined(__CUDACC__)
#define LUTMM_HD __host__ __device__ __forceinline__
#else
#define LUTMM_HD inline
#endif

namespace lutmm {
namespace gpu {

// Even split of `total` iterations over `grid` workers: worker c gets [sk_start(c), sk_start(c + 1)).
LUTMM_HD int64_t sk_start(int64_t c, int64_t total, int64_t grid) {
  const int64_t base = total / grid, rem = total % grid;
  return c * base + (c < rem ? c : rem);
}
// First iteration of worker w in a plan of clusters of c workers per tile (LutSplit::cluster): rank
// r = w % c takes k-blocks [r CB / c, (r + 1) CB / c) of tile w / c. Equals sk_start when c divides
// CB; otherwise the ranges differ by at most one k-block but still end on tile boundaries.
LUTMM_HD int64_t cluster_start(int64_t w, int64_t col_blocks, int64_t c) {
  return (w / c) * col_blocks + (w % c) * col_blocks / c;
}
// The worker whose range holds iteration i.
LUTMM_HD int sk_owner(int64_t i, int64_t total, int64_t grid) {
  const int64_t base = total / grid, rem = total % grid, big = rem * (base + 1);
  return int(i < big ? i / (base + 1) : rem + (i - big) / base);
}

// Stream-K workers of the decode kernels (src/cuda/lut_gemm.cu, lut_stream.cu) for `tiles` 128-row
// tiles of `col_blocks` k-blocks on `slots` worker slots (SMs x workers per SM).
int64_t lut_workers(int64_t tiles, int64_t col_blocks, int64_t slots);

// The decode kernels' split on a device whose clusters of c workers (c = 2, 4, 8) fit max_clusters[c]
// at once (all 0 where there are no clusters): lut_workers' workers (or one whole tile each where the
// tiles fill 80-100% of the slots), and where every tile's workers can form one thread-block cluster
// that pays (rules and measurements in plan.cpp), cluster = c: the partials meet in distributed
// shared memory instead of global memory.
struct LutSplit {
  int64_t workers = 0;
  int cluster = 1;  // 1: Stream-K with the fixup through global memory
};
LutSplit lut_split(int64_t tiles, int64_t col_blocks, int64_t slots, const int (&max_clusters)[9]);

// Row blocks per tile of the cp.async decode kernel (lut_gemm.cu) for M tokens: 8 (warp w computes row
// block w of the tile, every warp the same k-block), or R = 1, 2, 4 where M <= R and ceil(row_blocks /
// R) tiles fill 70-100% of `slots`: then each CTA takes one whole tile of R row blocks, its 8 warps
// split the tile's k-blocks 8 / R ways (warp w: row block w % R, k-blocks w / R, w / R + 8 / R, ...)
// and add their partial sums in shared memory; no Stream-K partials in global memory. Tiles of R
// row blocks read 8 / R k-blocks of activations per stage (one token row each: hence M <= R), and
// 8 / R must not exceed the k-blocks.
// fill_pct: the share of the slots the tiles must fill (kRowTileFill; kRowTileFill4 for 4-bit tiles sized
// for three CTAs per SM).
constexpr int kRowTileFill = 70;
int lut_tile_rows(int64_t M, int64_t row_blocks, int64_t col_blocks, int64_t slots, int fill_pct = kRowTileFill);
// The TMA decode kernel's row tiles at 3 and 4 bits (`sms` SMs): where they fill fill3_pct-100% of
// three CTAs per SM, sized for three (6144x4096: 384 tiles of one on 396); else where
// they fill two per SM and a tile streams at most kRowTileMaxIters3 stages, sized for two CTAs per SM
// (4096x14336: 256 tiles of one, 14 stages; 8192x8192: 256 of two, 16). Longer tiles keep Stream-K
// over three CTAs per SM (8192x28672: 56 stages of tiles of two, 46.6 us against 43.6). rows = 8: none.
constexpr int64_t kRowTileMaxIters3 = 32;
// At 4 bits tiles sized for three CTAs per SM must fill 90% of those slots, not 70%: they read the 32
// KB table (a 128-byte entry stride, lut_mma.cuh's Layout), which pays only where they fill the SMs.
// H200, 2026-11-27, lutmm_bench A/B in one call, M = 1: 6144x4096, 384 tiles of one on 396 slots (97%),
// 8.9 -> 7.2 us against 192 tiles of two sized for two; 10240x8192, 320 tiles of two (81%), 18.7 -> 20.1
// against Stream-K (M = 2: 19.2 -> 20.0). docs/performance-log.md item 56.
constexpr int kRowTileFill4 = 90;
struct RowTiles {
  int rows;         // row blocks per tile (lut_tile_rows), 8 for none
  int ctas_per_sm;  // CTAs per SM the row-tile kernel is sized for
};
RowTiles lut_tile_rows_tma3(int64_t M, int64_t row_blocks, int64_t col_blocks, int64_t sms,
                            int fill3_pct = kRowTileFill);
// The same kernel's 3-bit tiles of 8 row blocks (where no row tiles apply): sized for two CTAs per SM
// instead of its default three, (a) as one whole tile per CTA where `tiles` fill 80-100% of the 2 x
// `sms` slots (28672x4096: 224 tiles; on 396 slots Stream-K cut them into pieces), or (b) as Stream-K
// over those 264 slots at M = 5-16 for weights of kTwoCta3MinWeights to kTwoCta3MaxWeights (4096x14336,
// 8192x8192, 28672x4096). H100, 2026-11-26, lutmm_bench A/B in one call (docs/performance-log.md item 46),
// three CTAs -> (a): 28672x4096 M = 1 29.1 -> 27.1 us, M = 4 27.3 -> 25.1, M = 8 25.0 -> 23.8, M = 16
// 28.3 -> 27.4; (b): 4096x14336 M = 16 20.2 -> 18.4, M = 8 17.0 -> 16.4, 8192x8192 M = 16 19.0 -> 18.8,
// but 6144x4096 M = 16 11.1 -> 12.3 and 57344x8192 M = 16 90.8 -> 93.0 (item 44): hence the bounds.
// ctas_per_sm 3 (whole false): the default, Stream-K over three CTAs per SM.
constexpr int64_t kTwoCta3MinWeights = int64_t(32) << 20;
constexpr int64_t kTwoCta3MaxWeights = int64_t(200) << 20;
struct Tiles3 {
  int ctas_per_sm;  // 2 or 3
  bool whole;       // one whole tile per CTA (else Stream-K over ctas_per_sm x sms workers)
};
Tiles3 lut_tiles8_tma3(int64_t M, int64_t tiles, int64_t weights, int64_t sms);
// Row blocks per whole tile of the TMA decode kernel's tiles-of-8 kernel (4 bits: short_whole_tiles,
// src/cuda/lut_mma.cuh): where ceil(row_blocks / 8) whole tiles (one per worker, lut_split's 80-100%
// rule) leave slots empty, the r in 8..5 whose ceil(row_blocks / r) tiles fill the most of the `slots`
// without exceeding them (ties: the larger r). 28672x4096 on 264 slots: 224 tiles of 8 (85%) -> 256 of
// 7 (97%); the warps past r of a CTA idle. (H200: 24.2 -> 23.8 us at M = 1, not the ~21.5 a busiest-SM
// model predicted; docs/performance-log.md item 93.)
int lut_whole_tile_rows(int64_t row_blocks, int64_t slots);
// Whether the TMA decode kernel's 4-bit tiles of 8 row blocks run as one CTA per SM of two warp groups
// (two Stream-K workers with their own producers and stages, sharing one table) instead of two CTAs of
// one group: at M <= 8 where Stream-K over the 2 x `sms` workers (not whole tiles, lut_split's 80-100%
// rule) gives each worker at least kTwoGroupMinKblocks k-blocks; the plan then takes neither row tiles
// nor clusters. Why: the two CTAs of an SM run at different rates (the one launched first always
// faster, on every SM; 59.4 against 65.4 us of loop on 57344x8192, docs/performance-log.md item 98),
// so their equal ranges end over a 10 us window; the two groups of one CTA keep pace (within 0.5 us).
// H200, 2026-11-29, lutmm_bench A/B in one call, three rounds (item 99), two CTAs (experiment 1) -> two
// groups, 4-bit g128, us (means): 57344x8192 (448 tiles, 109 k-blocks a worker) M = 1 78.0 -> 73.8, M = 2
// 78.8 -> 74.9, M = 4 79.1 -> 76.4, M = 8 79.3 -> 78.8; 8192x28672 (64 tiles, 54 a worker; row tiles of 2
// at M <= 2 before) M = 1 40.4 -> 39.4, M = 2 40.7 -> 39.6, M = 4 40.5 -> 39.9, M = 8 41.4 -> 41.3;
// g64: 57344x8192 M = 1 93.9 -> 91.0, 8192x28672 48.6 -> 48.5. Two groups on every launch (experiment 9
// then, same-call A/B) lost where ranges are short: 10240x8192 (19 a worker) 18.3 -> 18.8, 8192x8192
// (16, against row tiles) 14.5 -> 15.8, 28672x4096 (whole tiles) 21.1 -> 22.3, and 3 and 2 bits on
// 57344x8192 (74.5 -> 75.4, 63.2 -> 64.3), 16-token tiles (8192x8192 M = 16 18.0 -> 18.4).
// Measured on the H200 only, so only on cards of its DRAM bandwidth (peak_dram_bytes_per_s >=
// kFastHbmBytesPerS, as lut_tma_by_size): on the H100, at 2026-11-26's kernel, two groups were slower
// (57344x8192 M = 1 94.3 -> 96.4 us, 8192x8192 19.3 -> 20.4; src/cuda/lut_stream.cu). LUTMM_EXPERIMENT 12
// puts the H200's rules on every card; 1 (and 201, the timeline build with it): never.
constexpr int64_t kTwoGroupMinKblocks = 48;
bool lut_two_group_ctas(int bits, int64_t M, int64_t tiles, int64_t col_blocks, int64_t sms,
                        double peak_dram_bytes_per_s);
// Whether the TMA decode kernel (lut_stream.cu) can run tiles of r row blocks for group size 32 << gl
// (gl: group_log2, 30 for g = K) and K columns: one box brings the scales of 8 / r k-blocks, so each
// k-block must have groups of its own (g <= 128) and the box be at most 256 scales wide; at r = 1 one
// box brings 8 whole k-blocks of activations (K a multiple of 128). r = 8 (no row tiles) is always fine.
bool lut_tma_rows_ok(int r, int gl, int64_t K);

// Whether the TMA decode kernel (lut_stream.cu) takes an N x K weight of `bits` at M <= 16 by its size
// alone (lut_gemm.cu's geometry also sends it smaller weights where its clusters or row tiles fit):
// from kTmaMinWeights elements (kTmaMinWeights3 at 3 bits), measured on the H100; on cards of at least
// kFastHbmBytesPerS peak DRAM bandwidth (the H200) every weight with K >= kTmaMinKFastHbm as well.
// peak_dram_bytes_per_s: the card's memory clock x bus width (0: unknown). Measurements in plan.cpp.
constexpr int64_t kTmaMinWeights = int64_t(32) << 20, kTmaMinWeights3 = int64_t(24) << 20;
constexpr int64_t kTmaMinKFastHbm = 2048;
constexpr double kFastHbmBytesPerS = 4.0e12;  // H100 SXM 3.35 TB/s, H200 4.8
bool lut_tma_by_size(int64_t N, int64_t K, int bits, double peak_dram_bytes_per_s);

constexpr int kWgTileRowBlocks = 8;  // 16-row blocks per tile (the kernel's 8 consumer warps): 128 weight rows
// Tiles for one to two waves: the first wave runs data-parallel when the remainder gives each CTA at
// least this many k-blocks on Stream-K (H100, item 80: 13.6 k-blocks per CTA won 3%, 2.9 lost 2%).
constexpr int kWgMinTailShare = 8;

// What the plan needs to know of the device.
struct WgDeviceLimits {
  int sms = 0;                   // streaming multiprocessors
  int max_clusters[5] = {};      // [c], c = 2..4: clusters of c one-CTA-per-SM CTAs that fit at once (0: none)
};

struct WgPlan {
  int tok = 0;          // tokens per tile: 64, 128 or 256
  int ctas = 1;         // CTAs per SM: 1, or 2 at TOK = 64
  int grid = 0;         // CTAs launched
  int m_tiles = 0, n_tiles = 0, tiles = 0;  // token tiles, weight tiles, all tiles
  int dp_tiles = 0;     // tiles [0, dp_tiles) data-parallel, the rest Stream-K (unless split > 1)
  int col_blocks = 0;   // 128-column k-blocks
  int split = 1;        // > 1: clusters of `split` CTAs, one tile each, split along K (no Stream-K)
  bool aligned = false; // Stream-K with grid / tiles CTAs on every tile (ranges on tile boundaries)
  // The kernel variant that scales each k-block's partial sum after its MMAs instead of the looked-up
  // values before them: where a k-block holds one scale group (g >= 128, or g = K) and the
  // accumulators have registers to spare (one CTA per SM, TOK <= 128). (docs/performance-log.md item 30)
  bool scales_after = false;
  int sk_tiles() const { return tiles - dp_tiles; }
};

// ---- the wgmma kernel ----
// Tokens per tile for M (before any halving to reach clusters).
int wg_tok_for(int64_t M);
// The plan for Y (M x N) = X W^T on a device with limits `d`. allow_split = false: data-parallel
// waves + plain Stream-K only (WgSplit::kStreamK; also the workspace bound: no plan needs more).
WgPlan wg_plan(int64_t M, const Shape& s, const WgDeviceLimits& d, bool allow_split);

}  // namespace gpu
}  // namespace lutmm
