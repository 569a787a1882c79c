#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "lutmm/format.h"
#include "lutmm/tables.h"
#include "test_util.h"

using namespace lutmm;

TEST(Format, ValidShapes) {
  for (int bits : {2, 3, 4})
    for (int64_t g : {32, 64, 128, 256}) EXPECT_NO_THROW(validate_shape(Shape{17, 512, bits, g}));
  EXPECT_NO_THROW(validate_shape(Shape{1, 96, 4, 96}));  // one group per row, K = 96
}

TEST(Format, RejectsBadShapesWithNamedArgument) {
  auto msg = [](Shape s) {
    try { validate_shape(s); } catch (const Error& e) { return std::string(e.what()); }
    return std::string("no error");
  };
  EXPECT_NE(msg(Shape{16, 512, 5, 128}).find("bits: got 5"), std::string::npos);
  EXPECT_NE(msg(Shape{16, 512, 1, 128}).find("bits"), std::string::npos);
  EXPECT_NE(msg(Shape{0, 512, 4, 128}).find("N (out_features): got 0"), std::string::npos);
  EXPECT_NE(msg(Shape{16, 100, 4, 100}).find("K (in_features): got 100"), std::string::npos);
  EXPECT_NE(msg(Shape{16, 512, 4, 48}).find("group_size: got 48, expected 32, 64, 128, 256, or K (= 512)"),
            std::string::npos);
  for (int64_t g : kGroupSizes) EXPECT_EQ(msg(Shape{16, 512, 4, g}), "no error") << g;
  EXPECT_EQ(msg(Shape{16, 96, 4, 96}), "no error");  // g = K: one group per row
  EXPECT_NE(msg(Shape{16, 96, 4, 64}).find("multiple of group_size 64"), std::string::npos);
  // Sizes whose byte counts would overflow (2^40 x 2^40 made packed_bytes wrap to 0 and pass)
  EXPECT_NE(msg(Shape{int64_t{1} << 40, int64_t{1} << 40, 4, 32}).find("beyond the format's limits"), std::string::npos);
  EXPECT_NE(msg(Shape{1 << 20, int64_t{1} << 31, 4, 32}).find("beyond the format's limits"), std::string::npos);
  EXPECT_NE(msg(Shape{int64_t{1} << 24, int64_t{1} << 25, 4, 32}).find("beyond the format's limits"), std::string::npos);
  EXPECT_NO_THROW(validate_shape(Shape{int64_t{1} << 23, int64_t{1} << 25, 4, 32}));  // 2^48 weights: the limit
}

TEST(Format, PackedSizes) {
  Shape s{20, 160, 3, 32};
  EXPECT_EQ(s.n_pad(), 32);
  EXPECT_EQ(s.k_pad(), 256);
  EXPECT_EQ(s.block_bytes(), 768);
  EXPECT_EQ(s.packed_bytes(), 2 * 2 * 768);
  EXPECT_EQ(s.packed_scale_count(), 2 * 5 * 16);
}

TEST(Tables, NF4MatchesQLoRA) {
  // bitsandbytes / QLoRA NF4 values.
  const double ref[16] = {-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                          -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                          0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                          0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0};
  auto t = nf_table(4);
  ASSERT_EQ(t.size(), 16u);
  for (int i = 0; i < 16; ++i) EXPECT_NEAR(t[i], ref[i], 2e-7) << i;
}

TEST(Tables, NF3AndNF2AreSortedSymmetricRangeWithZero) {
  for (int bits : {2, 3}) {
    auto t = nf_table(bits);
    ASSERT_EQ(int(t.size()), 1 << bits);
    EXPECT_FLOAT_EQ(t.front(), -1.f);
    EXPECT_FLOAT_EQ(t.back(), 1.f);
    EXPECT_NE(std::find(t.begin(), t.end(), 0.f), t.end());
    for (size_t i = 1; i < t.size(); ++i) EXPECT_LT(t[i - 1], t[i]);
  }
}

TEST(Tables, IntTable) {
  auto t = int_table(4);
  EXPECT_FLOAT_EQ(t[0], -8.f / 7.f);
  EXPECT_FLOAT_EQ(t[8], 0.f);
  EXPECT_FLOAT_EQ(t[15], 1.f);
  auto t2 = int_table(2);
  EXPECT_FLOAT_EQ(t2[0], -2.f);
  EXPECT_FLOAT_EQ(t2[3], 1.f);
  EXPECT_THROW(int_table(5), Error);
}

TEST(Tables, NormalPpf) {
  EXPECT_NEAR(normal_ppf(0.5), 0.0, 1e-12);
  EXPECT_NEAR(normal_ppf(0.975), 1.959963984540054, 1e-10);
  EXPECT_NEAR(normal_ppf(0.001), -3.090232306167813, 1e-9);
}

TEST(Tables, ValidateTable) {
  float ok[4] = {0, 1, 2, 3}, bad[4] = {0, NAN, 2, 3};
  EXPECT_NO_THROW(validate_table(ok, 4, 2));
  EXPECT_THROW(validate_table(ok, 4, 3), Error);
  try {
    validate_table(bad, 4, 2);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("entry 1"), std::string::npos);
  }
}

TEST(Half, RoundTrips) {
  for (float f : {0.f, 1.f, -2.5f, 65504.f, 6.1e-5f, 1e-7f, 0.1f}) {
    EXPECT_NEAR(half_to_float(float_to_half(f)), f, std::fabs(f) * 1e-3 + 6e-8) << f;
    EXPECT_NEAR(bf16_to_float(float_to_bf16(f)), f, std::fabs(f) * 4e-3 + 1e-30) << f;
  }
  EXPECT_EQ(float_to_half(1.f), 0x3c00);
  EXPECT_EQ(float_to_bf16(1.f), 0x3f80);
}
