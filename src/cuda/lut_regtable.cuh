// Table lookups without the shared-memory table, for the 2- and 3-bit decode kernels: the values live
// in registers and a byte permute (prmt) picks them, or each lane holds entries of the pair table and
// a warp shuffle fetches them. Issue 3 asks for this comparison against the shared-memory pair table
// (lut_table.cuh); docs/performance-log.md (item 36) records the measurement. 4 bits keeps the shared
// table: 16 values are 32 bytes, more than one prmt (8 bytes) can choose from.
//
// prmt: prmt(a, b, s) builds a word from 4 of the 8 bytes of (a, b), nibble i of s choosing byte i.
// The table is kept as its values' low bytes (`lo`: byte c = low byte of T[c]) and high bytes (`hi`);
// a selector whose nibbles are 4 codes gives the 4 low bytes in one prmt and the 4 high bytes in
// another, and two more prmts interleave them into two A registers (T[q0], T[q1]):
//
//    codes   c0 c1 c2 c3   (nibbles of the selector s)
//    lo4 = prmt(lo, lo', s) = [lo T[c0] | lo T[c1] | lo T[c2] | lo T[c3]]
//    hi4 = prmt(hi, hi', s) = [hi T[c0] | hi T[c1] | hi T[c2] | hi T[c3]]
//    a   = prmt(lo4, hi4, 0x5140) = (T[c0], T[c1]),  a' = prmt(lo4, hi4, 0x7362) = (T[c2], T[c3])
//
// At 2 bits lo and hi are one register each (4 values); at 3 bits two (8 values: lo, lo' = T[0..3],
// T[4..7]). Building the selector: 2 bits, the masks x = w & 0x33.. (q0 of every pair) and y = (w >>
// 2) & 0x33.. (q1) once per code word, then one prmt per quad; 3 bits, the k-step's 24 stream bits (8
// codes of 3 bits) spread to nibbles (shifts and masks, ~8 ops per k-step). Per k-step (4 A registers):
// 2 bits ~11.5 ALU ops, 3 bits ~17, against 2 (4) shared loads plus 2 (8) ALU ops. (Measured in item 36
// with format version 1's 3-bit layout, whose selector took ~16 ops.)
//
// Shuffles: lane l holds pair entry l & 15 (2 bits: 16 pairs) or entries l and l + 32 (3 bits: 64
// pairs); the pair code is the source lane (shfl reads its low 5 bits, so no mask at 2 bits: lanes l
// and l + 16 hold the same entry); 3 bits shuffles both entries and selects by the code's bit 5.
#pragma once
#include "lut_table.cuh"

namespace lutmm {
namespace gpu {

// Where the decode kernels' lookups find the table. Default: shared memory (see item 36 of
// docs/performance-log.md); LUTMM_EXPERIMENT 20 / 21 select prmt / shuffles for 2 and 3 bits, with no
// shared table (its bytes go to pipeline stages).
enum class LutSource { kShared, kPrmt, kShfl };
template <int BITS>
constexpr LutSource kLutSource = BITS == 4 ? LutSource::kShared
                                 : LUTMM_EXPERIMENT == 20 ? LutSource::kPrmt
                                 : LUTMM_EXPERIMENT == 21 ? LutSource::kShfl
                                                          : LutSource::kShared;

// The per-thread table of kPrmt / kShfl (unused registers fold away for kShared).
template <int BITS, typename T>
struct RegTable {
  uint32_t r[4];
  __device__ __forceinline__ explicit RegTable(const float (&table)[16]) {
    constexpr LutSource src = kLutSource<BITS>;
    r[0] = r[1] = r[2] = r[3] = 0;
    if (src == LutSource::kPrmt) {  // lo bytes then hi bytes of T[0..3] (and T[4..7] at 3 bits)
#pragma unroll
      for (int h = 0; h < (BITS == 3 ? 2 : 1); ++h) {
        const uint32_t p01 = Elem<T>::pack2(table[4 * h], table[4 * h + 1]);
        const uint32_t p23 = Elem<T>::pack2(table[4 * h + 2], table[4 * h + 3]);
        r[h] = __byte_perm(p01, p23, 0x6420);
        r[2 + h] = __byte_perm(p01, p23, 0x7531);
      }
    } else if (src == LutSource::kShfl) {  // pair entries lane (& 15 at 2 bits) and lane + 32
      const int lane = threadIdx.x % 32;
#pragma unroll
      for (int h = 0; h < (BITS == 3 ? 2 : 1); ++h) {
        int q0, q1;
        pair_codes<BITS>(BITS == 3 ? lane + 32 * h : lane % 16, q0, q1);
        r[h] = Elem<T>::pack2(table[q0], table[q1]);
      }
    }
  }
};

// 3 bits: the 8 codes of a k-step (its 24 stream bits: q0, q1 of pairs 0..3, 3 bits each) spread to the 8
// nibbles of a prmt selector (host and device: tests/cpp/test_layout.cu).
__host__ __device__ __forceinline__ uint32_t spread3_nibbles(uint32_t bits24) {
  uint32_t z = bits24 & 0xffffffu;
  z = (z & 0xfffu) | ((z & 0xfff000u) << 4);
  z = (z & 0x003f003fu) | ((z & 0x0fc00fc0u) << 2);
  return (z & 0x07070707u) | ((z & 0x38383838u) << 1);
}

// Two A registers from a selector's low 4 nibbles (codes c0..c3, see the top of the file): a0 = (T[c0],
// T[c1]), a1 = (T[c2], T[c3]) for I0 = 0x5140, I1 = 0x7362 (2 bits uses another nibble order).
template <int BITS, uint32_t I0, uint32_t I1, typename T>
__device__ __forceinline__ void prmt_pair(const RegTable<BITS, T>& rt, uint32_t sel, uint32_t& a0, uint32_t& a1) {
  const uint32_t lo4 = __byte_perm(rt.r[0], rt.r[BITS == 3 ? 1 : 0], sel);
  const uint32_t hi4 = __byte_perm(rt.r[2], rt.r[BITS == 3 ? 3 : 2], sel);
  a0 = __byte_perm(lo4, hi4, I0);
  a1 = __byte_perm(lo4, hi4, I1);
}

// lookup_a (lut_table.cuh) from the register table: the same four A registers of k-step ks, bitwise.
template <int BITS, typename T>
__device__ __forceinline__ void lookup_a_reg(const uint32_t (&wd)[8], const uint32_t (&hi)[2], int ks,
                                             const RegTable<BITS, T>& rt, uint32_t (&a)[4]) {
  constexpr LutSource src = kLutSource<BITS>;
  static_assert(BITS != 4 && src != LutSource::kShared, "register tables serve 2 and 3 bits");
  const uint32_t w = wd[ks / 2];  // 2 bits: nibble (ks % 2) * 4 + p is the pair code
  if (src == LutSource::kShfl) {
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      const int nib = (ks % 2) * 4 + p;
      if (BITS == 2) {
        a[p] = __shfl_sync(~0u, rt.r[0], int(w >> (4 * nib)));
      } else {
        const uint32_t idx = uint32_t(pair_code<BITS>(wd, hi, ks, p));
        const uint32_t v0 = __shfl_sync(~0u, rt.r[0], int(idx)), v1 = __shfl_sync(~0u, rt.r[1], int(idx));
        a[p] = idx & 0x20u ? v1 : v0;
      }
    }
  } else if (BITS == 2) {
    // x: q0 of every pair (nibble bits 0-1), y: q1; byte k = (ks % 2) * 2 + q holds pairs 2q (low nibble)
    // and 2q + 1: the selector's nibbles are q0(2q), q0(2q + 1), q1(2q), q1(2q + 1).
    const uint32_t x = w & 0x33333333u, y = (w >> 2) & 0x33333333u;
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const uint32_t k = (ks % 2) * 2 + q;
      prmt_pair<BITS, 0x6240u, 0x7351u>(rt, __byte_perm(x, y, k | (k + 4) << 4), a[2 * q], a[2 * q + 1]);
    }
  } else {
    const uint32_t sel = spread3_nibbles(stream3(wd, hi, 24 * ks, 24));  // nibbles: q0(0), q1(0), ..., q1(3)
    prmt_pair<BITS, 0x5140u, 0x7362u>(rt, sel, a[0], a[1]);
    prmt_pair<BITS, 0x5140u, 0x7362u>(rt, sel >> 16, a[2], a[3]);
  }
}

}  // namespace gpu
}  // namespace lutmm
