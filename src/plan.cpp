// Work splits of the GPU kernels (see plan.h). Every rule below records the measurement behind it.
#include "plan.h"

#include <algorithm>
#include <string>

#ifndef LUTMM_EXPERIMENT
#define LUTMM_EXPERIMENT 0
#endif

namespace lutmm {
namespace gpu {
namespace {
// Tiles filling 80-100% of the slots: one whole tile per worker, no fixups (lut_split's rule; also
// where lut_tiles8_tma3 and lut_two_group_ctas defer to it).
bool whole_tiles(int64_t tiles, int64_t slots) { return tiles <= slots && tiles * 10 >= slots * 8; }
}  // namespace

int64_t lut_workers(int64_t tiles, int64_t col_blocks, int64_t slots) {
  if (tiles < 1 || col_blocks < 1 || slots < 1) throw Error("lut_workers: tiles, k-blocks and slots must be positive");
  // Stream-K over every slot, at most one worker per iteration; or, with fewer tiles than slots, a
  // tile-aligned split: C = slots / tiles workers per tile when C divides the k-blocks and keeps >= 90%
  // of the slots busy. Stream-K's even ranges then fall on tile boundaries: every worker takes k-blocks
  // [r CB / C, (r + 1) CB / C) of one tile, with one fixup at its end instead of up to two (one
  // mid-range, where its warps stall on the counter's round trip).
  // (H100, 2026-11-26, lutmm_bench A/B, 4-bit g128: M = 1 8192x8192 18.6 -> 16.8 us (C = 4),
  // 4096x14336 17.4 -> 15.6 (C = 8), 4096x4096 8.2 -> 7.8, 2-bit 8192x8192 15.6 -> 14.0; M = 16
  // 8192x8192 20.0 -> 19.1, 4096x4096 9.5 -> 9.0. Where C did not divide the k-blocks the uneven
  // ranges lost: 6144x4096 (C = 5) 10.3 -> 11.0, 10240x8192 (C = 3) 21.9 -> 22.2, 3-bit 8192x8192
  // (C = 6) 21.0 -> 21.4; hence the divisibility rule.)
  int64_t workers = std::min(tiles * col_blocks, slots);
  if (tiles < slots) {
    const int64_t c = slots / tiles;
    if (tiles * c * 10 >= slots * 9 && col_blocks % c == 0) workers = tiles * c;
  }
  return workers;
}

LutSplit lut_split(int64_t tiles, int64_t col_blocks, int64_t slots, const int (&max_clusters)[9]) {
  LutSplit sp;
  sp.workers = lut_workers(tiles, col_blocks, slots);
  // Tiles filling 80-100% of the slots: one whole tile per worker, no fixups. (H100, 2026-11-26,
  // lutmm_bench, TMA kernel, M = 1: 28672x4096 (224 tiles, 264 slots) 29.9 -> 29.0 us.)
  if (whole_tiles(tiles, slots)) sp.workers = tiles;
  if (tiles >= slots) return sp;
  // Clusters of c workers per tile, c = 8, 4, 2 (largest first), where all fit at once and c divides
  // the k-blocks, and where they pay: the same split as Stream-K's; or >= 70% of the slots busy; or
  // Stream-K would cut every tile into more than 8 pieces. (H100, 2026-11-26, lutmm_bench, M = 1,
  // clusters vs Stream-K: 4-bit 1024x4096 (8 per tile vs 32 one-block pieces) 5.6 vs 7.9 us (cp.async
  // kernel), 4.9 vs 7.4 (TMA kernel); 6144x4096 (4 per tile, 192 of 264 slots, vs 5-6 uneven pieces):
  // TMA 9.4 vs 11.3; 3-bit 4096x4096 (8 per tile, 256 of 396 slots, vs 12-13 pieces): TMA 8.9 vs
  // 10.3. Slower, so excluded: half of Stream-K's workers, where only clusters of half the size fit
  // (2 CTAs per SM leave fewer than 32 clusters of 8 or 64 of 4 on 132 SMs): 4096x4096 128 vs 256
  // workers 9.7 vs 7.7 (cp.async), 8192x8192 18.5 vs 16.7, 4096x14336 20.7 vs 15.5 (TMA); 3-bit
  // 8192x8192, 256 of 396 slots vs 6-7 pieces: 22.5 vs 19.9.)
  // Experiment 18: any c from 8 to 2, the k-blocks split into c near-equal ranges per tile
  // (cluster_start) where c does not divide them. Slower (H100, 2026-11-26, lutmm_bench, M = 1, one
  // call): 4096x4096 in clusters of 7 (224 workers, 4-5 k-blocks each) 8.8 us vs Stream-K's 7.7 (256
  // workers of 4 with the fixup), 8192x8192 clusters of 3 (192) 17.8 vs 16.6 (M = 16: 21.4 vs 18.5),
  // 4096x14336 clusters of 7 15.6 vs 15.4, 3-bit 4096x4096 9.6 vs 8.2: the longest range sets the
  // time, and 5 k-blocks instead of 4 cost more than the fixup.
  const bool any_c = LUTMM_EXPERIMENT == 18;
  for (int64_t c : {8, 7, 6, 5, 4, 3, 2}) {
    const int64_t w = c * tiles;
    if (!any_c && (c & (c - 1)) != 0) continue;
    if (w > slots || (!any_c && col_blocks % c != 0) || c > col_blocks || max_clusters[c] < tiles) continue;
    if (w == sp.workers || w * 10 >= slots * 7 || sp.workers > 8 * tiles) {
      sp.workers = w;
      sp.cluster = int(c);
    }
    break;  // a smaller cluster only halves the workers again
  }
  return sp;
}

int lut_tile_rows(int64_t M, int64_t row_blocks, int64_t col_blocks, int64_t slots, int fill_pct) {
  if (M < 1 || row_blocks < 1 || col_blocks < 1 || slots < 1)
    throw Error("lut_tile_rows: M, row blocks, k-blocks and slots must be positive");
  if (fill_pct < 1 || fill_pct > 100) throw Error("lut_tile_rows: fill_pct must be in [1, 100]");
  if (LUTMM_EXPERIMENT == 19) return 8;  // A/B: no row tiles (docs/performance-log.md item 39)
  // Tiles must fill kRowTileFill = 70% of the slots (H100, 2026-11-26, lutmm_bench A/B in one call, 6144x4096: 192
  // tiles of two on 264 slots (73%) against Stream-K in clusters, M = 1 4-bit 9.6 -> 9.4 us, 2-bit 9.1
  // -> 7.9; M = 2 9.5 -> 9.1, 9.2 -> 7.8; item 43). LUTMM_EXPERIMENT 26: the earlier 80%.
  const int64_t pct = LUTMM_EXPERIMENT == 26 && fill_pct == kRowTileFill ? 80 : fill_pct;
  for (int64_t r : {1, 2, 4}) {
    const int64_t tiles = (row_blocks + r - 1) / r;
    if (M <= r && 8 / r <= col_blocks && tiles <= slots && tiles * 100 >= slots * pct) return int(r);
  }
  return 8;
}

RowTiles lut_tile_rows_tma3(int64_t M, int64_t row_blocks, int64_t col_blocks, int64_t sms, int fill3_pct) {
  if (sms < 1) throw Error("lut_tile_rows_tma3: the SM count must be positive");
  const int r = lut_tile_rows(M, row_blocks, col_blocks, 3 * sms, fill3_pct);
  if (r < 8) return {r, 3};
  const int r2 = lut_tile_rows(M, row_blocks, col_blocks, 2 * sms);
  const int64_t iters = (col_blocks + 8 / r2 - 1) / (8 / r2);
  return r2 < 8 && iters <= kRowTileMaxIters3 ? RowTiles{r2, 2} : RowTiles{8, 3};
}

Tiles3 lut_tiles8_tma3(int64_t M, int64_t tiles, int64_t weights, int64_t sms) {
  if (sms < 1) throw Error("lut_tiles8_tma3: the SM count must be positive");
  if (M < 1 || tiles < 1) throw Error("lut_tiles8_tma3: M and tiles must be positive");
  const int64_t slots2 = 2 * sms;
  if (whole_tiles(tiles, slots2)) return {2, true};
  if (M > 4 && M <= 16 && weights >= kTwoCta3MinWeights && weights < kTwoCta3MaxWeights) return {2, false};
  return {3, false};
}

int lut_whole_tile_rows(int64_t row_blocks, int64_t slots) {
  if (row_blocks < 1 || slots < 1) throw Error("lut_whole_tile_rows: row blocks and slots must be positive");
  int best = 8;
  int64_t best_tiles = (row_blocks + 7) / 8;
  if (best_tiles > slots) return 8;  // not whole tiles
  for (int r = 7; r >= 5; --r) {
    const int64_t t = (row_blocks + r - 1) / r;
    if (t <= slots && t > best_tiles) { best = r; best_tiles = t; }
  }
  return best;
}

bool lut_two_group_ctas(int bits, int64_t M, int64_t tiles, int64_t col_blocks, int64_t sms,
                        double peak_dram_bytes_per_s) {
  if (M < 1 || tiles < 1 || col_blocks < 1 || sms < 1)
    throw Error("lut_two_group_ctas: M, tiles, k-blocks and SMs must be positive");
  if (LUTMM_EXPERIMENT == 1 || LUTMM_EXPERIMENT == 201 || bits != 4 || M > 8) return false;
  if (peak_dram_bytes_per_s < kFastHbmBytesPerS) return false;
  const int64_t slots = 2 * sms;
  if (whole_tiles(tiles, slots)) return false;  // one whole tile per worker
  return tiles * col_blocks >= kTwoGroupMinKblocks * slots;
}

bool lut_tma_rows_ok(int r, int gl, int64_t K) {
  if (r == 8) return true;
  if (r != 1 && r != 2 && r != 4) throw Error("lut_tma_rows_ok: r must be 1, 2, 4 or 8");
  if (gl < 0 || gl > 2) return false;
  const int scales_per_kblock = 16 * (4 >> gl);
  return scales_per_kblock * (8 / r) <= 256 && (r > 1 || K % 128 == 0);
}

// Weights of at least kTmaMinWeights elements take the TMA kernel at M <= 16 on Hopper. H100, 2026-11-26,
// 4-bit g128, TMA vs cp.async kernel (same run): M = 1: 4096x4096 9.5 vs 8.3 us, 6144x4096 11.3 vs
// 10.4, 4096x14336 17.5 vs 17.6, 8192x8192 18.7 vs 19.2, 28672x4096 30.5 vs 31.1, 57344x8192 95.6 vs
// 106.7; M = 16: 4096x4096 10.0 vs 9.5, 8192x8192 20.0 vs 21.7, 28672x4096 31.2 vs 35.1, 57344x8192
// 102.5 vs 120.3. Smaller weights take it too where its split runs in clusters on >= 70% of the
// slots (H100, 2026-11-26, M = 1: 6144x4096 in clusters of 4, 9.4 us, against 10.3 for the cp.async
// kernel).
// At 3 bits (three CTAs per SM for the TMA kernel, two for the cp.async kernel) from 24M: H100,
// 2026-11-26, lutmm_bench, TMA vs cp.async kernel in one call: 6144x4096 (24M) M = 1 10.9 vs 12.2 us
// (clusters of 4), M = 4 10.9 vs 12.3, M = 16 12.1 vs 13.4; 5120x4096 M = 1 9.5 vs 9.4; 4096x4096 M = 1
// 8.6 vs 7.3 (tiles of one row block), M = 4 8.5 vs 8.2, M = 16 9.3 vs 9.3.
// On the H200 the TMA kernel takes every weight with K >= 2048 at M <= 16 (log item 85). H200,
// 2026-11-28, lutmm_bench, dispatched / cp.async forced / TMA forced in one call, us (M = 1 unless
// noted): 2048x8192 (the 70B model's fused k/v) 9.5 / 9.4 / 7.8 at 4 bits, 9.8 / 9.8 / 8.0 at 3, 9.5 / 9.5
// / 7.8 at 2, M = 16 11.5 / 11.5 / 9.6; 1024x8192 7.6 / 7.6 / 6.0, M = 16 9.0 / 9.0 / 7.2; 1024x4096 (the
// 8B model's k or v) 5.1 / 5.0 / 4.7, 3 bits 5.2 / 5.2 / 4.6, M = 16 6.0 / 6.0 / 5.5; 512x4096 4.8 / 4.8
// / 4.3; 2048x4096 2 bits 6.4 / 6.3 / 5.8; 1024x2048 3.8 / 3.8 / 3.6. Over 7 shapes x M = 1, 4, 8, 16
// x 2-4 bits with K >= 2048 the TMA kernel lost only on 2048x2048 at 2-3 bits, by 0.1 us (M = 1 2 bits
// 4.9 vs 5.0, 3 bits 4.6 vs 4.7). At K = 1024 (4096x1024) the cp.async kernel won at 2-3 bits (M = 1:
// 3.8 vs 4.2, 4.6 vs 4.9), so there the size thresholds decide. A build with the TMA kernel from 16M
// weights against the H100's thresholds, A/B twice in one call: 2048x8192 M = 1 9.4 -> 7.8, M = 16 11.5
// -> 9.6; 4096x4096 M = 16 9.4 -> 9.0 (4 bits), 9.3 -> 8.3 (2); the rest within 0.1 us.
// The H100 keeps its thresholds: the H100s are no longer lent to measure the change there. The cards
// are told apart by their peak DRAM bandwidth (memory clock x bus width: H100 SXM 3.35 TB/s, H200 4.8).
bool lut_tma_by_size(int64_t N, int64_t K, int bits, double peak_dram_bytes_per_s) {
  if (peak_dram_bytes_per_s >= kFastHbmBytesPerS && K >= kTmaMinKFastHbm) return true;
  return N * K >= (bits == 3 ? kTmaMinWeights3 : kTmaMinWeights);
}

// H100, 2026-11-26: TOK = 128 up to M = 512 made M = 256 45-55% slower (more tiles, each re-reading
// its share of activations and paying the lookups for half the MMA work).
// TOK = 64 for M <= 64 (wgmma m64n64k16): the lookups, not the MMAs, set the pace there, so halving
// the MMA work of TOK = 128 tiles is worth it (H100, 2026-11-26, lutmm_bench, M = 64, TOK 128 -> 64:
// 8192x8192 44.8 -> 37.3 us, 4096x4096 21.8 -> 16.5, 28672x4096 88.1 -> 59.9, 4096x14336 41.5 -> 34.4,
// 57344x8192 241.2 -> 207.2).
int wg_tok_for(int64_t M) { return M <= 64 ? 64 : M <= 128 ? 128 : 256; }

namespace {

// The plan for tiles of `tok` tokens; force_ctas: CTAs per SM if not 0.
// c2_busy_pct: the share of the SMs that clusters of 2 must keep busy (the last resort of plan_split
// lowers it).
WgPlan plan_tok(int64_t M, const Shape& s, const WgDeviceLimits& d, bool allow_split, int tok, int force_ctas = 0,
                int c2_busy_pct = 80) {
  WgPlan g;
  const int64_t n_tiles = (s.row_blocks() + kWgTileRowBlocks - 1) / kWgTileRowBlocks;
  g.tok = tok;
  g.m_tiles = int((M + g.tok - 1) / g.tok);
  g.col_blocks = int(s.col_blocks());
  g.n_tiles = int(n_tiles);
  const int64_t tiles = n_tiles * g.m_tiles;
  if (tiles * g.col_blocks >= (int64_t(1) << 31))
    throw Error("shape: M x N x K too large for one call (more than 2^31 tiles x k-blocks); split M or N");
  g.tiles = int(tiles);
  const int sms = d.sms;
  // One CTA per SM (~190-210 KB of shared memory each); at TOK = 64 two (each with its own table and
  // 3-6 stages) when each of them still gets >= 15 k-blocks: twice the warps hide the lookups'
  // latency, but a CTA's fixed costs (table build, pipeline fill, Stream-K fixup) count twice.
  // (H100, 2026-11-26, lutmm_bench, M = 64, 1 -> 2 CTAs (k-blocks per CTA with 2): 57344x8192
  // 187.6 -> 154.6 us (108), 28672x4096 55.0 -> 49.3 (27), 8192x8192 34.5 -> 33.0 (15.5),
  // 4096x14336 31.9 -> 31.8 (13.6), 4096x4096 15.7 -> 17.5 (3.9).)
  g.ctas = force_ctas ? force_ctas : g.tok == 64 && tiles * g.col_blocks >= int64_t(15) * 2 * sms ? 2 : 1;
  // Where split-K clusters of one CTA per SM apply and give each CTA <= 64 k-blocks, they beat two
  // CTAs per SM on Stream-K. (H100, 2026-11-26, lutmm_bench A/B, TOK = 64, clusters of 2:
  // 8192x8192 M = 64 33.3 -> 30.7 us (32 k-blocks per CTA), M = 48 33.1 -> 30.7, 3-bit 36.8 -> 33.6,
  // 2-bit 30.2 -> 29.5; 8192x28672 M = 64 85.2 -> 91.9 (112 k-blocks per CTA: there the second
  // CTA's warps hiding the lookups' latency are worth more than the fixups).)
  if (allow_split && g.ctas == 2 && !force_ctas) {
    const WgPlan c = plan_tok(M, s, d, true, tok, 1);
    if (c.split > 1 && c.col_blocks <= 64 * c.split) return c;
  }
  const int slots = sms * g.ctas;
  // Few tiles (at most a third to a half of the SMs): split each tile's k-blocks over a cluster of
  // C = 4, 3 or 2 CTAs when that keeps >= 80% of the SMs busy, every CTA gets >= 4 k-blocks and the
  // clusters all fit at once. Against Stream-K over every SM, no CTA ends mid-tile with a partial
  // to write to global memory, and no last contributor reads the others' partials while the rest
  // idle. (H100, 2026-11-26, Nsight Compute, 8192x8192 M = 256, 64 tiles on Stream-K: SMs active
  // 80% of the kernel's cycles, 76.4 us against 51.7 us per 256 tokens at M = 4096. lutmm_bench,
  // Stream-K -> clusters, 4-bit: 8192x8192 M = 256 64.5 -> 53.8 us (C = 2), M = 192 68.6 -> 53.3,
  // 3840x4096 M = 256 33.3 -> 23.5 (C = 4); 3 and 2 bits -15%, -19%. That H100 fits 30 clusters of 4,
  // 39 of 3 and 66 of 2, so 4096x4096 M = 256 (32 tiles) takes another rule.)
  if (allow_split && g.ctas == 1)
    for (int c = 4; c >= 2; --c) {
      const int64_t ctas = tiles * c;
      const int64_t busy_pct = c == 2 ? c2_busy_pct : 80;
      if (ctas <= sms && ctas * 100 >= int64_t(sms) * busy_pct && g.col_blocks >= 4 * c && tiles <= d.max_clusters[c]) {
        g.split = c;
        g.dp_tiles = g.tiles;
        g.grid = int(ctas);
        return g;
      }
    }
  // Else, with fewer tiles than CTA slots, tile-aligned Stream-K (as the decode kernels): C = slots /
  // tiles CTAs per tile when C divides the k-blocks and keeps >= 90% of the slots busy, so every CTA
  // takes one C-th of one tile (one partial, none mid-range). (H100, 2026-11-26, lutmm_bench A/B
  // against the rules before it, 4-bit g128: 4096x14336 M = 256 61.8 -> 54.0 us, M = 128 48.6 ->
  // 37.8 (was 40.7 before item 33's rule met the halved tiles there), M = 64 30.8 -> 29.2, 4096x4096
  // M = 64 14.7 -> 13.3; but 4096x4096 M = 256 22.6 -> 27.5 and M = 128 17.6 -> 18.3 against
  // clusters of half-width tiles, hence the order in wg_plan.)
  if (LUTMM_EXPERIMENT != 14 && allow_split && g.tiles < slots) {
    const int c = slots / g.tiles;
    if (c >= 2 && g.tiles * c * 10 >= slots * 9 && g.col_blocks % c == 0) {
      g.dp_tiles = 0;
      g.grid = g.tiles * c;
      g.aligned = true;
      return g;
    }
  }
  // Else all whole waves but the last are data-parallel; the last full wave and the remainder go to
  // Stream-K, so each CTA gets the same share of the tail. When rounding the waves up costs at most
  // 10% (the last wave fills >= 90% of the SMs, or there are many waves), everything runs
  // data-parallel: Stream-K's fixups and mid-tile starts cost more than that.
  // (H100, 2026-11-26: 4096x4096 M = 1024, 128 tiles, 90.8 -> 70.1 us; lutmm_bench A/B for the
  // many-waves rule: 4096x14336 M = 4096, 3.9 waves, 730.5 -> 662.2 us, 4096x4096 M = 4096 210.8 ->
  // 200.5 us, 28672x4096 M = 1024 358.6 -> 350.0 us, the rest within 0.5%.)
  // But with one whole wave and a remainder (1-2 waves, where the rule above leaves nothing
  // data-parallel), that wave runs data-parallel and only the remainder goes to Stream-K, if each
  // CTA's share of it is >= kWgMinTailShare k-blocks (LUTMM_EXPERIMENT 10: never).
  // (H100, 2026-11-28, item 80, lutmm_bench A/B, two rounds, 4-bit g128 unless noted, us, all on
  // Stream-K -> one data-parallel wave + the rest (the remainder's k-blocks per CTA): 6144x4096
  // M = 1024 99.8 -> 94.7 (14.5), 2-bit 95.7 -> 90.4, 4096x4096 M = 1536 100.2 -> 94.1 (14.5),
  // 28672x4096 M = 256 115.5 -> 111.7 (22.3), 10240x8192 M = 512 152.5 -> 147.6 (13.6), 8192x8192
  // M = 768 180.6 -> 171.0 (29.1), 4096x14336 M = 1536 316.7 -> 285.4 (50.9), 8192x28672 M = 768
  // 742.3 -> 633.7, 8192x8192 M = 544 186.7 -> 168.9, 28672x4096 M = 96 (TOK = 128) 68.8 -> 65.9;
  // 57344x8192 M = 64 (TOK = 64, two CTAs per SM) 176.9 -> 176.4; but 6144x4096 M = 768 81.6 -> 83.2
  // (2.9). With two or more whole waves, putting only the remainder on Stream-K lost:
  // 10240x8192 M = 1024 274.5 -> 281.2, 57344x8192 M = 256 375.7 -> 385.1, 6144x4096 M = 3072
  // 251.6 -> 254.6.)
  const int tail = g.tiles % slots;
  const int64_t waves_up = (g.tiles + slots - 1) / slots;
  const bool dp_only = tail == 0 || tail * 10 >= slots * 9 || waves_up * slots * 10 <= int64_t(g.tiles) * 11;
  const int whole_waves = g.tiles / slots;
  const bool wave_dp = LUTMM_EXPERIMENT != 10 && whole_waves == 1 &&
                       int64_t(tail) * g.col_blocks >= int64_t(kWgMinTailShare) * slots;
  const int sk_waves = wave_dp ? 0 : 1;
  g.dp_tiles = dp_only ? g.tiles : std::max(0, whole_waves - sk_waves) * slots;
  const int64_t sk_iters = int64_t(g.sk_tiles()) * g.col_blocks;
  g.grid = g.dp_tiles > 0 ? std::min(slots, g.tiles) : int(std::min<int64_t>(slots, std::max<int64_t>(1, sk_iters)));
  return g;
}

// Tiles of wg_tok_for(M) tokens, or of half as many where only the doubled tile count lets split-K
// clusters run (4096-row weights at M = 65-256: 32 tiles do not fit as clusters of 4 on the H100,
// 64 fit as clusters of 2). (H100, 2026-11-26, lutmm_bench A/B, 4-bit g128: 4096x4096 M = 256
// 31.5 -> 22.9 us, M = 200 32.3 -> 22.9, M = 128 20.6 -> 17.7, 3-bit M = 256 32.5 -> 25.7;
// 4096x14336 M = 256 61.4 -> 61.7, long K: Stream-K's fixups weigh less there.)
// Then, where neither applies and the tiles would go to plain Stream-K, clusters of 2 that keep
// only 70-80% of the SMs busy: Stream-K over every SM is slower still. (H100, 2026-11-28, item 77,
// lutmm_bench A/B, two rounds: 6144x4096 (48 tiles, 96 CTAs on 132 SMs) M = 256 35.6 -> 29.1 us,
// M = 200 37.6 -> 29.3, M = 128 22.9 -> 20.9, 3-bit M = 256 35.5 -> 30.7, 2-bit 34.5 -> 28.8; but
// clusters of 3 at 73% (32 tiles) lost to the half-width clusters and the tile-aligned plan they
// would have replaced: 4096x4096 M = 256 20.9 -> 23.7, 4096x14336 M = 256 52.5 -> 58.1.)
// Not half-width tiles to make a data-parallel wave (item 80's rule) where full-width ones are fewer
// than the SMs and run on plain Stream-K: slower (H100, 2026-11-28, lutmm_bench A/B, two rounds,
// 10240x8192 M = 256 83.0 -> 93.3 us, M = 192 80.8 -> 88.8, 4096x14336 M = 768 164.9 -> 177.4,
// 6144x4096 M = 768 79.5 -> 83.0; 6144x4096 M = 512 and 4096x4096 M = 768 equal): each tile's
// lookups then feed half the MMA work.
// Order: clusters at full width; tile-aligned Stream-K at full width where each CTA gets >= 16
// k-blocks; clusters of half-width tiles; tile-aligned Stream-K with shorter ranges; clusters of 2 at
// 70% of the SMs; Stream-K.
WgPlan plan_split(int64_t M, const Shape& s, const WgDeviceLimits& d, bool allow_split) {
  const int tok = wg_tok_for(M);
  const WgPlan g = plan_tok(M, s, d, allow_split, tok);
  if (!allow_split || g.split > 1 || tok == 64 || LUTMM_EXPERIMENT == 6) return g;
  if (g.aligned && g.col_blocks * g.tiles / g.grid >= 16) return g;
  const WgPlan h = plan_tok(M, s, d, true, tok / 2);
  if (h.split > 1) return h;
  if (g.aligned) return g;
  const WgPlan r = plan_tok(M, s, d, true, tok, 0, 70);
  return r.split > 1 ? r : g;
}

}  // namespace

WgPlan wg_plan(int64_t M, const Shape& s, const WgDeviceLimits& d, bool allow_split) {
  if (M < 1) throw Error("M: expected >= 1, got " + std::to_string(M));
  if (d.sms < 1) throw Error("device: no streaming multiprocessors reported");
  WgPlan p = plan_split(M, s, d, allow_split);
  // One scale group per k-block: group_size / 32 >= 3, i.e. g >= 128 (a power-of-two multiple of 32)
  // or g = K (any multiple of 32 that is not one; g = 32 and 64 give 4 and 2 groups per k-block).
  p.scales_after = s.group_size / 32 >= 3 && p.ctas == 1 && p.tok <= 128;
  return p;
}

}  // namespace gpu
}  // namespace lutmm
