// The prefill kernel (large M): Y (M x N) = X (M x K) * W_hat^T on Hopper's warpgroup tensor cores
// (wgmma, sm_90a), reading the same packed weights and pair table as the decode kernel (lut_gemm.cu).
//
// * Roles. A CTA has two consumer warpgroups (warps 0-7) and a producer warpgroup (warps 8-11, of
//   which one thread works; setmaxnreg moves its registers to the consumers: 232 each). It owns a
//   tile of 128 weight rows x TOK tokens (TOK = 64 for M <= 64, 128 for M <= 128, else 256); at
//   TOK = 64 on shapes with enough k-blocks, two CTAs share an SM (104 registers per consumer
//   thread, 3-6 stages), so twice the warps hide the lookups' latency. Consumer warp w looks up row block w
//   (16 rows) through the decode kernel's pair table straight into wgmma's A registers (the
//   A-from-registers fragment of a warp's 16 rows is the mma.m16n8k16 A fragment); warpgroup g
//   multiplies rows 64g..64g+63 by the TOK tokens (wgmma's N side, B from shared memory): one
//   wgmma.m64nTOKk16 per k-step of 16 columns. The producer's lane 0 fills the pipeline stages with
//   TMA (activations) and bulk copies (codes, scales), all completing on the stage's mbarrier.
// * Scales before the MMA. A per-group fp32 partial sum, as the decode kernel keeps, would double the
//   TOK / 2 accumulators per thread; instead each looked-up pair is multiplied by its row's scale and
//   rounded once to the activation dtype (PairScaler): the values the dequant path (dequant.cu)
//   hands to cuBLAS (fp16 exactly, bf16 up to 1 ulp in ~0.4% of the weights). Except where the
//   registers allow the partial sum (TOK <= 128, one CTA per SM) and a group spans whole k-blocks
//   (g >= 128): there the wgmmas take the unscaled table values into a per-k-block sum that is
//   scaled in fp32 after the k-block's drain (the decode kernel's rounding), 13 instead of 33 SASS
//   instructions per k-step. (H100, 2026-11-26, lutmm_bench A/B, 4-bit g128: M = 128 -3.6..-4.6% on
//   four shapes, M = 64 -4.5..-7% where one CTA per SM runs, 3 and 2 bits -2..0%.)
// * Activations in natural order, codes gathered per quad. The packed layout permutes the columns
//   of each 32-column chunk (docs/format.md) so that a decode-kernel lane's activations are one
//   16-byte load; wgmma wants B in natural k order. Rather than permuting the activations, each lane
//   reads the code words of all four lanes of its quad (same rows) and picks, with per-lane byte
//   selectors, the codes of the natural-order columns it owns in wgmma's A fragment: one extra
//   select per k-step, and the activations are plain TMA tiles with the 128-byte swizzle (rows at or
//   beyond M and columns at or beyond K arrive as zeros).
//   (H100, 2026-11-26: the first version permuted the activations with one 4-byte cp.async per pair;
//   Nsight Compute counted ~1030 instructions per warp per k-block, most of them loader address
//   arithmetic, at 250 TFLOP/s; cp.async loads by all warps with 16-byte chunks still left ~460
//   loader instructions per warp and k-block in the SASS: hence the producer warp.)
// * Pipeline. 4 (TOK 256), 6 (TOK 128) or 8 (TOK 64; two CTAs per SM: as many as fit in ~113 KB)
//   stages of half a k-block each (activations | codes | scales), each with a "full" mbarrier
//   (producer -> consumers, transaction bytes) and an "empty"
//   one (one arrival per consumer warp once its wgmmas have read the stage). Each warpgroup issues
//   wgmmas as their lookups finish, one commit group per half-block (TOK 256: it waits for a half's
//   group once the next half's wgmmas are issued, then releases that half's stage, so the tensor pipe
//   never drains; TOK 64, 128: one group per k-block, waited for before releasing both stages; two
//   CTAs per SM: one group per half-block, waited for before the next half); the two
//   warpgroups run independently. The producer thread fills stages with three TMA boxes each.
// * Work split. Tiles are ordered token-tile fastest, so the CTAs of one wave share activations in
//   L2. Whole waves are data-parallel (CTA c takes tiles c, c + grid, ...); the last one to two waves
//   are spread evenly over all CTAs with Stream-K and the decode kernel's deterministic fixup (the
//   last contributor sums the partials in CTA order), so no SM idles at the tail and the output is
//   bitwise reproducible. Where there are fewer tiles than a third to a half of the SMs (M <= 256 on
//   most 70B shapes), clusters of 2-4 CTAs split each tile along K instead and add their partial
//   sums through distributed shared memory (split_k_store): no partials in global memory, no CTA
//   idling while a last contributor sums. (H100, 2026-11-26, lutmm_bench, Stream-K -> clusters:
//   8192x8192 M = 256 64.5 -> 53.8 us, M = 128 44.1 -> 38.8, 8192x28672 M = 256 166.7 -> 152.4.)
// * Files. This one: the stage layout, the lookups (compute_half), the producer, the kernel and the
//   host side; wgmma_tile.cuh: the CTA shape, parameters and tile scheduler (WorkCursor);
//   wgmma_epilogue.cuh: the split-K clusters' reduction and the stores to Y; wgmma.cuh: the PTX.

#include <algorithm>

#include "lut_table.cuh"
#include "lutmm/cuda.h"
#include "tma.cuh"
#include "wgmma.cuh"
#include "wgmma_epilogue.cuh"
#include "wgmma_tile.cuh"
#include "../plan.h"

// Kernel experiments for A/B builds (cmake -DLUTMM_EXPERIMENT=N, `EXPERIMENTS=N bash scripts/gpu.sh kab`):
//   6  never halve the tile's tokens to reach split-K clusters (src/plan.cpp)
//   10 tiles for one to two waves all on Stream-K, as before item 80 (src/plan.cpp)
//   14 no tile-aligned Stream-K (src/plan.cpp)
//   Ablations (wrong results, AB_SKIP_TESTS; docs/performance-log.md item 73), each removing one part
//   of the k-block's work to time it: 16 no table loads (4 bits: a lookup returns its address), 17 no
//   MMAs (the A registers feed one add), 27 no activation loads, 28 no code or scale loads
//   (1, 3, 4, 13, 15, 29: measured and adopted or refuted, items 72-77, 80 and 97; 1, 3, 13 and 15 now
//   name decode experiments (lut_gemm.cu's list), as do 11 (lut_stream.cu's 3-bit CTAs per SM) and 12
//   (the H200's decode rules))
//   5  tiles in plain token-tile-fastest order (no grouping; H100 2026-11-26: 5% slower at
//      8192x8192 M = 4096, equal elsewhere)
//   (retired, H100 2026-11-26, lutmm_bench A/B: TOK = 128 at M = 256 when TOK = 256 leaves most SMs without a tile:
//   4096x4096 32.7 -> 29.0 us but 8192x8192 67.7 -> 71.6 and 4096x14336 62.6 -> 70.0, not kept)
//   (retired, H100 2026-11-28, item 78: programmatic dependent launch, the producer loading the first
//   stages' codes and scales and the consumers building the table before griddepcontrol.wait:
//   M = 64 12.9 -> 13.6 us (4096x4096), 29.2 -> 30.1 (8192x8192); M = 256 50.7 -> 50.0 (8192x8192),
//   29.2 -> 28.3 (6144x4096); M = 128 17.2 -> 17.7 (4096x4096); not kept)
//   (and: 128-byte 4-bit table entries, prmt + shift, for a 5th stage with the no-drain loop: within
//   1% of the 64 KB table except 4096x14336 M = 4096 +9%, not kept)

namespace lutmm {
namespace gpu {
namespace {

using namespace wgk;  // the CTA shape, parameters and tile scheduler (wgmma_tile.cuh), the epilogue (wgmma_epilogue.cuh)


// TMA descriptors of the operands (encoded per call by wg_launch()).
struct WgMaps {
  const CUtensorMap* x;  // activations: M x K, boxes of TOK tokens x 64 columns, 128-byte swizzle
  const CUtensorMap* w;  // codes: row blocks x (col_blocks * 256 * BITS / 4) 32-bit words, boxes of 8 x kRbCodeBytes / 4
  const CUtensorMap* s;  // scales: row blocks x (G * 16) fp16, boxes of 8 x (16 * gpk)
};

// A stage holds half a k-block (64 columns): the activations as one 128-byte-swizzled K-major tile
// of TOK rows x 128 B, the codes (4 bits: the half block's 512 contiguous bytes of each row block;
// 2 and 3 bits: the whole block, whose bytes do not split by column) and the block's scales (row
// block r's gpk groups of 16 scales at r * 32 * gpk, gpk = groups_per_kblock(gl)). CTAS: CTAs per
// SM (1, or 2 at TOK = 64: twice the lookup warps per SM, with ~113 KB of shared memory and 104
// registers per consumer thread each); it changes the number of stages, not a stage's layout.
template <int BITS, int TOK, int CTAS = 1>
struct WgLayout {
  static constexpr int kCtas = CTAS;
  static_assert(CTAS == 1 || (CTAS == 2 && TOK == 64), "two CTAs per SM only with 64-token tiles");
  static constexpr int kLutBytes = lut_entries<BITS>() * 256;  // 256-byte entries (prmt addressing)
  static constexpr int kStageX = TOK * 128;
  static constexpr int kBlockBytes = 256 * BITS;
  static constexpr int kRbCodeBytes = BITS == 4 ? kBlockBytes / 2 : kBlockBytes;  // codes per row block
  static constexpr int kStageW = kWarps * kRbCodeBytes;
  static constexpr int kStageS = kWarps * kScaleBytesPerRb;
  static constexpr int kStageBytes = kStageX + kStageW + kStageS;
  static_assert(kStageBytes % 1024 == 0 && kLutBytes % 1024 == 0, "swizzle atoms must stay 1024-byte aligned");
  // The epilogue's staging buffers (store_tile, TOK >= 128): two 512-byte buffers per consumer warp.
  static constexpr int kEpiBytes = TOK >= 128 ? kWarps * 1024 : 0;
  static constexpr int kStages = kCtas == 2 ? std::min(8, (113 * 1024 - kLutBytes - 128) / kStageBytes)
                                : TOK == 256 ? 4 : TOK == 128 ? 6 : 8;  // as many as fit beside the table
  // (TOK = 64 with 12 stages (4 bits; 3 bits 14), 48 KB of codes in flight per SM instead of 32: H100,
  // 2026-11-27, item 73: 8192x8192 M = 64 30.0 -> 30.1 us, 3-bit 31.4 -> 32.1, 57344x8192 156.9 ->
  // 156.8; the loads' latency does not bind at M = 64.)
  static constexpr int kBarOffset = kLutBytes + kStages * kStageBytes;  // full[kStages], empty[kStages]
  static constexpr int kEpiOffset = (kBarOffset + 2 * 8 * kStages + 16 + 127) / 128 * 128;
  static constexpr int kSmemBytes =  // table, stages, mbarriers, flag, epilogue
      kEpiBytes ? kEpiOffset + kEpiBytes : kBarOffset + 2 * 8 * kStages + 16;
  static_assert(kSmemBytes * kCtas <= 227 * 1024 && kStages >= 3, "shared memory");
  // The split-K exchange (split_k_store) reuses the stages: C x 2 ceil(TOK / 4 / C) floats per consumer
  // thread (xslot), C <= 4.
  static_assert(kStages * kStageBytes >= kThreads * 4 * (TOK / 2 + 6), "split-K exchange buffer");
};

#if LUTMM_SM90A  // device code below exists for sm_90a only

// The codes a lane needs for wgmma's natural-order A fragments. Lane (g, t) owns, for k-step s of a
// block, columns 16 s + 2 t (+1) and 16 s + 8 + 2 t (+1) of rows g and g + 8; in the packed layout
// those pairs sit with quad lanes (g, 2 (s % 2)) and (g, 2 (s % 2) + 1), in the code word of k-step
// 2 (s / 2) + (t >> 1), at pair p = 2 (t & 1) (+1 for row g + 8). So every lane loads its quad's code
// words (broadcast loads, no bank conflicts) and selects with per-lane byte selectors (3 bits: per-lane
// funnel shifts of its code stream).
template <int BITS>
struct QuadCodes {
  uint4 w[4];   // lane (g, t)'s 16 bytes: 4 bits: of the current 16-byte chunk; 2, 3 bits: of the block
  uint2 hi[4];  // 3 bits: lane (g, t)'s other 8 bytes (the last 64 bits of its code stream)
  uint32_t sel0, sel1;  // prmt selectors: code byte -> bits 8-15, lane offset -> bits 0-7, rank -> bits 24-31
  int hsel;
  Quad3Window win3;  // 3 bits: where the lane's pairs sit in a quad lane's stream (lut_table.cuh)

  __device__ QuadCodes() {
    const int t = threadIdx.x % 4;
    hsel = t >> 1;
    if (BITS == 4) { sel0 = 0x7504u | (uint32_t(2 * (t & 1)) << 4); sel1 = sel0 + 0x10u; }
    else { sel0 = 0x7504u | (uint32_t(t) << 4); sel1 = sel0; }
    win3.init(t);
  }
  // Loads the quad's code words of a stage (4 bits: the half block's chunk; 2, 3 bits: the block).
  __device__ __forceinline__ void load(const uint8_t* wb) {
    const int g = (threadIdx.x % 32) / 4;
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      w[t] = reinterpret_cast<const uint4*>(wb)[g * 4 + t];
      if (BITS == 3) hi[t] = reinterpret_cast<const uint2*>(wb + 512)[g * 4 + t];
    }
  }
  static __device__ __forceinline__ uint32_t word(const uint4& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
  }
  // The four unscaled A registers of k-step s (compile-time, 0..7) of the block.
  __device__ __forceinline__ void lookup(int s, uint32_t lane_byte, uint32_t (&a)[4]) const {
    const int j = s / 2, v = s % 2;
    if (BITS == 4) {
      const int w0 = 2 * (j % 2);  // word of k-step 2 j inside the chunk; + hsel
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        const uint32_t src = hsel ? word(w[2 * v + q], w0 + 1) : word(w[2 * v + q], w0);
#if LUTMM_EXPERIMENT == 16  // ablation (wrong results): the table loads' cost; a lookup returns its address
        a[2 * q] = __byte_perm(src, lane_byte, sel0);
        a[2 * q + 1] = __byte_perm(src, lane_byte, sel1);
#else
        a[2 * q] = lut_load32(__byte_perm(src, lane_byte, sel0));
        a[2 * q + 1] = lut_load32(__byte_perm(src, lane_byte, sel1));
#endif
      }
    } else if (BITS == 2) {  // byte t of word j is the quad (rows g, g + 8)
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        const uint2 r = lut_load64(__byte_perm(word(w[2 * v + q], j), lane_byte, sel0));
        a[2 * q] = r.x;
        a[2 * q + 1] = r.y;
      }
    } else {  // 3 bits: 12 bits (the pairs of rows g, g + 8) from quad lane 2 v + q's stream, one funnel shift
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        const uint4& lw = w[2 * v + q];
        const uint2& hw = hi[2 * v + q];
        const uint32_t st[6] = {lw.x, lw.y, lw.z, lw.w, hw.x, hw.y};
        const uint32_t x = win3(st, j);
        a[2 * q] = lut_load32(((x << 8) & 0x3f00u) | lane_byte);
        a[2 * q + 1] = lut_load32(((x << 2) & 0x3f00u) | lane_byte);
      }
    }
  }
};

// A 32-column chunk's scales of rows g and g + 8, ready to multiply looked-up value pairs.
template <typename T> struct PairScaler;
template <> struct PairScaler<__half> {
  __half2 s[2];  // (s_r, s_r) for rows g (r = 0), g + 8 (r = 1)
  __device__ __forceinline__ void set(__half2 sh) { s[0] = __low2half2(sh); s[1] = __high2half2(sh); }
  // fp16 x fp16 is exact in fp32, so one fp16 multiply rounds exactly as the fp32 product would.
  __device__ __forceinline__ uint32_t apply(uint32_t v, int r) const {
    __half2 x = __hmul2(*reinterpret_cast<__half2*>(&v), s[r]);
    return *reinterpret_cast<uint32_t*>(&x);
  }
};
// bf16: s = hi + lo with hi = bf16(s) and lo = s - hi, exact in bf16 (an fp16 scale has 3 more
// mantissa bits than bf16); v * s = fma(v, hi, bf16(v * lo)) rounds once, up to the 2^-17 relative
// error of v * lo: about 0.4% of the weights come out 1 ulp away from the dequant path's round(v * s).
// 2 instructions per register instead of 5 (unpack, 2 fp32 multiplies, pack).
template <> struct PairScaler<__nv_bfloat16> {
  __nv_bfloat162 hi[2], lo[2];
  __device__ __forceinline__ void set(__half2 sh) {
    const float2 f = __half22float2(sh);
    const __nv_bfloat16 h0 = __float2bfloat16_rn(f.x), h1 = __float2bfloat16_rn(f.y);
    const __nv_bfloat16 l0 = __float2bfloat16_rn(f.x - __bfloat162float(h0));
    const __nv_bfloat16 l1 = __float2bfloat16_rn(f.y - __bfloat162float(h1));
    hi[0] = __halves2bfloat162(h0, h0); hi[1] = __halves2bfloat162(h1, h1);
    lo[0] = __halves2bfloat162(l0, l0); lo[1] = __halves2bfloat162(l1, l1);
  }
  __device__ __forceinline__ uint32_t apply(uint32_t v, int r) const {
    const __nv_bfloat162 x = *reinterpret_cast<__nv_bfloat162*>(&v);
    __nv_bfloat162 y = __hfma2(x, hi[r], __hmul2(x, lo[r]));
    return *reinterpret_cast<uint32_t*>(&y);
  }
};

// Half H (compile-time) of a k-block of the CTA's tile: warpgroup g adds rows 64 g..64 g + 63 x TOK
// tokens to acc, issuing 4 wgmmas (the caller commits and waits). stage_addr: the
// stage's shared-memory address; glc = min(gl, 2): the scale slot of 32-column chunk j is j >> glc;
// chunks at or beyond `nchunks` lie past K (their scale slots are stale: use 0).
template <int BITS, int TOK, typename T, int H, bool AFTER = false>
__device__ __forceinline__ void compute_half(const uint8_t* stage, uint32_t stage_addr, int glc, int nchunks,
                                             QuadCodes<BITS>& qc, PairScaler<T>& sc, uint32_t (&a)[4][4],
                                             float (&acc)[TOK / 2]) {
  // AFTER: the looked-up values go to the wgmma unscaled; acc is the k-block's partial sum, which the
  // caller scales into the real accumulators.
  using L = WgLayout<BITS, TOK>;  // a stage's layout does not depend on CTAS
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4;
  const uint8_t* ss = stage + L::kStageX + L::kStageW + warp * (128 >> glc);  // 32 * gpk bytes per row block
  // The lane's table column, and in a cluster launch the CTA's rank in bits 24-31 of every shared
  // address (H100: rank r's shared window starts at r << 24; an address without it faults), which
  // the lookups' prmt carries along: the table stays the loads' immediate offset.
  const uint32_t lane_byte = uint32_t(lane) * (BITS == 2 ? 8u : 4u) | (stage_addr & 0xff000000u);
  const uint64_t desc0 = wg::desc_sw128(stage_addr);  // + (byte offset >> 4) for each k-step
  // AFTER: the k-block's first wgmma overwrites the partial sum (scale-d = 0) instead of the kernel
  // zeroing it after each k-block (TOK / 2 moves per thread and k-block; sm_90a 4-bit TOK = 64: 273 ->
  // 241 instructions per k-block). (H100, 2026-11-27, lutmm_bench A/B, item 72: 8192x8192 M = 64
  // 30.7 -> 30.1 us, M = 128 38.7 -> 37.3, 28672x4096 M = 128 70.6 -> 68.0; predicted 27-29 at M = 64.
  // One wgmma fence per half-block on top of it (8 -> 2 per k-block) gained nothing: 30.3, 38.2, 68.1.)
  qc.load(stage + L::kStageX + warp * L::kRbCodeBytes);
  // All 16 table loads of the half first, then scaling and wgmmas: one load latency per half.
  // (H100, 2026-11-26, lutmm_bench A/B against a lookup right before each k-step's wgmma: M = 128
  // -2.5..-3.3% on three shapes, M = 1024 -1.5%, M = 64 and 256 within 1-2%; ptxas had already
  // overlapped most of it, the prediction was 10-25% at M <= 128.)
#pragma unroll
  for (int s = 4 * H; s < 4 * H + 4; ++s) qc.lookup(s, lane_byte, a[s % 4]);
#pragma unroll
  for (int s = 4 * H; s < 4 * H + 4; ++s) {
    // Scales of rows g, g + 8 for chunk s / 2, set when they change: every chunk (g = 32), every half
    // block (g = 64), once per k-block (g >= 128), and at the first chunk past K (zeros).
    // (H100, 2026-11-26, lutmm_bench A/B against setting them every chunk: M = 64 -5..-9%, M = 128
    // -3..-5%, M = 1024 -2%, M = 256 flat; 4-bit g128.)
    const bool fresh = s == 0 || (s == 4 && glc < 2) || glc == 0 || s / 2 >= nchunks;
    if (!AFTER && s % 2 == 0 && fresh)
      sc.set(s / 2 < nchunks ? *reinterpret_cast<const __half2*>(ss + ((s / 2) >> glc) * 32 + g * 4)
                             : __floats2half2_rn(0.f, 0.f));
    uint32_t(&r)[4] = a[s % 4];
    if (!AFTER) {
      r[0] = sc.apply(r[0], 0);  // row g
      r[1] = sc.apply(r[1], 1);  // row g + 8
      r[2] = sc.apply(r[2], 0);
      r[3] = sc.apply(r[3], 1);
    }
#if LUTMM_EXPERIMENT == 17  // ablation (wrong results): the MMAs' cost; the A registers feed one add instead
    acc[s % (TOK / 2)] += __uint_as_float((r[0] ^ r[1] ^ r[2] ^ r[3]) & 0x3fffffffu);
#else
    wg::fence();
    wg::Mma<TOK, T>::run(acc, r, desc0 + uint64_t(((s % 4) * 32) >> 4), AFTER && s == 0 ? 0 : 1);
#endif
  }
}

// The producer: thread 0 of warp 8 fills stage q % S with half-block q (two per position), after
// the consumers have released its previous use: three TMA boxes (activations; the codes of the
// tile's 8 row blocks; their scales), whole boxes counted on the stage's full barrier (rows past
// the weight, columns past K and groups past G arrive as zeros).
// (H100, 2026-11-26, Nsight Compute, 8192x8192 M = 4096: with one bulk copy per row block for codes
// and scales, 17 copies per half-block at ~10 instructions each (ptxas moves every copy's operands
// through uniform registers in an elect loop), the producer was busy ~95% of the time and the
// consumers waited on full barriers in 31% of their samples.)
template <int BITS, int TOK, int CTAS, typename T>
__device__ __forceinline__ void produce(const WgParams<T>& p, const WgMaps& maps, uint32_t smem_base) {
  using L = WgLayout<BITS, TOK, CTAS>;
  constexpr int S = L::kStages;
  const int gpk = groups_per_kblock(p.gl);  // scale groups per k-block (the scale box width)
  // Ablations (wrong results): experiment 27 loads no activations, 28 no codes and scales.
  constexpr bool kLoadX = LUTMM_EXPERIMENT != 27, kLoadW = LUTMM_EXPERIMENT != 28;
  const uint32_t stage_bytes = (kLoadX ? L::kStageX : 0) + (kLoadW ? L::kStageW + kWarps * 32 * gpk : 0);
  WorkCursor wc(p);
  int q = 0;
  for (; wc.pos < wc.n_iters; wc.next()) {
    int nt, mt;
    tile_coords(wc.tile, p.m_tiles, p.n_tiles, nt, mt);
    for (int h = 0; h < 2; ++h, ++q) {
      const int st = q % S, use = q / S;
      const uint32_t full = smem_base + L::kBarOffset + 8 * st, empty = full + 8 * S;
      if (use > 0) wg::mbar_wait(empty, (use - 1) & 1);
      wg::mbar_arrive_expect_tx(full, stage_bytes);
      const uint32_t stage = smem_base + L::kLutBytes + st * L::kStageBytes;
      if (kLoadX) wg::tma_load_2d(stage, maps.x, wc.kb * kBlockCols + 64 * h, mt * TOK, full);
      if (kLoadW) {
        wg::tma_load_2d(stage + L::kStageX, maps.w,
                        (wc.kb * L::kBlockBytes + (BITS == 4 ? h * L::kRbCodeBytes : 0)) / 4, nt * kWarps, full);
        wg::tma_load_2d(stage + L::kStageX + L::kStageW, maps.s, ((wc.kb * 4) >> p.gl) * 16, nt * kWarps, full);
      }
    }
  }
}

#endif  // LUTMM_SM90A

// The kernel. BITS: code width (2, 3, 4); TOK: tokens per tile (64, 128, 256); CTAS: CTAs per SM (1;
// 2 at TOK = 64); T: activation dtype (__half, __nv_bfloat16); AFTER: scales after the MMA (one
// group per k-block, g >= 128; TOK <= 128, CTAS = 1). p: shapes, pointers, work split (WgParams);
// tmap_x / tmap_w / tmap_s: TMA descriptors of X (M x K), the packed codes and the packed scales.
template <int BITS, int TOK, int CTAS, typename T, bool AFTER = false>
__global__ void __launch_bounds__(kCtaThreads, CTAS)
lut_wgmma_kernel(const WgParams<T> p, const __grid_constant__ CUtensorMap tmap_x,
                 const __grid_constant__ CUtensorMap tmap_w, const __grid_constant__ CUtensorMap tmap_s) {
#if LUTMM_SM90A
  using L = WgLayout<BITS, TOK, CTAS>;
  constexpr int kAcc = TOK / 2;  // fp32 accumulators per thread
  constexpr int S = L::kStages;
  extern __shared__ __align__(1024) uint8_t smem[];
  uint8_t* lut = smem;  // first, at shared address kTableAddr (checked): lookups add no base
  // This CTA's shared address of smem: kTableAddr, plus rank << 24 in a cluster launch (see compute_half).
  const uint32_t smem_base = smem_addr(smem);
  check_table_addr(smem);
  uint8_t* stages = smem + L::kLutBytes;
  const uint32_t bars = smem_base + L::kBarOffset;  // full[S], then empty[S]
  int* flag = reinterpret_cast<int*>(smem + L::kBarOffset + 16 * S);
  const uint32_t epi = smem_base + L::kEpiOffset;  // store_tile's buffers (TOK >= 128)
  const int warp = threadIdx.x / 32;

  if (threadIdx.x == 0) {
    for (int st = 0; st < S; ++st) {
      wg::mbar_init(bars + 8 * st, 1);            // the producer's arrive.expect_tx
      wg::mbar_init(bars + 8 * (S + st), kWarps);  // one arrival per consumer warp
    }
    wg::mbar_init_fence();
  }
  if (warp < kWarps) build_table<BITS, 256, kThreads, T>(lut, p.table);
  __syncthreads();
  if (warp >= kWarps) {
    // Registers per thread after setmaxnreg (the CTA's pool: 168 (1 CTA) or 80 (2 CTAs) x 384
    // threads): producer 40 or 24, consumers 232 or 104.
    wg::regs_dec<CTAS == 2 ? 24 : 40>();
    if (threadIdx.x == kThreads) produce<BITS, TOK, CTAS, T>(p, WgMaps{&tmap_x, &tmap_w, &tmap_s}, smem_base);
    if (CTAS == 1 && p.split > 1) {  // the two cluster barriers of split_k_store
      wg::cluster_sync();
      wg::cluster_sync();
    }
    return;
  }
  wg::regs_inc<CTAS == 2 ? 104 : 232>();

  QuadCodes<BITS> qc;
  float acc[kAcc];
#pragma unroll
  for (int e = 0; e < kAcc; ++e) acc[e] = 0.f;
  const int glc = min(p.gl, 2);
  WorkCursor wc(p);
  const int grid = wc.grid, cta = wc.cta, CB = wc.CB;
  int q = 0;  // half-blocks consumed
  auto release = [&](int st) {
    __syncwarp();
    if (threadIdx.x % 32 == 0) wg::mbar_arrive(bars + 8 * (S + st));  // this warp is done with the stage
  };
  // Two CTAs per SM: one commit group per half-block, drained before the next half (3 stages at
  // 4 and 2 bits leave no room to hold a whole k-block).
  constexpr bool kHalfDrain = CTAS == 2;
  uint32_t a0[4][4], a1_[4][4];  // A registers of the two halves (kHalfDrain: half 1 reuses a0)
  uint32_t(&a1)[4][4] = kHalfDrain ? a0 : a1_;
  PairScaler<T> sc;
  // AFTER (g >= 128, one CTA per SM, TOK <= 128): wgmmas sum a k-block's unscaled products in
  // tmp (its first overwrites); after the k-block's drain acc += s_row * tmp (one group per k-block).
  static_assert(!AFTER || (CTAS == 1 && TOK <= 128), "scales after the MMA: one CTA per SM, TOK <= 128");
  float tmp[kAcc];  // unused (and dropped by the compiler) unless AFTER
#pragma unroll
  for (int e = 0; e < kAcc; ++e) tmp[e] = 0.f;
  float(&dst)[kAcc] = AFTER ? tmp : acc;  // the wgmmas' D

  while (wc.pos < wc.n_iters) {
    // One segment: k-blocks seg_kb0..kb of `tile` (a whole tile, or a Stream-K piece of one).
    // (Earlier, while the producer could not keep up (item 21 of docs/performance-log.md), H100
    // 2026-11-26: committing and waiting per half-block was 5% slower at 8192x8192 M = 4096; a
    // half-block's group left running across the next half's lookups made ptxas serialize the wgmmas
    // (C7513) in that code; a whole k-block's group left running (wait_group 1, stages released one
    // k-block later) was 15-22% slower at M >= 1024.)
    const int seg_kb0 = wc.kb, seg_len = min(CB - wc.kb, wc.n_iters - wc.pos);
    // TOK = 256: one commit group per half-block, waited for (wait_group 1) once the next half's
    // wgmmas are issued, so the tensor pipe does not drain between k-blocks; a stage is released half
    // a block later. (H100, 2026-11-26, lutmm_bench A/B in two calls: M = 1024 -3..-5% on all four
    // shapes in both, M = 256 within 1-3%, M = 4096 -6..+6% (mean ~0). At TOK = 128 (M <= 128) with
    // 7 stages it was 2-4% slower: there each k-block is one group, drained before its stages go.)
    constexpr bool kNoDrain = TOK == 256;
    int pending = -1;  // kNoDrain: stage of the half-block whose wgmmas may still run
    for (int i = 0; i < seg_len; ++i, q += 2) {
      const int nchunks = min(4, (p.K - (seg_kb0 + i) * kBlockCols) / 32);
      const int st0 = q % S, st1 = (q + 1) % S;
      wg::mbar_wait(bars + 8 * st0, (q / S) & 1);
      compute_half<BITS, TOK, T, 0, AFTER>(stages + st0 * L::kStageBytes,
                                           smem_base + L::kLutBytes + uint32_t(st0) * L::kStageBytes, glc, nchunks, qc,
                                           sc, a0, dst);
      if (kNoDrain) {
        wg::commit();
        if (pending >= 0) { wg::wait<1>(); release(pending); }
      }
      if (kHalfDrain) {
        wg::commit();
        wg::wait<0>();
        release(st0);
      }
      wg::mbar_wait(bars + 8 * st1, ((q + 1) / S) & 1);
      compute_half<BITS, TOK, T, 1, AFTER>(stages + st1 * L::kStageBytes,
                                           smem_base + L::kLutBytes + uint32_t(st1) * L::kStageBytes, glc, nchunks, qc,
                                           sc, a1, dst);
      wg::commit();
      if (kHalfDrain) {
        wg::wait<0>();
        release(st1);
      } else if (kNoDrain) {
        wg::wait<1>();
        release(st0);
        pending = st1;
      } else {
        wg::wait<0>();
        if (AFTER) {  // acc += s * tmp with the k-block's scales (slot 0 of compute_half's ss; glc = 2), rows g, g + 8
          wg::fence_operands(dst);
          const int g = (threadIdx.x % 32) / 4;
          const float2 s2 = __half22float2(*reinterpret_cast<const __half2*>(
              stages + st0 * L::kStageBytes + L::kStageX + L::kStageW + warp * 32 + g * 4));
#pragma unroll
          for (int e = 0; e < kAcc; ++e) {
            acc[e] = fmaf(dst[e], (e / 2) % 2 ? s2.y : s2.x, acc[e]);  // acc[4 j + 2 i + e']: row g + 8 i;
            // dst needs no zeroing: the next k-block's first wgmma overwrites it (compute_half)
          }
        }
        release(st0);
        release(st1);
      }
    }
    if (kNoDrain) {
      wg::wait<0>();
      release(pending);
    }
    wc.seek(wc.pos + seg_len - 1);  // the segment's last k-block

    const int kb = wc.kb, tile = wc.tile;
    {
      wg::fence_operands(acc);
      int nt, mt;
      tile_coords(tile, p.m_tiles, p.n_tiles, nt, mt);
      if (CTAS == 1 && p.split > 1) {  // one segment per CTA: its k-blocks of the cluster's tile (never at CTAS = 2)
        const float* xbuf = reinterpret_cast<const float*>(stages);
        const uint32_t xaddr = smem_base + L::kLutBytes;
        if (p.split == 2) split_k_store<TOK, T, 2>(p, nt, mt, acc, xbuf, xaddr, epi);
        else if (p.split == 3) split_k_store<TOK, T, 3>(p, nt, mt, acc, xbuf, xaddr, epi);
        else split_k_store<TOK, T, 4>(p, nt, mt, acc, xbuf, xaddr, epi);
      } else if (seg_kb0 == 0 && kb == CB - 1) {
        store_tile<TOK>(p, nt, mt, acc, epi);
      } else {
        // Stream-K fixup (as lut_gemm.cu): publish this partial, the last contributor sums them all.
        const int sk_tile = tile - p.dp_tiles;
        const int64_t tile_begin = int64_t(sk_tile) * CB, tile_end = tile_begin + CB;
        const int slot = tile_begin + seg_kb0 == wc.sk_begin ? 0 : 1;
        const int64_t part_elems = int64_t(kThreads) * kAcc;
        float* mine = p.partials + (int64_t(cta) * 2 + slot) * part_elems;
#pragma unroll
        for (int e = 0; e < kAcc; ++e) mine[e * kThreads + threadIdx.x] = acc[e];
        const int first = sk_owner(tile_begin, wc.sk_total, grid), last = sk_owner(tile_end - 1, wc.sk_total, grid);
        if (arrive_last(p.counters + sk_tile, last - first + 1, threadIdx.x, flag,
                        [] { wg::named_sync(1, kThreads); })) {
#pragma unroll
          for (int e = 0; e < kAcc; ++e) acc[e] = 0.f;
          for (int c = first; c <= last; ++c) {
            const int cslot = tile_begin <= sk_start(c, wc.sk_total, grid) ? 0 : 1;
            const float* src = p.partials + (int64_t(c) * 2 + cslot) * part_elems;
#pragma unroll
            for (int e = 0; e < kAcc; ++e) acc[e] += __ldcg(src + e * kThreads + threadIdx.x);
          }
          store_tile<TOK>(p, nt, mt, acc, epi);
        }
      }
#pragma unroll
      for (int e = 0; e < kAcc; ++e) acc[e] = 0.f;
    }
    wc.next();
  }
#endif
}

// ---- host side ---------------------------------------------------------------------------------

// A call's plan (src/plan.cpp) and its device.
struct WgGeometry : WgPlan {
  int device;  // the current device (asked once per call)
};
static_assert(kWarps == kWgTileRowBlocks, "the plan's tiles are the kernel's 8 row blocks");

// Launch configuration of `grid` CTAs of the wgmma kernel with `smem_bytes` of dynamic shared memory,
// in clusters of `cluster` CTAs (1: no clusters); `attr` holds the cluster attribute.
cudaLaunchConfig_t wg_config(int grid, int smem_bytes, cudaStream_t stream, int cluster, cudaLaunchAttribute (&attr)[1]) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(unsigned(grid));
  cfg.blockDim = dim3(kCtaThreads);
  cfg.dynamicSmemBytes = size_t(smem_bytes);
  cfg.stream = stream;
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = unsigned(cluster);
  attr[0].val.clusterDim.y = attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = cluster > 1 ? 1 : 0;
  return cfg;
}

// What the plan needs of `device` (cached per device): its SM count, and how many clusters of 2, 3
// and 4 one-CTA-per-SM CTAs of the wgmma kernel run at once (how many GPCs hold that many free SMs).
const WgDeviceLimits& wg_limits(int device) {
  static PerDevice<WgDeviceLimits> cache;
  return cache.get(device, [&] {
    WgDeviceLimits d;
    d.sms = sm_count(device);
    using L = WgLayout<4, 256, 1>;  // the largest; every one-CTA-per-SM variant packs SMs alike
    auto* kernel = &lut_wgmma_kernel<4, 256, 1, __nv_bfloat16>;
    allow_dynamic_smem(reinterpret_cast<const void*>(kernel), L::kSmemBytes, device);
    const std::array<int, 9> n = max_clusters(kernel, kCtaThreads, L::kSmemBytes, device);  // common.cuh
    for (int size = 2; size <= 4; ++size) d.max_clusters[size] = std::max(n[size], 0);
    return d;
  });
}

// The plan of a call on `device` (src/plan.cpp, with the device's limits from wg_limits).
WgGeometry wg_geometry(int64_t M, const Shape& s, int device, bool allow_split) {
  WgDeviceLimits sms_only;  // Stream-K plans need no cluster limits (nor an sm_90 device to ask them of)
  if (!allow_split) sms_only.sms = sm_count(device);
  WgGeometry g;
  static_cast<WgPlan&>(g) = wg_plan(M, s, allow_split ? wg_limits(device) : sms_only, allow_split);
  g.device = device;
  return g;
}

size_t wg_counters_bytes(const WgGeometry& g) { return counter_region_bytes(g.sk_tiles()); }
size_t wg_partials_bytes(const WgGeometry& g) {
  return g.sk_tiles() == 0 ? 0 : size_t(g.grid) * 2 * kThreads * (g.tok / 2) * 4;
}

// TMA descriptor of X (M x K, row-major): boxes of 64 columns x TOK rows, 128-byte swizzle, zeros
// outside the tensor. (Boxes of M rows at M < TOK were no faster: 28672x4096 M = 100 67.9 -> 67.7 us,
// 8192x8192 M = 200 56.3 -> 57.8, H200 2026-11-28, experiment 1 of item 97.)
CUtensorMap x_tensor_map(const void* x, DType dt, int64_t M, int64_t K, int tok) {
  return tensor_map_2d(x, dt == DType::F16 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, M, K,
                       K * 2, tok, 64, CU_TENSOR_MAP_SWIZZLE_128B, "x");
}

template <int BITS, int TOK, int CTAS, typename T, bool AFTER = false>
void wg_launch(const GemmProblem& prob, const WgGeometry& geo, void* ws, cudaStream_t stream) {
  using L = WgLayout<BITS, TOK, CTAS>;
  auto* kernel = &lut_wgmma_kernel<BITS, TOK, CTAS, T, AFTER>;
  allow_dynamic_smem(reinterpret_cast<const void*>(kernel), L::kSmemBytes, geo.device);
  WgParams<T> p;
  fill_gemm_params(p, prob, ws, wg_counters_bytes(geo));
  const Shape& s = prob.shape;
  p.m_tiles = geo.m_tiles; p.n_tiles = geo.n_tiles; p.tiles = geo.tiles; p.dp_tiles = geo.dp_tiles; p.split = geo.split;
  p.y_vec = reinterpret_cast<uintptr_t>(prob.y) % 16 == 0 && s.N % 8 == 0;
  const CUtensorMap tm_x = x_tensor_map(prob.x, prob.dtype, prob.M, s.K, TOK);
  const CUtensorMap tm_w = codes_tensor_map<BITS>(prob, kWarps, L::kRbCodeBytes / 4);  // a half-stage's codes
  const CUtensorMap tm_s = scales_tensor_map(prob, kWarps);
  cudaLaunchAttribute attr[1];
  const cudaLaunchConfig_t cfg = wg_config(geo.grid, L::kSmemBytes, stream, geo.split, attr);
  check_cuda(cudaLaunchKernelEx(&cfg, kernel, p, tm_x, tm_w, tm_s), "lut_wgmma_kernel launch");
}

template <int TOK, int CTAS, typename T, bool AFTER = false>
void wg_launch_bits(const GemmProblem& prob, const WgGeometry& geo, void* ws, cudaStream_t st) {
  with_bits(prob.shape.bits, [&](auto b) { wg_launch<decltype(b)::value, TOK, CTAS, T, AFTER>(prob, geo, ws, st); });
}
template <typename T>
void wg_launch_tok(const GemmProblem& prob, const WgGeometry& geo, void* ws, cudaStream_t st) {
  if (geo.scales_after) {  // the plan's rule (src/plan.cpp); implies one CTA per SM, TOK <= 128
    if (geo.tok == 64) wg_launch_bits<64, 1, T, true>(prob, geo, ws, st);
    else wg_launch_bits<128, 1, T, true>(prob, geo, ws, st);
    return;
  }
  if (geo.tok == 64 && geo.ctas == 2) wg_launch_bits<64, 2, T>(prob, geo, ws, st);
  else if (geo.tok == 64) wg_launch_bits<64, 1, T>(prob, geo, ws, st);
  else if (geo.tok == 128) wg_launch_bits<128, 1, T>(prob, geo, ws, st);
  else wg_launch_bits<256, 1, T>(prob, geo, ws, st);
}

}  // namespace

bool wgmma_supported(int device) {
  static PerDevice<bool> cache;
  if (device < 0 || device >= PerDevice<bool>::kMaxDevices) return false;
  return cache.get(device, [&] {
    cudaDeviceProp prop{};
    bool ok = cudaGetDeviceProperties(&prop, device) == cudaSuccess && prop.major == 9 && prop.minor == 0;
    cudaFuncAttributes attr{};  // the sm_90a image must be in this build
    ok = ok && cudaFuncGetAttributes(&attr, &lut_wgmma_kernel<4, 256, 1, __nv_bfloat16>) == cudaSuccess &&
         attr.binaryVersion == 90;
    cudaGetLastError();
    return ok;
  });
}

size_t wgmma_workspace_bytes(int64_t M, const Shape& shape, int device) {
  validate_shape(shape);
  const WgGeometry g = wg_geometry(M, shape, device, false);  // Stream-K's need covers the split-K one (none)
  return wg_counters_bytes(g) + wg_partials_bytes(g);
}

int wgmma_cluster_size(int64_t M, const Shape& shape, int device) {
  validate_shape(shape);
  if (!wgmma_supported(device)) return 1;
  return wg_geometry(M, shape, device, true).split;
}

void wgmma_gemm(const GemmProblem& prob, void* ws, size_t ws_bytes, void* stream, WgSplit split) {
  validate_problem(prob);
  if (prob.rms_norm || prob.residual)
    throw Error("rms_norm / residual: the wgmma path does not take them (the kLut path does)");
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  if (!wgmma_supported(dev))
    throw Error("wgmma path: needs an sm_90 (Hopper) GPU and a build with sm_90a code; use the lut or dequant path");
  const WgGeometry geo = wg_geometry(prob.M, prob.shape, dev, split == WgSplit::kAuto);
  check_workspace(ws, ws_bytes, wg_counters_bytes(geo) + wg_partials_bytes(geo), "wgmma_workspace_bytes()");
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (prob.dtype == DType::F16) wg_launch_tok<__half>(prob, geo, ws, st);
  else wg_launch_tok<__nv_bfloat16>(prob, geo, ws, st);
}

}  // namespace gpu
}  // namespace lutmm
