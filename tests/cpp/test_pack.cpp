#include <gtest/gtest.h>

#include <set>

#include "lutmm/pack.h"
#include "lutmm/reference.h"
#include "test_util.h"

using namespace lutmm;
using namespace lutmm_test;

TEST(Pack, RoundTripAllBitsAndRaggedShapes) {
  for (int bits : {2, 3, 4})
    for (auto nk : {std::pair<int64_t, int64_t>{16, 128}, {1, 32}, {33, 160}, {70, 544}, {128, 1024}}) {
      Shape s{nk.first, nk.second, bits, 32};
      auto codes = random_codes(size_t(s.N * s.K), bits, uint32_t(bits * 100 + s.N));
      std::vector<uint8_t> packed(size_t(s.packed_bytes())), back(codes.size());
      pack_codes(codes.data(), s, packed.data());
      unpack_codes(packed.data(), s, back.data());
      EXPECT_EQ(back, codes) << bits << " " << s.N << "x" << s.K;
    }
}

// The packed address of bit j of a code (bits past the first byte continue in hi_byte).
int64_t code_bit(const CodePosition& p, int j) {
  return p.shift + j < 8 ? p.byte * 8 + p.shift + j : p.hi_byte * 8 + (p.shift + j - 8);
}

TEST(Pack, PositionsAreABijection) {
  for (int bits : {2, 3, 4}) {
    Shape s{32, 256, bits, 128};
    std::set<int64_t> seen;
    for (int64_t n = 0; n < s.N; ++n)
      for (int64_t k = 0; k < s.K; ++k) {
        CodePosition p = code_position(s, n, k);
        ASSERT_LT(p.byte, s.packed_bytes());
        ASSERT_EQ(p.hi_byte >= 0, bits == 3 && p.shift > 5) << n << " " << k;
        for (int j = 0; j < bits; ++j) {
          const int64_t bit = code_bit(p, j);
          ASSERT_LT(bit, s.packed_bytes() * 8);
          EXPECT_TRUE(seen.insert(bit).second) << bits << ": bit " << bit << " twice";
        }
      }
    // Every bit of the packed buffer is used exactly once.
    EXPECT_EQ(int64_t(seen.size()), s.packed_bytes() * 8);
  }
}

TEST(Pack, LayoutMatchesTheMmaFragmentFormula) {
  // Row 9, column 45 of block (0, 0), 4 bits: g = 1, p&1 = 1; column 45 = 32*1 + 8*1 + 4*1 + 1 -> j = 1,
  // t = 1, h = 1, p>>1 = 0, e = 1. lane = 4*1 + 1 = 5, ks = 3, p = 1: byte 0*512 + 5*16 + 3*4 + 1, shift 4.
  Shape s{16, 128, 4, 128};
  CodePosition p = code_position(s, 9, 45);
  EXPECT_EQ(p.byte, 5 * 16 + 3 * 4 + 1);
  EXPECT_EQ(p.shift, 4);
  // Second row block, second column block of a 32 x 256 weight starts at block index 3.
  Shape s2{32, 256, 4, 128};
  EXPECT_EQ(code_position(s2, 16, 128).byte, 3 * 1024);
  // 3 bits, the same lane 5: pair i = 4 ks + p sits at bits 6 i of the lane's stream (16 bytes at lane * 16,
  // then 8 at 512 + lane * 8). Row 9, column 45: ks = 3, p = 1, e = 1 -> bit 6 * 13 + 3 = 81: byte 10, shift 1.
  Shape s3{16, 128, 3, 128};
  p = code_position(s3, 9, 45);
  EXPECT_EQ(p.byte, 5 * 16 + 10);
  EXPECT_EQ(p.shift, 1);
  EXPECT_EQ(p.hi_byte, -1);
  // Row 9, column 76 = 32*2 + 8*1 + 4*1: ks = 5, p = 1, e = 0 -> bits 126-128: the last two bits of the
  // lane's 16 bytes and the first of its 8.
  p = code_position(s3, 9, 76);
  EXPECT_EQ(p.byte, 5 * 16 + 15);
  EXPECT_EQ(p.shift, 6);
  EXPECT_EQ(p.hi_byte, 512 + 5 * 8);
}

// Format version 1 stored a 3-bit code's low 2 bits and its high bit apart (docs/format.md, "Version 1"):
// written here from that description, independently of src/pack.cpp.
std::vector<uint8_t> pack_v1_3bit(const std::vector<uint8_t>& codes, const Shape& s) {
  std::vector<uint8_t> out(size_t(s.packed_bytes()), 0);
  for (int64_t n = 0; n < s.N; ++n)
    for (int64_t k = 0; k < s.K; ++k) {
      const int r = int(n % 16), c = int(k % 128);
      const int lane = 4 * (r % 8) + (c % 32) / 8, ks = 2 * (c / 32) + (c % 8) / 4;
      const int p = r / 8 + 2 * ((c % 4) / 2), e = c % 2, q = codes[size_t(n * s.K + k)];
      const int64_t base = ((n / 16) * s.col_blocks() + k / 128) * 768;
      const int nib = (ks % 2) * 4 + p, fld = (ks % 4) * 4 + p;
      out[size_t(base + lane * 16 + (ks / 2) * 4 + nib / 2)] |= uint8_t((q & 3) << ((nib % 2) * 4 + 2 * e));
      out[size_t(base + 512 + lane * 8 + (ks / 4) * 4 + fld / 4)] |= uint8_t((q >> 2) << ((fld % 4) * 2 + e));
    }
  return out;
}

TEST(Pack, RepacksFormatVersion1) {
  for (int bits : {2, 3, 4}) {
    Shape s{40, 384, bits, 128};
    auto codes = random_codes(size_t(s.N * s.K), bits, 31);
    std::vector<uint8_t> current(size_t(s.packed_bytes())), v1(current.size()), out(current.size());
    pack_codes(codes.data(), s, current.data());
    v1 = bits == 3 ? pack_v1_3bit(codes, s) : current;  // 2 and 4 bits: unchanged since version 1
    if (bits == 3) ASSERT_NE(v1, current);
    repack_v1_codes(v1.data(), s, out.data());
    EXPECT_EQ(out, current) << bits;
  }
}

TEST(Pack, ScalesRoundTrip) {
  Shape s{40, 256, 4, 64};
  auto sc = random_scales(size_t(s.N * s.groups()), 4);
  std::vector<uint16_t> packed(size_t(s.packed_scale_count())), back(sc.size());
  pack_scales(sc.data(), s, packed.data());
  unpack_scales(packed.data(), s, back.data());
  EXPECT_EQ(back, sc);
  // rows (r, r + 8) side by side: row 8 of block 0, group 1 sits right after row 0.
  EXPECT_EQ(packed[(0 * 4 + 1) * 16 + 1], sc[8 * 4 + 1]);
}

TEST(Pack, RejectsOutOfRangeCodes) {
  Shape s{16, 128, 2, 128};
  std::vector<uint8_t> codes(size_t(s.N * s.K), 1), packed(size_t(s.packed_bytes()));
  codes[17] = 4;
  EXPECT_THROW(pack_codes(codes.data(), s, packed.data()), Error);
}

TEST(Pack, SliceWithoutUnpacking) {
  for (int bits : {2, 3, 4}) {
    Shape s{150, 640, bits, 128};
    auto codes = random_codes(size_t(s.N * s.K), bits, 77);
    auto sc = random_scales(size_t(s.N * s.groups()), 5);
    std::vector<uint8_t> packed(size_t(s.packed_bytes()));
    std::vector<uint16_t> ps(size_t(s.packed_scale_count()));
    pack_codes(codes.data(), s, packed.data());
    pack_scales(sc.data(), s, ps.data());
    struct Cut { int64_t n0, nl, k0, kl; };
    for (Cut c : {Cut{64, 64, 128, 256}, Cut{128, 22, 512, 128}, Cut{0, 150, 0, 640}}) {
      std::vector<uint8_t> sp;
      std::vector<uint16_t> ss;
      Shape sub = slice_packed(s, packed.data(), ps.data(), c.n0, c.nl, c.k0, c.kl, &sp, &ss);
      ASSERT_EQ(sub.N, c.nl);
      std::vector<uint8_t> sub_codes(size_t(sub.N * sub.K));
      unpack_codes(sp.data(), sub, sub_codes.data());
      std::vector<uint16_t> sub_sc(size_t(sub.N * sub.groups()));
      unpack_scales(ss.data(), sub, sub_sc.data());
      for (int64_t n = 0; n < sub.N; ++n) {
        for (int64_t k = 0; k < sub.K; ++k)
          ASSERT_EQ(sub_codes[size_t(n * sub.K + k)], codes[size_t((n + c.n0) * s.K + k + c.k0)]);
        for (int64_t j = 0; j < sub.groups(); ++j)
          ASSERT_EQ(sub_sc[size_t(n * sub.groups() + j)], sc[size_t((n + c.n0) * s.groups() + j + c.k0 / 128)]);
      }
    }
    std::vector<uint8_t> sp;
    std::vector<uint16_t> ss;
    EXPECT_THROW(slice_packed(s, packed.data(), ps.data(), 8, 64, 0, 640, &sp, &ss), Error);
    EXPECT_THROW(slice_packed(s, packed.data(), ps.data(), 0, 64, 64, 128, &sp, &ss), Error);
  }
}

TEST(Pack, PairTable) {
  for (int bits : {2, 3, 4}) {
    std::vector<float> t(size_t(1) << bits);
    for (size_t i = 0; i < t.size(); ++i) t[i] = float(i) * 1.5f - 3.f;
    auto pt = pair_table(t.data(), bits);
    for (int q0 = 0; q0 < (1 << bits); ++q0)
      for (int q1 = 0; q1 < (1 << bits); ++q1) {
        const int i = pair_index(bits, q0, q1);
        ASSERT_LT(i, 1 << (2 * bits));
        EXPECT_EQ(pt[size_t(2 * i)], t[size_t(q0)]);
        EXPECT_EQ(pt[size_t(2 * i + 1)], t[size_t(q1)]);
      }
  }
}

TEST(Pack, DequantizePackedMatchesDequantize) {
  for (int bits : {2, 3, 4})
    for (auto nk : {std::pair<int64_t, int64_t>{33, 160}, {16, 128}, {70, 544}}) {
      Shape s{nk.first, nk.second, bits, 32};
      auto codes = random_codes(size_t(s.N * s.K), bits, uint32_t(bits + s.N));
      auto sc = random_scales(size_t(s.N * s.groups()), 9);
      std::vector<float> t(size_t(1) << bits);
      for (size_t i = 0; i < t.size(); ++i) t[i] = float(i) * 0.7f - 2.f;
      std::vector<uint8_t> packed(size_t(s.packed_bytes()));
      std::vector<uint16_t> ps(size_t(s.packed_scale_count()));
      pack_codes(codes.data(), s, packed.data());
      pack_scales(sc.data(), s, ps.data());
      std::vector<float> a(size_t(s.N * s.K)), b(a.size());
      dequantize(codes.data(), sc.data(), t.data(), s, a.data());
      dequantize_packed(packed.data(), ps.data(), t.data(), s, b.data());
      EXPECT_EQ(a, b) << bits << " " << s.N << "x" << s.K;
    }
}
