// The wgmma prefill kernel's (lut_wgmma.cu) epilogue: a tile's accumulators to Y (store_tile), and
// the split-K clusters' reduction through distributed shared memory before it (split_k_store). The
// ownership and staging-buffer algebra (xowner, xslot, epi_offset) is host-visible and tested on the
// host (tests/cpp/test_layout.cu).
#pragma once
#include "wgmma_tile.cuh"

namespace lutmm {
namespace gpu {
namespace wgk {

// Split-K clusters of C CTAs (split_k_store): accumulator a of a thread is summed and stored by rank
// xowner(a), in slot xslot(a) of the exchange buffer. a and a + 2 (a % 4 < 2: rows g and g + 8 of one
// token, Epilogue::kSiluMul's gate and up) share a rank, so the rank storing one holds both.
__host__ __device__ constexpr int xpair(int a) { return a / 4 * 2 + a % 2; }
template <int C>
__host__ __device__ constexpr int xowner(int a) { return xpair(a) % C; }
template <int C>
__host__ __device__ constexpr int xslot(int a) { return xpair(a) / C * 2 + a / 2 % 2; }

// The staging buffer of store_tile (TOK >= 128), one 512-byte buffer per warp and 16 tokens: byte
// offset of the 16 outputs (rows i * 8 .. i * 8 + 7 of the warp's 16) of token tau (0..15). Row tau
// holds 32 bytes; its halves swap on rows with tau & 4, so that the 8 rows of one stmatrix 8x8
// matrix (tau = 8 b .. 8 b + 7, one i) and the 8 lanes of a quarter warp reading 16 bytes each
// (tau = 4 q .. 4 q + 3, both i) each cover the 32 banks once (tests/cpp/test_layout.cu).
__host__ __device__ constexpr uint32_t epi_offset(int tau, int i) {
  return uint32_t(tau * 32 + ((i ^ (tau >> 2)) & 1) * 16);
}

#if LUTMM_SM90A  // device code below exists for sm_90a only
// Writes acc (+ bias) of this warp's 16 rows x TOK tokens of tile (nt, mt) to Y (p.silu_mul: silu(gate) *
// up, 8 columns). acc[4 j + 2 i + e] is row g + 8 i, token 8 j + 2 t + e (the wgmma accumulator layout).
// C > 1: only the accumulators a with xowner(a) == rank (this CTA's share of a split-K tile).
// epi: the shared::cta address of the CTA's epilogue buffers (WgLayout::kEpiOffset; TOK >= 128).
template <int TOK, typename T, int C = 1>
__device__ __forceinline__ void store_tile(const WgParams<T>& p, int nt, int mt, const float (&acc)[TOK / 2],
                                           uint32_t epi, int rank = 0) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  if (p.silu_mul) {  // rows g (gate) and g + 8 (up): acc[4 j + e] and acc[4 j + 2 + e]
    const int n = nt * kTileRows + warp * 16 + g;
    if (n >= p.N) return;  // N is a multiple of 16 (validate_problem)
#pragma unroll
    for (int j = 0; j < TOK / 8; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int m = mt * TOK + 8 * j + 2 * t + e;
        if (C > 1 && xowner<C>(4 * j + e) != rank) continue;  // the rank of both (xowner)
        if (m < p.M) store_silu_mul(p, m, n, acc[4 * j + e], acc[4 * j + 2 + e]);
      }
    return;
  }
  // The stores run once per tile, as cold code, so their length costs instruction fetches (H100,
  // 8192x8192 M = 64, item 73's stall samples: a ~600-SASS-instruction loop held ~17% of the
  // consumer warps' samples, 3/4 of them instruction-fetch stalls). So: one pointer per row walks
  // the tile's tokens (no 64-bit multiply per element), one compare per element against the tokens
  // left, and in clusters of 2 (rank r owns the accumulators with e = r, xowner) one select instead
  // of a branch. Item 75 (H100, 2026-11-28, lutmm_bench, two rounds): SASS of the 4-bit TOK = 64
  // kernel 9200 -> 7976 instructions; 8192x8192 M = 64 30.1 -> 29.8 us, M = 256 57.4 -> 52.0,
  // 4096x4096 M = 64 13.5 -> 12.9.
  // TOK >= 128: the tile goes out through shared memory, 16 tokens at a time, in 16-byte stores of
  // 8 consecutive outputs of one token (full 32-byte sectors: a warp's 16 rows of a token are 32
  // contiguous bytes of Y), instead of 2-byte stores of which a warp's 32 cover 4 half sectors.
  // stmatrix .trans writes the accumulator fragment (rows n = g + 8 i, tokens 2 t + e) transposed:
  // buffer row tau (a token) holds 16 outputs, halves i = 0, 1 swapped on rows with tau & 4 (the 8
  // row addresses of one 8x8 matrix then cover all 32 banks once). Two buffers per warp alternate,
  // so one __syncwarp per 16 tokens orders a buffer's reads before its next writes.
  // Item 76 (H100, 2026-11-28, lutmm_bench, two rounds, us): M = 256 28672x4096 106.1 -> 98.5,
  // 6144x4096 37.5 -> 36.0, 4096x4096 21.6 -> 20.9, 8192x8192 51.6 -> 50.4; M = 1024 4096x4096
  // 49.9 -> 46.7, 8192x8192 178 -> 173; M = 4096 8192x8192 692-729 -> 675; M = 128 equal (36.3).
  // At TOK = 64 it was 2% slower (8192x8192 M = 64 29.4 -> 29.9, 4096x14336 27.9 -> 28.4), so 64-token
  // tiles keep the direct stores below.
  if constexpr (TOK >= 128) {
    const int n0 = nt * kTileRows + warp * 16;  // this warp's first row
    if (n0 >= p.N) return;
    const float b0 = p.bias && n0 + g < p.N ? Elem<T>::to_float(p.bias[n0 + g]) : 0.f;
    const float b1 = p.bias && n0 + g + 8 < p.N ? Elem<T>::to_float(p.bias[n0 + g + 8]) : 0.f;
    const uint32_t wbuf = epi + uint32_t(warp) * 1024u;
    const int tau_w = lane % 8 + 8 * (lane / 16), i_w = (lane / 8) % 2;  // the row this lane addresses
    const uint32_t w_off = epi_offset(tau_w, i_w);
    const int tau_r = lane / 2, i_r = lane % 2;                          // the 16 bytes this lane stores
    const uint32_t r_off = epi_offset(tau_r, i_r);
    const int n = n0 + 8 * i_r;
    const bool vec = p.y_vec && n + 8 <= p.N;
#pragma unroll
    for (int c = 0; c < TOK / 16; ++c) {
      const uint32_t buf = wbuf + uint32_t(c % 2) * 512u;
      // matrix k = 2 (j - 2 c) + i: accumulators 4 j + 2 i + {0, 1}
      uint32_t r[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int a = 4 * (2 * c + k / 2) + 2 * (k % 2);
        const float b = k % 2 ? b1 : b0;
        r[k] = Elem<T>::pack2(acc[a] + b, acc[a + 1] + b);
      }
      asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(buf + w_off),
                   "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3]) : "memory");
      __syncwarp();
      const int m = mt * TOK + 16 * c + tau_r;
      // token tau_r of the chunk is accumulator index 4 j + e with j = 2 c + tau_r / 8, e = tau_r % 2
      const bool mine = C == 1 || xowner<C>(4 * (2 * c + tau_r / 8) + tau_r % 2) == rank;
      if (mine && m < p.M && n < p.N) {
        T* q = p.y + int64_t(m) * p.N + n;
        if (vec) {
          uint4 v;
          asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                       : "r"(buf + r_off) : "memory");
          *reinterpret_cast<uint4*>(q) = v;
        } else {  // an unaligned y, N % 8 != 0 or the last rows: one output at a time
#pragma unroll 1
          for (int k = 0; k < 8 && n + k < p.N; ++k) {
            unsigned short h;
            asm volatile("ld.shared.u16 %0, [%1];\n" : "=h"(h) : "r"(buf + r_off + 2u * k) : "memory");
            reinterpret_cast<unsigned short*>(q)[k] = h;
          }
        }
      }
    }
    __syncwarp();  // the next tile's first stmatrix waits for this tile's last reads
  } else {
    const int64_t N = p.N;
    const int m0 = mt * TOK + 2 * t, rem = p.M - m0;  // token m0 + 8 j + e exists iff 8 j + e < rem
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int n = nt * kTileRows + warp * 16 + g + 8 * i;
      if (n >= p.N) continue;
      const float b = p.bias ? Elem<T>::to_float(p.bias[n]) : 0.f;
      T* q = p.y + int64_t(m0) * N + n;  // Y[m0][n]
      if constexpr (C == 2) {
        static_assert(xowner<2>(0) == 0 && xowner<2>(1) == 1 && xowner<2>(5) == 1, "xowner<2>(4 j + 2 i + e) = e");
        q += rank * N;
#pragma unroll
        for (int j = 0; j < TOK / 8; ++j, q += 8 * N)
          if (8 * j + rank < rem) q[0] = Elem<T>::from_float((rank ? acc[4 * j + 2 * i + 1] : acc[4 * j + 2 * i]) + b);
      } else {
#pragma unroll
        for (int j = 0; j < TOK / 8; ++j, q += 8 * N)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            if (C > 1 && xowner<C>(4 * j + 2 * i + e) != rank) continue;
            if (8 * j + e < rem) q[e * N] = Elem<T>::from_float(acc[4 * j + 2 * i + e] + b);
          }
      }
    }
  }
}

// Split-K over a cluster of C CTAs (all on one GPC, started together): the CTA of rank r holds in
// acc the sum over its k-blocks of the tile (nt, mt); the tile is the sum over the C ranks. Accumulator
// a belongs to rank xowner(a): every CTA sends the others their accumulators through distributed shared
// memory (into the stages, which the cluster is done with), then each rank adds its share's C
// partials in rank order and stores them. The whole cluster reduces at once, no global memory, no
// counters, and the sum is bitwise reproducible. The producer warpgroup takes part in both cluster
// barriers (after produce(), in the kernel).
// xbuf / xbuf_addr: the exchange buffer (generic pointer / shared::cta address), rank-major:
// [source rank][xslot(a)][thread].
template <int TOK, typename T, int C>
__device__ __forceinline__ void split_k_store(const WgParams<T>& p, int nt, int mt, float (&acc)[TOK / 2],
                                              const float* xbuf, uint32_t xbuf_addr, uint32_t epi) {
  constexpr int kAcc = TOK / 2, kPer = 2 * ((kAcc / 2 + C - 1) / C);  // slots per rank (xslot)
  const int rank = blockIdx.x % C;  // = %cluster_ctarank (1-D grid, cluster dims (C, 1, 1))
  uint32_t base[C];  // this thread's first slot in each rank's buffer, written by this rank
#pragma unroll
  for (int r = 0; r < C; ++r)
    base[r] = wg::map_to_rank(xbuf_addr + uint32_t(rank * kPer * kThreads + threadIdx.x) * 4u, uint32_t(r));
  wg::cluster_sync();  // every CTA's wgmmas have drained and its stages are consumed
#pragma unroll
  for (int a = 0; a < kAcc; ++a) wg::st_cluster(base[xowner<C>(a)] + uint32_t(xslot<C>(a) * kThreads) * 4u, acc[a]);
  wg::cluster_sync();  // the partials have landed
#pragma unroll
  for (int a = 0; a < kAcc; ++a)
    if (xowner<C>(a) == rank) {
      float v = 0.f;
#pragma unroll
      for (int r = 0; r < C; ++r) v += xbuf[(r * kPer + xslot<C>(a)) * kThreads + threadIdx.x];
      acc[a] = v;
    }
  store_tile<TOK, T, C>(p, nt, mt, acc, epi, rank);
}

#endif  // LUTMM_SM90A

}  // namespace wgk
}  // namespace gpu
}  // namespace lutmm
