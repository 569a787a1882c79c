#include "lutmm/pack.h"

#include "parallel.h"

#include <algorithm>
#include <cstring>

namespace lutmm {

CodePosition code_position(const Shape& s, int64_t n, int64_t k) {
  const int64_t nb = n / kBlockRows, kb = k / kBlockCols;
  const int r = int(n % kBlockRows), c = int(k % kBlockCols);
  // Invert: r = g + 8 * (p & 1); c = 32 j + 8 t + 4 h + 2 * (p >> 1) + e.
  const int g = r % 8, p_lo = r / 8;
  const int j = c / 32, t = (c % 32) / 8, h = (c % 8) / 4, p_hi = (c % 4) / 2, e = c % 2;
  const int lane = 4 * g + t, ks = 2 * j + h, p = p_lo + 2 * p_hi;
  const int64_t base = (nb * s.col_blocks() + kb) * s.block_bytes();
  CodePosition pos;
  if (s.bits == 4) {
    pos.byte = base + (ks / 4) * 512 + lane * 16 + (ks % 4) * 4 + p;
    pos.shift = 4 * e;
  } else {
    const int nib = (ks % 2) * 4 + p;  // nibble within the 32-bit word ks / 2
    pos.byte = base + lane * 16 + (ks / 2) * 4 + nib / 2;
    pos.shift = (nib % 2) * 4 + 2 * e;
    if (s.bits == 3) {
      const int fld = (ks % 4) * 4 + p;  // 2-bit field within the word ks / 4
      pos.hi_byte = base + 512 + lane * 8 + (ks / 4) * 4 + fld / 4;
      pos.hi_shift = (fld % 4) * 2 + e;
    }
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
  const int lo_mask = s.bits == 3 ? 3 : (1 << s.bits) - 1;
  // Row blocks own disjoint byte ranges, so they pack in parallel.
  parallel_for(0, s.row_blocks(), [&](int64_t nb) {
    for (int64_t n = nb * kBlockRows; n < std::min(s.N, (nb + 1) * kBlockRows); ++n)
      for (int64_t k = 0; k < s.K; ++k) {
        const int q = codes[n * s.K + k];
        const CodePosition p = code_position(s, n, k);
        packed[p.byte] |= uint8_t((q & lo_mask) << p.shift);
        if (p.hi_byte >= 0) packed[p.hi_byte] |= uint8_t((q >> 2) << p.hi_shift);
      }
  });
}

void unpack_codes(const uint8_t* packed, const Shape& s, uint8_t* codes) {
  validate_shape(s);
  const int lo_mask = s.bits == 3 ? 3 : (1 << s.bits) - 1;
  for (int64_t n = 0; n < s.N; ++n) {
    for (int64_t k = 0; k < s.K; ++k) {
      const CodePosition p = code_position(s, n, k);
      int q = (packed[p.byte] >> p.shift) & lo_mask;
      if (p.hi_byte >= 0) q |= ((packed[p.hi_byte] >> p.hi_shift) & 1) << 2;
      codes[n * s.K + k] = uint8_t(q);
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

int pair_index(int bits, int q0, int q1) {
  if (bits == 3) return ((q0 & 3) | (q1 & 3) << 2) | (((q0 >> 2) | (q1 >> 2) << 1) << 4);
  return q0 | (q1 << bits);
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
