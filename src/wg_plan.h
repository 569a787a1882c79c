// Work split of the wgmma prefill kernel (src/cuda/lut_wgmma.cu): tile width, CTAs per SM, and how
// the (tile, k-block) iterations go to CTAs. Pure host logic on a few device limits, so the rules
// are tested on the CPU (tests/cpp/test_plan.cpp) as well as timed on the GPU.
#pragma once
#include <cstdint>

#include "lutmm/format.h"

namespace lutmm {
namespace gpu {

constexpr int kWgTileRowBlocks = 8;  // 16-row blocks per tile (the kernel's 8 consumer warps): 128 weight rows

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
  int sk_tiles() const { return tiles - dp_tiles; }
};

// Tokens per tile for M (before any halving to reach clusters).
int wg_tok_for(int64_t M);
// The plan for Y (M x N) = X W^T on a device with limits `d`. allow_split = false: data-parallel
// waves + plain Stream-K only (WgSplit::kStreamK; also the workspace bound: no plan needs more).
WgPlan wg_plan(int64_t M, const Shape& s, const WgDeviceLimits& d, bool allow_split);

}  // namespace gpu
}  // namespace lutmm
