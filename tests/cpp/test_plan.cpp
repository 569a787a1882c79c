// The kernels' work-split rules (src/plan.cpp) on the CPU, with the H100's limits: 132 SMs,
// 30 clusters of 4, 39 of 3 and 66 of 2 at a time (cudaOccupancyMaxActiveClusters on the H100 of
// 2026-11-26). The expected plans are the ones the GPU runs measured (docs/performance-log.md, items 31-35).
#include <gtest/gtest.h>

#include <algorithm>

#include "../../src/plan.h"

using namespace lutmm;
using namespace lutmm::gpu;

namespace {

WgDeviceLimits h100() {
  WgDeviceLimits d;
  d.sms = 132;
  d.max_clusters[2] = 66;
  d.max_clusters[3] = 39;
  d.max_clusters[4] = 30;
  return d;
}

// Partial-sum bytes a plan needs in the workspace (as lut_wgmma.cu sizes them).
size_t partials_bytes(const WgPlan& p) { return p.sk_tiles() == 0 ? 0 : size_t(p.grid) * 2 * 256 * (p.tok / 2) * 4; }

}  // namespace

TEST(WgPlan, ClusterSizeByTileCount) {
  // M = 256 (one token tile), K = 4096, N = t x 128: the table the GPU test printed on the H100.
  for (int t = 24; t <= 70; ++t) {
    const WgPlan p = wg_plan(256, Shape{t * 128, 4096, 4, 128}, h100(), true);
    // 47-52 tiles: clusters of 2 on 71-79% of the SMs (item 77), where half-width tiles are too many
    const int want = t >= 27 && t <= 30 ? 4 : t >= 31 && t <= 33 ? 2 : t >= 36 && t <= 39 ? 3 : t >= 47 && t <= 66 ? 2 : 1;
    EXPECT_EQ(p.split, want) << "tiles " << t;
    if (t >= 31 && t <= 33) EXPECT_EQ(p.tok, 128) << "tiles " << t << ": half-width tiles reach clusters of 2";
  }
}

TEST(WgPlan, MeasuredShapes) {
  struct Want { int64_t N, K, M; int tok, ctas, split; bool aligned; int grid; };
  const Want cases[] = {
      {8192, 8192, 256, 256, 1, 2, false, 128},    // clusters of 2 (item 31)
      {4096, 4096, 256, 128, 1, 2, false, 128},    // half-width tiles in clusters (item 32)
      {4096, 4096, 128, 64, 1, 2, false, 128},
      {8192, 8192, 64, 64, 1, 2, false, 128},      // clusters before two CTAs per SM (item 33)
      {8192, 28672, 64, 64, 2, 1, true, 256},      // two CTAs per SM (112 k-blocks per cluster CTA), aligned
      {4096, 14336, 256, 256, 1, 1, true, 128},    // aligned Stream-K, 28 k-blocks per CTA (item 35)
      {4096, 14336, 128, 128, 1, 1, true, 128},
      {4096, 4096, 64, 64, 1, 1, true, 128},       // aligned, 8 k-blocks per CTA: nothing better at TOK = 64
      {6144, 4096, 256, 256, 1, 2, false, 96},     // 48 tiles: clusters of 2 on 73% of the SMs (item 77)
      {6144, 4096, 128, 128, 1, 2, false, 96},
      {28672, 4096, 256, 256, 1, 1, false, 132},   // 224 tiles: Stream-K over every SM
      {8192, 8192, 4096, 256, 1, 1, false, 132},   // 1024 tiles: all data-parallel (many waves)
  };
  for (const Want& w : cases) {
    const WgPlan p = wg_plan(w.M, Shape{w.N, w.K, 4, 128}, h100(), true);
    const std::string at = std::to_string(w.N) + "x" + std::to_string(w.K) + " M=" + std::to_string(w.M);
    EXPECT_EQ(p.tok, w.tok) << at;
    EXPECT_EQ(p.ctas, w.ctas) << at;
    EXPECT_EQ(p.split, w.split) << at;
    EXPECT_EQ(p.aligned, w.aligned) << at;
    EXPECT_EQ(p.grid, w.grid) << at;
  }
  const WgPlan big = wg_plan(4096, Shape{8192, 8192, 4, 128}, h100(), true);
  EXPECT_EQ(big.dp_tiles, big.tiles);
}

// Tiles for one to two waves (item 80): the first wave data-parallel when the remainder gives each CTA
// >= kWgMinTailShare k-blocks on Stream-K, else all on Stream-K; where two whole waves cost at most 10%
// more, both run data-parallel; with two or more whole waves the last one stays on Stream-K.
TEST(WgPlan, OneWholeWaveRunsDataParallelWhenTheRemainderIsLongEnough) {
  const int sms = h100().sms;
  int wave_dp = 0;
  for (int t = sms + 1; t < 2 * sms; ++t) {  // M = 256, K = 4096: t tiles of 32 k-blocks
    const WgPlan p = wg_plan(256, Shape{int64_t(t) * 128, 4096, 4, 128}, h100(), true);
    const int tail = t - sms;
    const bool round_up = tail * 10 >= sms * 9 || 2 * sms * 10 <= t * 11;  // two waves cost <= 10% more
    const int want = round_up ? t : tail * 32 >= kWgMinTailShare * sms ? sms : 0;
    ASSERT_EQ(p.tiles, t);
    EXPECT_EQ(p.split, 1) << "tiles " << t;
    EXPECT_EQ(p.dp_tiles, want) << "tiles " << t;
    EXPECT_EQ(p.grid, sms) << "tiles " << t;
    wave_dp += want == sms;
  }
  EXPECT_GT(wave_dp, 50);
  // The measured rows: 6144x4096 M = 1024 (192 tiles, 14.5 k-blocks per CTA) and M = 768 (144, 2.9);
  // 57344x8192 M = 256 and 10240x8192 M = 1024 (448 and 320 tiles: the last whole wave on Stream-K).
  EXPECT_EQ(wg_plan(1024, Shape{6144, 4096, 4, 128}, h100(), true).dp_tiles, 132);
  EXPECT_EQ(wg_plan(768, Shape{6144, 4096, 4, 128}, h100(), true).dp_tiles, 0);
  EXPECT_EQ(wg_plan(256, Shape{57344, 8192, 4, 128}, h100(), true).dp_tiles, 264);
  EXPECT_EQ(wg_plan(1024, Shape{10240, 8192, 4, 128}, h100(), true).dp_tiles, 132);
}

// Invariants over a sweep, with and without clusters on the device: every plan covers its tiles
// with at most one CTA per slot; clusters only where they fit and each CTA gets >= 4 k-blocks;
// aligned plans put the same number of CTAs on every tile and a whole share of k-blocks on each;
// and no plan needs more workspace than the plain Stream-K plan that wgmma_workspace_bytes() sizes.
TEST(WgPlan, Invariants) {
  WgDeviceLimits no_clusters;
  no_clusters.sms = 132;
  WgDeviceLimits small;  // a smaller part
  small.sms = 58;
  small.max_clusters[2] = 29;
  small.max_clusters[4] = 12;
  int plans = 0, split = 0, aligned = 0;
  for (const WgDeviceLimits& d : {h100(), no_clusters, small})
    for (int64_t N : {77, 1000, 3840, 4096, 5600, 6144, 8192, 10240, 28672, 57344})
      for (int64_t K : {256, 1024, 4096, 8192, 14336})
        for (int64_t M : {33, 64, 65, 100, 128, 200, 256, 300, 512, 1024, 4096})
          for (int bits : {2, 4}) {
            const Shape s{N, K, bits, 128};
            const WgPlan p = wg_plan(M, s, d, true), q = wg_plan(M, s, d, false);
            const std::string at = std::to_string(N) + "x" + std::to_string(K) + " M=" + std::to_string(M) +
                                   " sms=" + std::to_string(d.sms);
            ++plans;
            ASSERT_TRUE(p.tok == 64 || p.tok == 128 || p.tok == 256) << at;
            EXPECT_EQ(int64_t(p.m_tiles), (M + p.tok - 1) / p.tok) << at;
            EXPECT_EQ(p.tiles, p.m_tiles * p.n_tiles) << at;
            EXPECT_GE(p.grid, 1) << at;
            EXPECT_LE(p.grid, d.sms * p.ctas) << at;
            EXPECT_TRUE(p.ctas == 1 || (p.ctas == 2 && p.tok == 64)) << at;
            if (p.split > 1) {
              ++split;
              EXPECT_LE(p.split, 4) << at;
              EXPECT_EQ(p.ctas, 1) << at;
              EXPECT_EQ(p.grid, p.tiles * p.split) << at;
              EXPECT_LE(p.tiles, d.max_clusters[p.split]) << at;
              EXPECT_GE(p.col_blocks, 4 * p.split) << at;
              EXPECT_FALSE(p.aligned) << at;
            }
            if (p.aligned) {
              ++aligned;
              EXPECT_EQ(p.grid % p.tiles, 0) << at;
              EXPECT_EQ(p.col_blocks % (p.grid / p.tiles), 0) << at;
              EXPECT_EQ(p.dp_tiles, 0) << at;
            }
            EXPECT_EQ(q.split, 1) << at;
            EXPECT_FALSE(q.aligned) << at;
            EXPECT_EQ(q.tok, wg_tok_for(M)) << at;
            EXPECT_LE(partials_bytes(p), partials_bytes(q)) << at;
            if (d.max_clusters[2] == 0) EXPECT_EQ(p.split, 1) << at;
          }
  EXPECT_GT(split, 50);
  EXPECT_GT(aligned, 20);
  EXPECT_EQ(plans, 3 * 10 * 5 * 11 * 2);
}

// The scales-after-MMA variant: only where a k-block holds one scale group (g >= 128, or g = K when K
// is not 32 x a power of two) and a CTA has the SM's registers to itself at TOK <= 128.
TEST(WgPlan, ScalesAfterTheMmaWhereOneGroupPerKBlock) {
  const WgPlan p64 = wg_plan(64, Shape{4096, 4096, 4, 128}, h100(), true);  // few tiles: one CTA per SM
  EXPECT_EQ(p64.ctas, 1);
  EXPECT_TRUE(p64.scales_after);
  EXPECT_FALSE(wg_plan(64, Shape{4096, 4096, 4, 64}, h100(), true).scales_after);   // 2 groups per k-block
  EXPECT_FALSE(wg_plan(64, Shape{4096, 4096, 4, 32}, h100(), true).scales_after);   // 4
  EXPECT_TRUE(wg_plan(128, Shape{8192, 8192, 3, 256}, h100(), true).scales_after);
  EXPECT_TRUE(wg_plan(100, Shape{1000, 96, 4, 96}, h100(), true).scales_after);     // g = K = 96
  EXPECT_FALSE(wg_plan(4096, Shape{8192, 8192, 4, 128}, h100(), true).scales_after); // TOK = 256
  const WgPlan two = wg_plan(64, Shape{57344, 8192, 4, 128}, h100(), true);          // 2 CTAs per SM
  EXPECT_EQ(two.ctas, 2);
  EXPECT_FALSE(two.scales_after);
}

TEST(WgPlan, RejectsBadInput) {
  EXPECT_THROW(wg_plan(0, Shape{4096, 4096, 4, 128}, h100(), true), Error);
  EXPECT_THROW(wg_plan(64, Shape{4096, 4096, 4, 128}, WgDeviceLimits{}, true), Error);
}

// Stream-K's even ranges (shared with the kernels): every iteration has exactly one owner, and the
// owner's range holds it.
TEST(Plan, StreamKRanges) {
  for (int64_t total : {1, 7, 64, 1000, 4096, 7168})
    for (int64_t grid : {1, 3, 64, 132, 256, 264, 396})
      for (int64_t i = 0; i < total; ++i) {
        const int w = sk_owner(i, total, grid);
        ASSERT_LE(sk_start(w, total, grid), i) << total << " " << grid;
        ASSERT_LT(i, sk_start(w + 1, total, grid)) << total << " " << grid;
      }
  EXPECT_EQ(sk_start(264, 4096, 264), 4096);
}

// Decode workers: at most one per slot and per iteration; where tiles are fewer than the slots and
// the split is tile-aligned, every worker's range lies inside one tile (one fixup per worker).
TEST(Plan, DecodeWorkers) {
  // H100, two TMA-kernel CTAs per SM (264 slots): 8192x8192 (64 tiles x 64 k-blocks) -> 4 per tile;
  // 4096x14336 (32 x 112) -> 8 per tile; 6144x4096 (48 x 32): 5 does not divide 32 -> Stream-K.
  EXPECT_EQ(lut_workers(64, 64, 264), 256);
  EXPECT_EQ(lut_workers(32, 112, 264), 256);
  EXPECT_EQ(lut_workers(48, 32, 264), 264);
  EXPECT_EQ(lut_workers(448, 64, 264), 264);  // 57344x8192: more tiles than slots
  EXPECT_EQ(lut_workers(1, 2, 264), 2);       // never more workers than iterations
  int aligned = 0;
  for (int64_t tiles = 1; tiles <= 600; tiles += (tiles < 80 ? 1 : 13))
    for (int64_t cb : {1, 2, 8, 16, 32, 64, 112, 224})
      for (int64_t slots : {58, 132, 264, 396}) {
        const int64_t w = lut_workers(tiles, cb, slots), total = tiles * cb;
        ASSERT_GE(w, 1);
        ASSERT_LE(w, std::min(total, slots)) << tiles << " " << cb << " " << slots;
        if (tiles < slots && w % tiles == 0 && w != std::min(total, slots)) {
          ++aligned;
          for (int64_t c = 0; c < w; ++c)  // first and last iteration of each range in the same tile
            ASSERT_EQ(sk_start(c, total, w) / cb, (sk_start(c + 1, total, w) - 1) / cb) << tiles << " " << cb << " " << slots;
        }
      }
  EXPECT_GT(aligned, 100);
  EXPECT_THROW(lut_workers(0, 4, 132), Error);
}

// Decode clusters: where every tile's workers fit one cluster of 2, 4 or 8 (dividing the k-blocks, all
// clusters resident at once) and it pays (the same split as Stream-K's, >= 70% of the slots, or
// Stream-K would cut every tile into more than 8 pieces), the split is clusters x tiles with rank r on
// k-blocks [r CB / C, (r + 1) CB / C) of tile c / C; elsewhere lut_workers' split, or one whole tile
// per worker where the tiles fill 80-100% of the slots.
// Cluster ranges: rank r of tile t takes [r CB / c, (r + 1) CB / c): every tile covered once, in
// order, no range empty for c <= CB; Stream-K's ranges exactly where c divides CB.
TEST(Plan, ClusterRanges) {
  for (int64_t cb : {1, 2, 3, 5, 7, 8, 32, 112})
    for (int64_t c = 2; c <= 8; ++c) {
      if (c > cb) continue;
      const int64_t tiles = 5, w = tiles * c;
      for (int64_t i = 0; i < w; ++i) {
        const int64_t b = cluster_start(i, cb, c), e = cluster_start(i + 1, cb, c);
        ASSERT_LT(b, e) << cb << " " << c << " " << i;           // never empty
        ASSERT_EQ(b / cb, (e - 1) / cb) << cb << " " << c << " " << i;  // inside one tile
        ASSERT_LE(e - b, (cb + c - 1) / c);
        ASSERT_GE(e - b, cb / c);
        if (cb % c == 0) ASSERT_EQ(b, sk_start(i, tiles * cb, w));
      }
      ASSERT_EQ(cluster_start(0, cb, c), 0);
      ASSERT_EQ(cluster_start(w, cb, c), tiles * cb);  // all iterations, each once (ranges are contiguous)
    }
}

TEST(Plan, DecodeClusters) {
  const int none[9] = {};
  const int roomy[9] = {0, 0, 132, 0, 66, 0, 0, 0, 33};
  auto split = [](int64_t t, int64_t cb, int64_t slots, const int(&mc)[9]) { return lut_split(t, cb, slots, mc); };
  EXPECT_EQ(split(32, 32, 264, roomy).cluster, 8);    // 4096x4096: lut_workers' own 8 per tile
  EXPECT_EQ(split(32, 32, 264, roomy).workers, 256);
  EXPECT_EQ(split(64, 64, 264, roomy).cluster, 4);    // 8192x8192: 4 per tile, as lut_workers
  EXPECT_EQ(split(48, 32, 264, roomy).workers, 192);  // 6144x4096: 4 per tile (73% of the slots), not
  EXPECT_EQ(split(48, 32, 264, roomy).cluster, 4);    // Stream-K's 5-6 uneven pieces
  EXPECT_EQ(split(8, 32, 264, roomy).workers, 64);    // 1024x4096: 8 per tile, not 32 one-block pieces
  EXPECT_EQ(split(32, 32, 396, roomy).cluster, 8);    // 3 bits (3 per SM): 8 per tile, not 12-13 pieces
  EXPECT_EQ(split(64, 64, 396, roomy).cluster, 1);    // 3-bit 8192x8192: 256 of 396 slots vs 6-7 pieces
  EXPECT_EQ(split(16, 6, 40, roomy).cluster, 2);      // 6 k-blocks: 8 and 4 do not divide them
  EXPECT_EQ(split(1, 1, 264, roomy).cluster, 1);      // one k-block: nothing to split
  EXPECT_EQ(split(448, 64, 264, roomy).cluster, 1);   // 57344x8192: more tiles than slots
  EXPECT_EQ(split(448, 64, 264, roomy).workers, 264);
  EXPECT_EQ(split(224, 32, 264, roomy).cluster, 1);   // 28672x4096: 85% of the slots: one tile each
  EXPECT_EQ(split(224, 32, 264, roomy).workers, 224);
  // On the H100 only 30 clusters of 8 and 60 of 4 fit with 2 CTAs per SM: 4096x4096 and 8192x8192 keep
  // Stream-K (clusters of half the size would halve the workers).
  const int h100[9] = {0, 0, 128, 0, 60, 0, 0, 0, 30};
  EXPECT_EQ(split(32, 32, 264, h100).cluster, 1);
  EXPECT_EQ(split(32, 32, 264, h100).workers, 256);
  EXPECT_EQ(split(64, 64, 264, h100).cluster, 1);
  EXPECT_EQ(split(48, 32, 264, h100).cluster, 4);
  int clustered = 0;
  for (int64_t tiles = 1; tiles <= 300; tiles += (tiles < 80 ? 1 : 7))
    for (int64_t cb : {1, 2, 3, 6, 8, 32, 64, 112})
      for (int64_t slots : {132, 264, 396}) {
        const LutSplit plain = split(tiles, cb, slots, none);
        const bool whole = tiles <= slots && tiles * 10 >= slots * 8;
        ASSERT_EQ(plain.cluster, 1);
        ASSERT_EQ(plain.workers, whole ? tiles : lut_workers(tiles, cb, slots));
        const LutSplit sp = split(tiles, cb, slots, roomy);
        if (sp.cluster == 1) {
          ASSERT_EQ(sp.workers, plain.workers);
          continue;
        }
        ++clustered;
        const int64_t C = sp.cluster, total = tiles * cb;
        ASSERT_TRUE(C == 2 || C == 4 || C == 8);
        ASSERT_EQ(sp.workers, C * tiles);
        ASSERT_LE(sp.workers, slots);
        ASSERT_LE(tiles, roomy[C]);
        ASSERT_TRUE(sp.workers == plain.workers || sp.workers * 10 >= slots * 7 || plain.workers > 8 * tiles)
            << tiles << " " << cb << " " << slots;
        for (int64_t c = 0; c < sp.workers; ++c) {  // the kernels' Stream-K ranges are the cluster ranges
          const int64_t t = c / C, r = c % C;
          ASSERT_EQ(sk_start(c, total, sp.workers), t * cb + r * cb / C) << tiles << " " << cb << " " << slots;
          ASSERT_EQ(sk_start(c + 1, total, sp.workers), t * cb + (r + 1) * cb / C);
        }
      }
  EXPECT_GT(clustered, 200);
}

// Tiles of 1, 2 or 4 row blocks for the cp.async decode kernel (lut_tile_rows): only where M fits
// their activation rows (M <= R), the k-blocks give every warp one (8 / R <= col_blocks), and one whole
// tile per CTA fills 80-100% of the slots; the smallest such R; 8 otherwise.
TEST(Plan, DecodeRowTiles) {
  EXPECT_EQ(lut_tile_rows(1, 256, 32, 264), 1);    // 4096x4096 M = 1: 256 tiles of one row block
  EXPECT_EQ(lut_tile_rows(1, 256, 112, 264), 1);   // 4096x14336
  EXPECT_EQ(lut_tile_rows(1, 512, 64, 264), 2);    // 8192x8192: 256 tiles of two
  EXPECT_EQ(lut_tile_rows(2, 512, 64, 264), 2);
  EXPECT_EQ(lut_tile_rows(3, 512, 64, 264), 8);    // M = 3 needs R >= 4: 128 tiles, too few
  EXPECT_EQ(lut_tile_rows(2, 256, 32, 264), 8);    // 4096x4096 M = 2: 128 tiles of two, too few
  EXPECT_EQ(lut_tile_rows(1, 384, 32, 264), 2);    // 6144x4096: 384 tiles of one (too many), 192 of two (73%)
  EXPECT_EQ(lut_tile_rows(1, 360, 32, 264), 8);    // 180 tiles of two: 68%
  EXPECT_EQ(lut_tile_rows(1, 1792, 32, 264), 8);   // 28672x4096: 224 tiles of eight already fill the slots
  EXPECT_EQ(lut_tile_rows(1, 256, 4, 264), 8);     // K = 512: 4 k-blocks for 8 warps
  EXPECT_EQ(lut_tile_rows(4, 920, 8, 264), 4);     // 230 tiles of four
  EXPECT_EQ(lut_tile_rows(1, 256, 32, 396), 8);    // 3 CTAs per SM: 256 of 396 slots
  // The TMA kernel at 3 bits (three CTAs per SM, 132 SMs): tiles that fill 396 slots, else 264 if short.
  auto tma3 = [](int64_t M, int64_t rb, int64_t cb) {
    const RowTiles t = lut_tile_rows_tma3(M, rb, cb, 132);
    return std::pair<int, int>{t.rows, t.ctas_per_sm};
  };
  using P = std::pair<int, int>;
  EXPECT_EQ(tma3(1, 384, 32), P(1, 3));   // 6144x4096: 384 tiles of one, three per SM
  EXPECT_EQ(tma3(1, 256, 112), P(1, 2));  // 4096x14336: 256 tiles, 14 stages each, two per SM
  EXPECT_EQ(tma3(1, 512, 64), P(2, 2));   // 8192x8192: 256 tiles of two, 16 stages
  EXPECT_EQ(tma3(1, 256, 32), P(1, 2));   // 4096x4096
  EXPECT_EQ(tma3(1, 512, 224).first, 8);  // 8192x28672: 56 stages, Stream-K
  EXPECT_EQ(tma3(1, 512, 256).first, 8);  // 64 stages
  EXPECT_EQ(tma3(1, 256, 264).first, 8);  // tiles of one, 33 stages
  EXPECT_EQ(tma3(1, 256, 256), P(1, 2));  // 32 stages
  EXPECT_EQ(tma3(5, 256, 32).first, 8);   // M > 4
  EXPECT_THROW(lut_tile_rows_tma3(1, 256, 32, 0), Error);
  // 4 bits: tiles sized for three CTAs per SM only where they fill 90% of the slots (kRowTileFill4).
  auto tma4 = [](int64_t M, int64_t rb, int64_t cb) {
    const RowTiles t = lut_tile_rows_tma3(M, rb, cb, 132, kRowTileFill4);
    return std::pair<int, int>{t.rows, t.ctas_per_sm};
  };
  EXPECT_EQ(tma4(1, 384, 32), P(1, 3));     // 6144x4096: 97%
  EXPECT_EQ(tma4(1, 357, 32), P(1, 3));     // 90.2%
  EXPECT_EQ(tma4(1, 356, 32).first, 8);     // 89.9%; 178 tiles of two fill 67% of two per SM: Stream-K
  EXPECT_EQ(tma4(1, 640, 64).first, 8);     // 10240x8192: 320 tiles of two (81%), Stream-K
  EXPECT_EQ(tma3(1, 640, 64), P(2, 3));     // (3 bits: 70% suffices)
  EXPECT_EQ(tma4(2, 768, 16), P(2, 3));     // 12288x2048, M = 2: 384 tiles of two
  EXPECT_EQ(tma4(1, 256, 112), P(1, 2));    // 4096x14336 as at 3 bits
  EXPECT_EQ(tma4(1, 512, 64), P(2, 2));     // 8192x8192
  EXPECT_THROW(lut_tile_rows(1, 256, 32, 264, 0), Error);
  EXPECT_THROW(lut_tile_rows(1, 256, 32, 264, 101), Error);
  // Its tiles of 8 (lut_tiles8_tma3, 132 SMs): whole tiles sized for two CTAs per SM where they fill
  // 212-264 slots, else Stream-K over two per SM at M = 5-16 for 32M-200M weights, else three per SM.
  auto t8 = [](int64_t M, int64_t tiles, int64_t weights) {
    const Tiles3 t = lut_tiles8_tma3(M, tiles, weights, 132);
    return std::pair<int, bool>{t.ctas_per_sm, t.whole};
  };
  using W = std::pair<int, bool>;
  EXPECT_EQ(t8(1, 224, 28672LL * 4096), W(2, true));    // 28672x4096 (fused gate/up)
  EXPECT_EQ(t8(16, 224, 28672LL * 4096), W(2, true));
  EXPECT_EQ(t8(1, 212, 27136LL * 4096), W(2, true));    // 212 = 80% of 264
  EXPECT_EQ(t8(1, 211, 27008LL * 4096), W(3, false));   // 79.9%
  EXPECT_EQ(t8(1, 264, 33792LL * 4096), W(2, true));
  EXPECT_EQ(t8(1, 265, 33920LL * 4096), W(3, false));
  EXPECT_EQ(t8(16, 32, 4096LL * 14336), W(2, false));   // 4096x14336: Stream-K over 264
  EXPECT_EQ(t8(5, 64, 8192LL * 8192), W(2, false));     // 8192x8192
  EXPECT_EQ(t8(4, 64, 8192LL * 8192), W(3, false));     // M <= 4
  EXPECT_EQ(t8(16, 48, 6144LL * 4096), W(3, false));    // 25M weights: slower on two (11.1 -> 12.3 us)
  EXPECT_EQ(t8(16, 448, 57344LL * 8192), W(3, false));  // 470M weights: slower on two (item 44)
  EXPECT_EQ(t8(16, 8, kTwoCta3MinWeights), W(2, false));
  EXPECT_EQ(t8(16, 8, kTwoCta3MinWeights - 1), W(3, false));
  EXPECT_EQ(t8(16, 8, kTwoCta3MaxWeights - 1), W(2, false));
  EXPECT_EQ(t8(16, 8, kTwoCta3MaxWeights), W(3, false));
  EXPECT_EQ(t8(17, 64, 8192LL * 8192), W(3, false));    // the TMA kernel serves M <= 16
  // geometry() takes the two-per-SM grid from lut_split over 2 x SMs slots: whole tiles exactly where
  // lut_tiles8_tma3 says so, and fewer workers than tiles x k-blocks otherwise.
  const int no_clusters[9] = {};
  int whole = 0;
  for (int64_t tiles = 1; tiles <= 600; ++tiles)
    for (int64_t cb : {8, 32, 64, 112}) {
      const Tiles3 t = lut_tiles8_tma3(8, tiles, tiles * 128 * cb * 128, 132);
      const LutSplit sp = lut_split(tiles, cb, 264, no_clusters);
      EXPECT_EQ(sp.cluster, 1) << tiles;
      if (t.whole) {
        ++whole;
        EXPECT_EQ(sp.workers, tiles) << "tiles " << tiles << " k-blocks " << cb;
      } else {
        EXPECT_TRUE(sp.workers != tiles || tiles > 264) << "tiles " << tiles << " k-blocks " << cb;
      }
    }
  EXPECT_EQ(whole, 53 * 4);  // 212-264 tiles
  EXPECT_THROW(lut_tiles8_tma3(1, 224, 1, 0), Error);
  EXPECT_THROW(lut_tiles8_tma3(0, 224, 1, 132), Error);
  EXPECT_THROW(lut_tile_rows(0, 256, 32, 264), Error);
  EXPECT_THROW(lut_tile_rows(1, 256, 32, 0), Error);
  for (int64_t M : {1, 2, 3, 4, 5, 16})
    for (int64_t rb = 1; rb <= 2000; rb += 7)
      for (int64_t cb : {1, 2, 4, 8, 32})
        for (int64_t slots : {132, 264, 396}) {
          const int64_t r = lut_tile_rows(M, rb, cb, slots);
          ASSERT_TRUE(r == 1 || r == 2 || r == 4 || r == 8);
          if (r == 8) continue;
          const int64_t tiles = (rb + r - 1) / r;
          ASSERT_LE(M, r);
          ASSERT_LE(8 / r, cb);
          ASSERT_LE(tiles, slots);
          ASSERT_GE(tiles * 10, slots * 7);
          for (int64_t smaller = 1; smaller < r; smaller *= 2) {  // no smaller R qualified
            const int64_t t2 = (rb + smaller - 1) / smaller;
            ASSERT_FALSE(M <= smaller && 8 / smaller <= cb && t2 <= slots && t2 * 10 >= slots * 8);
          }
        }
}

// The TMA kernel's row tiles (lut_tma_rows_ok): its scale box spans 8 / r k-blocks' groups, so g <= 128
// and at most 256 scales; at r = 1 its activation box takes 8 whole k-blocks (K % 128 == 0).
TEST(Plan, TmaRowTiles) {
  EXPECT_TRUE(lut_tma_rows_ok(1, 2, 4096));    // g = 128: 8 x 16 scales
  EXPECT_TRUE(lut_tma_rows_ok(1, 1, 14336));   // g = 64: 8 x 32 = 256
  EXPECT_FALSE(lut_tma_rows_ok(1, 0, 4096));   // g = 32: 8 x 64 = 512 scales
  EXPECT_TRUE(lut_tma_rows_ok(2, 0, 4096));    // 4 x 64
  EXPECT_TRUE(lut_tma_rows_ok(4, 0, 4096));
  EXPECT_FALSE(lut_tma_rows_ok(2, 3, 4096));   // g = 256: two k-blocks share a group
  EXPECT_FALSE(lut_tma_rows_ok(1, 30, 992));   // g = K (not a power of two)
  EXPECT_FALSE(lut_tma_rows_ok(1, 2, 1664 + 32));  // K not a multiple of 128 at r = 1
  EXPECT_TRUE(lut_tma_rows_ok(2, 2, 1664 + 32));   // r = 2 reads activations by 160-column boxes
  EXPECT_TRUE(lut_tma_rows_ok(8, 30, 992));    // tiles of 8: no row tiles, nothing to check
  EXPECT_THROW(lut_tma_rows_ok(3, 2, 4096), Error);
}

// Which weights the TMA decode kernel takes at M <= 16 by size (lut_tma_by_size): the H100's
// thresholds everywhere, and on a card of >= 4 TB/s peak DRAM bandwidth every K >= 2048 as well.
TEST(Plan, TmaBySize) {
  const double h100 = 3.35e12, h200 = 4.8e12;
  for (int bits : {2, 3, 4}) {
    const int64_t min_weights = int64_t(bits == 3 ? 24 : 32) << 20;
    for (double peak : {0.0, h100}) {
      EXPECT_TRUE(lut_tma_by_size(8192, 8192, bits, peak)) << bits;         // 64M
      EXPECT_TRUE(lut_tma_by_size(min_weights / 4096, 4096, bits, peak)) << bits;
      EXPECT_FALSE(lut_tma_by_size(min_weights / 4096 - 16, 4096, bits, peak)) << bits;
      EXPECT_FALSE(lut_tma_by_size(2048, 8192, bits, peak)) << bits;        // 16M
      EXPECT_FALSE(lut_tma_by_size(1024, 4096, bits, peak)) << bits;
    }
    EXPECT_TRUE(lut_tma_by_size(2048, 8192, bits, h200)) << bits;
    EXPECT_TRUE(lut_tma_by_size(1024, 4096, bits, h200)) << bits;
    EXPECT_TRUE(lut_tma_by_size(16, 2048, bits, h200)) << bits;             // any N from K = 2048
    EXPECT_FALSE(lut_tma_by_size(4096, 1024, bits, h200)) << bits;          // K = 1024: by size only
    EXPECT_TRUE(lut_tma_by_size(57344, 1024, bits, h200)) << bits;          // 56M
    EXPECT_EQ(lut_tma_by_size(2048, 2048, bits, 3.99e12), false) << bits;   // just below the bound
    EXPECT_EQ(lut_tma_by_size(2048, 2048, bits, 4.0e12), true) << bits;
  }
}

// One CTA of two warp groups where Stream-K ranges are long (lut_two_group_ctas; 4 bits, M <= 8).
TEST(Plan, TwoGroupCtas) {
  const bool on = LUTMM_EXPERIMENT != 1 && LUTMM_EXPERIMENT != 201;
  constexpr double kH200 = 4.8e12, kH100 = 3.35e12;  // peak DRAM bytes/s
  // 132 SMs: 57344x8192 (448 tiles of 8, 64 k-blocks) and 8192x28672 (64 tiles, 224 k-blocks).
  for (int64_t M : {1, 4, 8}) {
    EXPECT_EQ(lut_two_group_ctas(4, M, 448, 64, 132, kH200), on) << M;
    EXPECT_EQ(lut_two_group_ctas(4, M, 64, 224, 132, kH200), on) << M;
  }
  EXPECT_FALSE(lut_two_group_ctas(4, 9, 448, 64, 132, kH200));   // 16-token tiles
  EXPECT_FALSE(lut_two_group_ctas(3, 1, 448, 64, 132, kH200));   // 3 and 2 bits
  EXPECT_FALSE(lut_two_group_ctas(2, 1, 448, 64, 132, kH200));
  EXPECT_FALSE(lut_two_group_ctas(4, 1, 80, 64, 132, kH200));    // 10240x8192: 19 k-blocks a worker
  EXPECT_FALSE(lut_two_group_ctas(4, 1, 64, 64, 132, kH200));    // 8192x8192
  EXPECT_FALSE(lut_two_group_ctas(4, 1, 224, 32, 132, kH200));   // 28672x4096
  EXPECT_FALSE(lut_two_group_ctas(4, 1, 224, 256, 132, kH200));  // whole tiles, however long
  // The bound: 48 k-blocks a worker on 264 workers, from either side of the whole-tile band.
  EXPECT_EQ(lut_two_group_ctas(4, 1, 64, 198, 132, kH200), on);   // 12672 = 48 x 264
  EXPECT_FALSE(lut_two_group_ctas(4, 1, 64, 197, 132, kH200));
  EXPECT_EQ(lut_two_group_ctas(4, 1, 300, 43, 132, kH200), on);   // 12900
  EXPECT_FALSE(lut_two_group_ctas(4, 1, 300, 42, 132, kH200));    // 12600
  EXPECT_EQ(lut_two_group_ctas(4, 1, 265, 48, 132, kH200), on);   // just past the whole-tile band
  EXPECT_FALSE(lut_two_group_ctas(4, 1, 264, 48, 132, kH200));
  EXPECT_EQ(lut_two_group_ctas(4, 1, 211, 61, 132, kH200), on);   // just below it (211 < 80% of 264)
  EXPECT_FALSE(lut_two_group_ctas(4, 1, 212, 61, 132, kH200));
  // Cards slower than kFastHbmBytesPerS (the H100) keep two CTAs of one group.
  EXPECT_FALSE(lut_two_group_ctas(4, 1, 448, 64, 132, kH100));
  EXPECT_FALSE(lut_two_group_ctas(4, 1, 64, 224, 132, kH100));
  EXPECT_FALSE(lut_two_group_ctas(4, 1, 448, 64, 132, 0.0));  // the driver reported no bandwidth
  EXPECT_EQ(lut_two_group_ctas(4, 1, 448, 64, 132, kFastHbmBytesPerS), on);
  EXPECT_THROW(lut_two_group_ctas(4, 0, 448, 64, 132, kH200), Error);
  EXPECT_THROW(lut_two_group_ctas(4, 1, 0, 64, 132, kH200), Error);
  EXPECT_THROW(lut_two_group_ctas(4, 1, 448, 64, 0, kH200), Error);
}

// Whole tiles of fewer row blocks where 8 leave slots empty (lut_whole_tile_rows; the TMA kernel at 4 bits).
TEST(Plan, WholeTileRows) {
  EXPECT_EQ(lut_whole_tile_rows(1792, 264), 7);  // 28672x4096: 224 tiles of 8 -> 256 of 7
  EXPECT_EQ(lut_whole_tile_rows(2112, 264), 8);  // 264 tiles of 8 fill every slot
  EXPECT_EQ(lut_whole_tile_rows(1900, 264), 8);  // 238 of 8; 272 of 7 would not fit
  EXPECT_EQ(lut_whole_tile_rows(1500, 264), 6);  // 188 of 8, 215 of 7, 250 of 6 (300 of 5 would not fit)
  EXPECT_EQ(lut_whole_tile_rows(3584, 264), 8);  // 448 tiles of 8: not whole tiles
  EXPECT_EQ(lut_whole_tile_rows(5, 264), 8);     // one tile whatever r >= 5: ties keep the larger r
  EXPECT_EQ(lut_whole_tile_rows(6, 1), 8);
  // The rule itself, everywhere: the chosen tiles fit, and no r in 5..8 fits more.
  for (int64_t slots : {132, 264, 396})
    for (int64_t rb = 1; rb <= 8 * slots + 16; ++rb) {
      const int r = lut_whole_tile_rows(rb, slots);
      ASSERT_TRUE(r >= 5 && r <= 8);
      const int64_t t = (rb + r - 1) / r, t8 = (rb + 7) / 8;
      if (t8 > slots) { ASSERT_EQ(r, 8) << rb; continue; }
      ASSERT_LE(t, slots) << rb;
      for (int q = 5; q <= 8; ++q) {
        const int64_t tq = (rb + q - 1) / q;
        ASSERT_FALSE(tq <= slots && (tq > t || (tq == t && q > r))) << "rb " << rb << " slots " << slots << ": r " << r << " vs " << q;
      }
    }
  EXPECT_THROW(lut_whole_tile_rows(0, 264), Error);
  EXPECT_THROW(lut_whole_tile_rows(100, 0), Error);
}
