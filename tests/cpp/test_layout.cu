// The kernels' code-word bit arithmetic, checked on the host against the packer (no GPU needed; built
// with nvcc, run in CI). lut_table.cuh's pair_code / stream3 are what the decode kernels' lookups and
// the dequant kernel use, Quad3Window what the wgmma kernel's 3-bit lookups use, spread3_nibbles what
// the register-table experiment (lut_regtable.cuh) uses; each must find, in the
// packed bytes, exactly the pair of codes pack_codes put there (src/pack.cpp, docs/format.md).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <set>
#include <random>
#include <vector>

#include "../../src/cuda/lut_regtable.cuh"
#include "../../src/cuda/wgmma_epilogue.cuh"
#include "lutmm/pack.h"

using namespace lutmm;

namespace {

// One 16 x 128 block of random codes, packed.
struct Block {
  int bits;
  std::vector<uint8_t> codes, packed;  // codes [16][128]
  Block(int b, uint32_t seed) : bits(b), codes(16 * 128), packed(size_t(256 * b)) {
    std::mt19937 rng(seed);
    for (auto& c : codes) c = uint8_t(rng() % (1u << b));
    pack_codes(codes.data(), Shape{16, 128, b, 128}, packed.data());
  }
  int pair(int row, int col) const {  // pair-table index of columns col, col + 1
    return pair_index(bits, codes[size_t(row * 128 + col)], codes[size_t(row * 128 + col + 1)]);
  }
  // A lane's code words as load_code_words() reads them: 16 bytes at lane * 16, and at 4 bits 16 more
  // 512 bytes on, at 3 bits 8 more at 512 + lane * 8.
  void words(int lane, uint32_t (&wd)[8], uint32_t (&hi)[2]) const {
    std::memset(wd, 0, sizeof(wd));
    std::memset(hi, 0, sizeof(hi));
    std::memcpy(wd, packed.data() + lane * 16, 16);
    if (bits == 4) std::memcpy(wd + 4, packed.data() + 512 + lane * 16, 16);
    if (bits == 3) std::memcpy(hi, packed.data() + 512 + lane * 8, 8);
  }
};

int pair_code_of(int bits, const uint32_t (&wd)[8], const uint32_t (&hi)[2], int ks, int p) {
  if (bits == 2) return gpu::pair_code<2>(wd, hi, ks, p);
  if (bits == 3) return gpu::pair_code<3>(wd, hi, ks, p);
  return gpu::pair_code<4>(wd, hi, ks, p);
}

}  // namespace

// mma.m16n8k16 order: lane l = 4 g + t, k-step ks = 2 j + h, pair p holds rows g + 8 (p & 1), columns
// 32 j + 8 t + 4 h + 2 (p >> 1) and + 1.
TEST(Layout, PairCodeFindsThePackedPairs) {
  for (int bits : {2, 3, 4})
    for (uint32_t seed : {1u, 2u, 3u}) {
      const Block b(bits, seed * 10 + uint32_t(bits));
      for (int lane = 0; lane < 32; ++lane) {
        uint32_t wd[8], hi[2];
        b.words(lane, wd, hi);
        const int g = lane / 4, t = lane % 4;
        for (int ks = 0; ks < 8; ++ks)
          for (int p = 0; p < 4; ++p) {
            const int row = g + 8 * (p & 1), col = 32 * (ks / 2) + 8 * t + 4 * (ks % 2) + 2 * (p >> 1);
            ASSERT_EQ(pair_code_of(bits, wd, hi, ks, p), b.pair(row, col))
                << bits << " bits, lane " << lane << ", k-step " << ks << ", pair " << p;
          }
      }
    }
}

// Pairs of row blocks (compute_pair): the words a lane loads for half h of a block (half_code_offset,
// then half_code_words) give, as k-steps 0 .. 3, the pairs of k-steps 4 h .. 4 h + 3; at 3 bits also
// the table offset lookup_a forms from them.
TEST(Layout, HalfBlockCodeWords) {
  for (int bits : {2, 3, 4})
    for (uint32_t seed : {6u, 7u}) {
      const Block b(bits, seed * 10 + uint32_t(bits));
      for (int lane = 0; lane < 32; ++lane)
        for (int h = 0; h < 2; ++h) {
          const int at = lane * 16 + (bits == 4 ? gpu::half_code_offset<4>(h)
                                      : bits == 2 ? gpu::half_code_offset<2>(h) : gpu::half_code_offset<3>(h));
          uint4 c{};
          uint2 e{};
          std::memcpy(&c, b.packed.data() + at, bits == 2 ? 8 : 16);  // the kernel's 8- or 16-byte load
          if (bits == 3) std::memcpy(&e, b.packed.data() + 512 + lane * 8, 8);
          uint32_t wd[8] = {}, hi[2] = {};
          if (bits == 2) gpu::half_code_words<2>(c, e, h, wd);
          if (bits == 3) gpu::half_code_words<3>(c, e, h, wd);
          if (bits == 4) gpu::half_code_words<4>(c, e, h, wd);
          const int g = lane / 4, t = lane % 4;
          for (int ks = 0; ks < 4; ++ks)
            for (int p = 0; p < 4; ++p) {
              const int kk = 4 * h + ks;  // the block's k-step
              const int row = g + 8 * (p & 1), col = 32 * (kk / 2) + 8 * t + 4 * (kk % 2) + 2 * (p >> 1);
              ASSERT_EQ(pair_code_of(bits, wd, hi, ks, p), b.pair(row, col))
                  << bits << " bits, lane " << lane << ", half " << h << ", k-step " << ks << ", pair " << p;
              if (bits == 3)
                ASSERT_EQ(int((gpu::stream3(wd, hi, 6 * (4 * ks + p) - 8) & 0x3f00u) >> 8), b.pair(row, col))
                    << "lane " << lane << ", half " << h << ", k-step " << ks << ", pair " << p;
            }
        }
    }
}

// The decode kernels' 3-bit table offset (lookup_a): the stream shifted so the pair code lands in bits
// 8-13, the lane's copy in the low bits; pairs that straddle two words (i = 5, 10, 21, 26, ...) included.
TEST(Layout, ThreeBitLookupOffsets) {
  for (uint32_t seed : {4u, 5u}) {
    const Block b(3, seed);
    for (int lane = 0; lane < 32; ++lane) {
      uint32_t wd[8], hi[2];
      b.words(lane, wd, hi);
      for (int i = 0; i < 32; ++i) {
        const uint32_t off = (gpu::stream3(wd, hi, 6 * i - 8) & 0x3f00u) | uint32_t(lane * 4);
        ASSERT_EQ(int(off >> 8), pair_code_of(3, wd, hi, i / 4, i % 4)) << "lane " << lane << ", pair " << i;
        ASSERT_EQ(off & 0xffu, uint32_t(lane * 4));
      }
      // The register-table experiment's selectors (lut_regtable.cuh): nibble 2 p = q0, 2 p + 1 = q1 of pair p.
      for (int ks = 0; ks < 8; ++ks) {
        const uint32_t sel = gpu::spread3_nibbles(gpu::stream3(wd, hi, 24 * ks, 24));
        for (int p = 0; p < 4; ++p) {
          const int code = pair_code_of(3, wd, hi, ks, p);
          ASSERT_EQ(int((sel >> (8 * p)) & 0xfu), code & 7) << "lane " << lane << ", k-step " << ks;
          ASSERT_EQ(int((sel >> (8 * p + 4)) & 0xfu), code >> 3) << "lane " << lane << ", k-step " << ks;
        }
      }
    }
  }
}

// The wgmma kernel (natural column order): lane (g, t) at k-step s reads quad lanes (g, 2 (s % 2) + q),
// q = 0, 1; window j = s / 2 of quad lane's stream gives the pairs of rows g (bits 0-5) and g + 8 (bits
// 6-11) at columns 16 s + 8 q + 2 t, + 1.
TEST(Layout, WgmmaThreeBitWindows) {
  for (uint32_t seed : {6u, 7u}) {
    const Block b(3, seed);
    for (int g = 0; g < 8; ++g)
      for (int t = 0; t < 4; ++t) {
        const gpu::Quad3Window win(t);
        for (int s = 0; s < 8; ++s)
          for (int q = 0; q < 2; ++q) {
            uint32_t wd[8], hi[2];
            b.words(4 * g + 2 * (s % 2) + q, wd, hi);
            const uint32_t st[6] = {wd[0], wd[1], wd[2], wd[3], hi[0], hi[1]};
            const uint32_t x = win(st, s / 2);
            const int col = 16 * s + 8 * q + 2 * t;
            ASSERT_EQ(int(x & 63u), b.pair(g, col)) << "g " << g << " t " << t << " s " << s << " q " << q;
            ASSERT_EQ(int((x >> 6) & 63u), b.pair(g + 8, col)) << "g " << g << " t " << t << " s " << s;
          }
      }
  }
}

// The wgmma kernel's split-K clusters of C CTAs (wgmma_epilogue.cuh): accumulator a = 4 j + 2 i + e
// of a thread (row g + 8 i, token 8 j + 2 t + e) is summed and stored by rank xowner(a), which sent
// it into slot xslot(a) of that rank's exchange buffer. Every accumulator has one owner; one rank's
// slots never collide and fit the buffer; both rows of a token (a, a + 2: the silu_mul pair, and
// one stored token of store_tile's staging) share the owner; the ranks' shares differ by at most one
// pair; clusters of 2 split by e (store_tile's select).
template <int C>
void check_split_k_ownership(int tok) {
  using namespace lutmm::gpu::wgk;
  const int acc = tok / 2, per = 2 * ((acc / 2 + C - 1) / C);
  std::vector<std::set<int>> slots(C);
  std::vector<int> owned(C, 0);
  for (int a = 0; a < acc; ++a) {
    const int r = xowner<C>(a);
    ASSERT_TRUE(r >= 0 && r < C) << "C " << C << " a " << a;
    const int sl = xslot<C>(a);
    ASSERT_TRUE(sl >= 0 && sl < per) << "C " << C << " a " << a << " slot " << sl << " of " << per;
    EXPECT_TRUE(slots[size_t(r)].insert(sl).second) << "C " << C << " a " << a << ": slot " << sl << " taken";
    ++owned[size_t(r)];
    const int j = a / 4, i = a / 2 % 2, e = a % 2;
    EXPECT_EQ(r, xowner<C>(4 * j + 2 * (1 - i) + e)) << "C " << C << " a " << a << ": rows g and g + 8 of a token";
    // store_tile's staging: token tau = 8 (j % 2) + 2 t + e of chunk c = j / 2 asks for its owner as
    // xowner(4 (2 c + tau / 8) + tau % 2)
    EXPECT_EQ(r, xowner<C>(4 * (2 * (j / 2) + j % 2) + e)) << "C " << C << " a " << a;
    if (C == 2) EXPECT_EQ(r, e) << "a " << a;
  }
  const auto [lo, hi] = std::minmax_element(owned.begin(), owned.end());
  EXPECT_LE(*hi - *lo, 2) << "C " << C << " TOK " << tok << ": uneven shares";
}

TEST(Layout, WgmmaSplitKOwnership) {
  for (int tok : {64, 128, 256}) {
    check_split_k_ownership<1>(tok);
    check_split_k_ownership<2>(tok);
    check_split_k_ownership<3>(tok);
    check_split_k_ownership<4>(tok);
  }
}

// store_tile's staging buffer (TOK >= 128): 16 tokens x 16 rows of 2-byte outputs per warp. Each
// (token, half) has its own 16 bytes; the 8 rows stmatrix writes per 8x8 matrix (tokens 8 b .. 8 b + 7,
// one half) fall in 8 distinct 16-byte bank groups of 128 bytes, and so do the 16-byte reads of a
// quarter warp (lanes 8 q .. 8 q + 7: token lane / 2, half lane % 2): no bank conflicts either way.
TEST(Layout, WgmmaEpilogueStagingIsConflictFree) {
  using lutmm::gpu::wgk::epi_offset;
  std::set<uint32_t> all;
  for (int tau = 0; tau < 16; ++tau)
    for (int i = 0; i < 2; ++i) {
      const uint32_t o = epi_offset(tau, i);
      EXPECT_EQ(o % 16, 0u);
      EXPECT_LT(o, 512u);
      EXPECT_TRUE(all.insert(o).second) << "token " << tau << " half " << i;
      EXPECT_EQ(o / 32, uint32_t(tau)) << "row tau holds token tau";
    }
  for (int b = 0; b < 2; ++b)
    for (int i = 0; i < 2; ++i) {
      std::set<uint32_t> groups;
      for (int r = 0; r < 8; ++r) groups.insert(epi_offset(8 * b + r, i) % 128 / 16);
      EXPECT_EQ(groups.size(), 8u) << "stmatrix matrix rows " << 8 * b << ".." << 8 * b + 7 << " half " << i;
    }
  for (int q = 0; q < 4; ++q) {
    std::set<uint32_t> groups;
    for (int lane = 8 * q; lane < 8 * q + 8; ++lane) groups.insert(epi_offset(lane / 2, lane % 2) % 128 / 16);
    EXPECT_EQ(groups.size(), 8u) << "quarter warp " << q;
  }
}
