// The wgmma prefill kernel's (lut_wgmma.cu) CTA shape, parameters and tile scheduler: which tiles and
// k-blocks each CTA takes (data-parallel waves, Stream-K, split-K clusters; the plan is src/plan.cpp's
// wg_plan) and in which order tiles run.
#pragma once
#include "lut_table.cuh"
#include "wgmma.cuh"
#include "../plan.h"

namespace lutmm {
namespace gpu {
namespace wgk {

constexpr int kWarps = 8;                     // consumer warps; warp w looks up row block w of a tile
constexpr int kThreads = kWarps * 32;         // consumer threads
constexpr int kCtaThreads = kThreads + 128;   // + the producer warpgroup

template <typename T>
struct WgParams : GemmParams<T> {  // partials [grid][2][TOK / 2][kThreads], counters per Stream-K tile
  int m_tiles, n_tiles; // token tiles, weight tiles (tile_coords() maps a tile index to both)
  int tiles, dp_tiles;  // tiles [0, dp_tiles) are data-parallel, [dp_tiles, tiles) Stream-K
  int split;            // > 1: clusters of `split` CTAs each take one tile, split along K (split_k_store)
  bool y_vec;           // y is 16-byte aligned and N % 8 == 0: 8 outputs of a token in one 16-byte store
};
constexpr int kTileRows = kWarps * 16;  // weight rows per tile

#if LUTMM_SM90A  // device code below exists for sm_90a only
// Tile index -> (weight tile nt, token tile mt). Tiles run in groups of kGroupM token tiles: inside
// a group token tiles are fastest, so a wave of CTAs shares few activation rows and many weight
// tiles (the activations are the larger stream: TOK x 128 x 2 bytes per k-block against 8 KB of
// codes), which keeps both in L2.
constexpr int kGroupM = LUTMM_EXPERIMENT == 5 ? (1 << 20) : 4;
__device__ __forceinline__ void tile_coords(int tile, int m_tiles, int n_tiles, int& nt, int& mt) {
  const int group = tile / (kGroupM * n_tiles), r = tile - group * kGroupM * n_tiles;
  const int gm = min(kGroupM, m_tiles - group * kGroupM);
  nt = r / gm;
  mt = group * kGroupM + (r - nt * gm);
}

// This CTA's work: whole data-parallel tiles cta, cta + grid, ... below dp_tiles, then iterations [sk_begin, sk_end) of the
// Stream-K tiles (k-blocks of tiles dp_tiles.. flattened, k innermost). Position pos counts both;
// next() advances (tile, kb) by one position with a division only at tile changes.
// Split-K clusters (split > 1): CTA c takes k-blocks [r CB / split, (r + 1) CB / split) of tile
// c / split, r = c % split (its rank in the cluster), and nothing else.
struct WorkCursor {
  int grid, cta, CB, dp_tiles, dp_iters, sk_begin, n_iters, split, split_kb0;
  int64_t sk_total;
  int pos = 0, tile = 0, kb = 0;
  template <typename T>
  __device__ WorkCursor(const WgParams<T>& p) {
    grid = gridDim.x; cta = blockIdx.x; CB = p.col_blocks; dp_tiles = p.dp_tiles; split = p.split;
    if (split > 1) {
      const int r = cta % split;
      split_kb0 = r * CB / split;
      n_iters = (r + 1) * CB / split - split_kb0;
      dp_iters = sk_begin = 0;
      sk_total = 0;
    } else {
      dp_iters = (cta < p.dp_tiles ? (p.dp_tiles - 1 - cta) / grid + 1 : 0) * CB;  // tiles cta, cta + grid, ...
      sk_total = int64_t(p.tiles - p.dp_tiles) * CB;
      sk_begin = int(sk_start(cta, sk_total, grid));
      n_iters = dp_iters + int(sk_start(cta + 1, sk_total, grid)) - sk_begin;
    }
    seek(0);
  }
  __device__ void seek(int at) {
    pos = at;
    if (split > 1) {
      tile = cta / split;
      kb = split_kb0 + pos;
    } else if (pos < dp_iters) {
      tile = cta + (pos / CB) * grid;
      kb = pos % CB;
    } else {
      const int i = sk_begin + (pos - dp_iters);
      tile = dp_tiles + i / CB;
      kb = i % CB;
    }
  }
  __device__ __forceinline__ void next() {
    if (++kb == CB) seek(pos + 1);
    else ++pos;
  }
};

#endif  // LUTMM_SM90A

}  // namespace wgk
}  // namespace gpu
}  // namespace lutmm
