#include "lutmm/pack.h"

#include "parallel.h"

#include <algorithm>
#include <cstring>

namespace lutmm {

namespace {
// Where code (n, k) sits in the mma.m16n8k16 fragments of its block (docs/format.md): the block's byte
// offset, lane l = 4 g + t, k-step ks, pair p (0..3) and element e (0: q0, 1: q1) of the pair.
struct Fragment {
  int64_t base;
  int lane, ks, p, e;
};
Fragment fragment_of(const Shape& s, int64_t n, int64_t k) {
  const int64_t nb = n / kBlockRows, kb = k / kBlockCols;
  const int r = int(n % kBlockRows), c = int(k % kBlockCols);
  // Invert: r = g + 8 * (p & 1); c = 32 j + 8 t + 4 h + 2 * (p >> 1) + e.
  const int g = r % 8, p_lo = r / 8;
  const int j = c / 32, t = (c % 32) / 8, h = (c % 8) / 4, p_hi = (c % 4) / 2, e = c % 2;
  return {(nb * s.col_blocks() + kb) * s.block_bytes(), 4 * g + t, 2 * j + h, p_lo + 2 * p_hi, e};
}
// 3 bits: byte offset (in its block) of bit `bit` of lane `lane`'s 192-bit code stream (bits 0-127: the
// lane's 16 bytes at lane * 16; bits 128-191: its 8 bytes at 512 + lane * 8).
int64_t stream3_byte(int lane, int bit) { return bit < 128 ? lane * 16 + bit / 8 : 512 + lane * 8 + (bit - 128) / 8; }
}  // namespace

CodePosition code_position(const Shape& s, int64_t n, int64_t k) {
  const Fragment f = fragment_of(s, n, k);
  CodePosition pos;
  if (s.bits == 4) {
    pos.byte = f.base + (f.ks / 4) * 512 + f.lane * 16 + (f.ks % 4) * 4 + f.p;
    pos.shift = 4 * f.e;
  } else if (s.bits == 2) {
    const int nib = (f.ks % 2) * 4 + f.p;  // nibble within the 32-bit word ks / 2
    pos.byte = f.base + f.lane * 16 + (f.ks / 2) * 4 + nib / 2;
    pos.shift = (nib % 2) * 4 + 2 * f.e;
  } else {  // pair i = 4 ks + p is stream bits 6 i .. 6 i + 5, q0 first
    const int bit = 6 * (4 * f.ks + f.p) + 3 * f.e;
    pos.byte = f.base + stream3_byte(f.lane, bit);
    pos.shift = bit % 8;
    if (pos.shift > 5) pos.hi_byte = f.base + stream3_byte(f.lane, bit - pos.shift + 8);
  }
  return pos;
}

void pack_codes(const uint8_t* codes, const Shape& s, uint8_t* packed) {
  validate_shape(s);
  for (int64_t i = 0; i < s.N * s.K; ++i) {
    if (codes[i] >= s.table_size()) {
      Msg m;
      m << "codes: element [" << i / s.K << ", " << i % s.K << "] is " << int(codes[i])
        << ", expected < 2^bits = " << s.table_size();
      throw Error(m.str());
    }
  }
  std::memset(packed, 0, size_t(s.packed_bytes()));
  // Row blocks own disjoint byte ranges, so they pack in parallel.
  parallel_for(0, s.row_blocks(), [&](int64_t nb) {
    for (int64_t n = nb * kBlockRows; n < std::min(s.N, (nb + 1) * kBlockRows); ++n)
      for (int64_t k = 0; k < s.K; ++k) {
        const int q = codes[n * s.K + k];
        const CodePosition p = code_position(s, n, k);
        packed[p.byte] |= uint8_t(q << p.shift);
        if (p.hi_byte >= 0) packed[p.hi_byte] |= uint8_t(q >> (8 - p.shift));
      }
  });
}

void unpack_codes(const uint8_t* packed, const Shape& s, uint8_t* codes) {
  validate_shape(s);
  const int mask = (1 << s.bits) - 1;
  for (int64_t n = 0; n < s.N; ++n) {
    for (int64_t k = 0; k < s.K; ++k) {
      const CodePosition p = code_position(s, n, k);
      int q = packed[p.byte] >> p.shift;
      if (p.hi_byte >= 0) q |= packed[p.hi_byte] << (8 - p.shift);
      codes[n * s.K + k] = uint8_t(q & mask);
    }
  }
}

void pack_scales(const uint16_t* scales, const Shape& s, uint16_t* packed) {
  validate_shape(s);
  const int64_t G = s.groups();
  std::memset(packed, 0, size_t(s.packed_scale_count()) * 2);
  for (int64_t n = 0; n < s.N; ++n) {
    const int64_t nb = n / 16, r = n % 16;
    for (int64_t j = 0; j < G; ++j) packed[(nb * G + j) * 16 + (r % 8) * 2 + r / 8] = scales[n * G + j];
  }
}

void unpack_scales(const uint16_t* packed, const Shape& s, uint16_t* scales) {
  validate_shape(s);
  const int64_t G = s.groups();
  for (int64_t n = 0; n < s.N; ++n) {
    const int64_t nb = n / 16, r = n % 16;
    for (int64_t j = 0; j < G; ++j) scales[n * G + j] = packed[(nb * G + j) * 16 + (r % 8) * 2 + r / 8];
  }
}

int pair_index(int bits, int q0, int q1) { return q0 | (q1 << bits); }

void repack_v1_codes(const uint8_t* v1, const Shape& s, uint8_t* packed) {
  validate_shape(s);
  if (s.bits != 3) {  // 2 and 4 bits: the same layout in both versions
    std::memcpy(packed, v1, size_t(s.packed_bytes()));
    return;
  }
  // Version 1 at 3 bits: the low 2 bits of pair (ks, p) in the nibble (ks % 2) * 4 + p of the lane's word
  // ks / 2 (q0 in the nibble's bits 0-1), the high bits in the 2-bit field (ks % 4) * 4 + p of its high
  // word ks / 4 (bytes 512 + lane * 8 on).
  std::vector<uint8_t> codes(size_t(s.N * s.K));
  parallel_for(0, s.N, [&](int64_t n) {
    for (int64_t k = 0; k < s.K; ++k) {
      const Fragment f = fragment_of(s, n, k);
      const int nib = (f.ks % 2) * 4 + f.p, fld = (f.ks % 4) * 4 + f.p;
      const int lo = v1[f.base + f.lane * 16 + (f.ks / 2) * 4 + nib / 2] >> ((nib % 2) * 4 + 2 * f.e);
      const int hi = v1[f.base + 512 + f.lane * 8 + (f.ks / 4) * 4 + fld / 4] >> ((fld % 4) * 2 + f.e);
      codes[size_t(n * s.K + k)] = uint8_t((lo & 3) | (hi & 1) << 2);
    }
  });
  pack_codes(codes.data(), s, packed);
}

std::vector<float> pair_table(const float* table, int bits) {
  const int T = 1 << bits;
  std::vector<float> out(size_t(2) * T * T);
  for (int q0 = 0; q0 < T; ++q0)
    for (int q1 = 0; q1 < T; ++q1) {
      const int i = pair_index(bits, q0, q1);
      out[2 * i] = table[q0];
      out[2 * i + 1] = table[q1];
    }
  return out;
}

Shape slice_packed(const Shape& s, const uint8_t* packed, const uint16_t* packed_scales, int64_t n0, int64_t n_len,
                   int64_t k0, int64_t k_len, std::vector<uint8_t>* out_packed, std::vector<uint16_t>* out_scales) {
  validate_shape(s);
  Msg m;
  const int64_t kq = std::max<int64_t>(kBlockCols, s.group_size);
  if (n0 < 0 || n_len < 1 || n0 + n_len > s.N || n0 % 16 || (n_len % 16 && n0 + n_len != s.N)) {
    m << "slice rows [" << n0 << ", " << n0 + n_len << "): expected multiples of 16 inside [0, " << s.N << ")";
    throw Error(m.str());
  }
  if (k0 < 0 || k_len < 1 || k0 + k_len > s.K || k0 % kq || (k_len % kq && k0 + k_len != s.K)) {
    m << "slice columns [" << k0 << ", " << k0 + k_len << "): expected multiples of " << kq << " inside [0, "
      << s.K << ")";
    throw Error(m.str());
  }
  Shape sub = s;
  sub.N = n_len;
  sub.K = k_len;
  if (s.group_size == s.K) {
    if (k_len != s.K) throw Error("slice columns: a weight with one group per row (group_size = K) can't be cut along K");
    sub.group_size = k_len;
  }
  validate_shape(sub);
  out_packed->assign(size_t(sub.packed_bytes()), 0);
  out_scales->assign(size_t(sub.packed_scale_count()), 0);
  const int64_t bb = s.block_bytes(), kb0 = k0 / kBlockCols, G = s.groups(), g0 = k0 / s.group_size;
  for (int64_t nb = 0; nb < sub.row_blocks(); ++nb) {
    std::memcpy(out_packed->data() + nb * sub.col_blocks() * bb,
                packed + ((n0 / 16 + nb) * s.col_blocks() + kb0) * bb, size_t(sub.col_blocks() * bb));
    std::memcpy(out_scales->data() + nb * sub.groups() * 16, packed_scales + ((n0 / 16 + nb) * G + g0) * 16,
                size_t(sub.groups() * 16 * 2));
  }
  return sub;
}

}  // namespace lutmm
