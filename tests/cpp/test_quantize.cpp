#include <gtest/gtest.h>

#include <cmath>

#include "lutmm/quantize.h"
#include "lutmm/reference.h"
#include "lutmm/tables.h"
#include "test_util.h"

using namespace lutmm;
using namespace lutmm_test;

namespace {
struct Result { std::vector<uint8_t> codes; std::vector<uint16_t> scales; double rel_rmse; };
Result run(const std::vector<float>& w, const Shape& s, const std::vector<float>& table, bool search = true) {
  Result r{std::vector<uint8_t>(size_t(s.N * s.K)), std::vector<uint16_t>(size_t(s.N * s.groups())), 0};
  QuantizeOptions opt;
  opt.search_scale = search;
  quantize(w.data(), DType::F32, s, table.data(), opt, r.codes.data(), r.scales.data());
  const double err = quantization_error(w.data(), DType::F32, s, table.data(), r.codes.data(), r.scales.data());
  double ref = 0;
  for (float x : w) ref += double(x) * x;
  r.rel_rmse = std::sqrt(err / ref);
  return r;
}
}  // namespace

TEST(Quantize, OnGridWeightsAreLossless) {
  for (int bits : {2, 3, 4})
    for (auto table : {nf_table(bits), int_table(bits)}) {
      Shape s{8, 256, bits, 64};
      auto codes = random_codes(size_t(s.N * s.K), bits, 7 + bits);
      // Make every group contain the extreme codes so that the absmax scale is the true scale.
      int lo = int(std::min_element(table.begin(), table.end()) - table.begin());
      int hi = int(std::max_element(table.begin(), table.end()) - table.begin());
      for (int64_t n = 0; n < s.N; ++n)
        for (int64_t j = 0; j < s.groups(); ++j) { codes[n * s.K + j * 64] = uint8_t(lo); codes[n * s.K + j * 64 + 1] = uint8_t(hi); }
      auto scales = random_scales(size_t(s.N * s.groups()), 3);
      std::vector<float> w(size_t(s.N * s.K));
      dequantize(codes.data(), scales.data(), table.data(), s, w.data());
      Result r = run(w, s, table);
      EXPECT_LT(r.rel_rmse, 1e-7) << "bits " << bits;  // float rounding of T*s only
      std::vector<float> back(w.size());
      dequantize(r.codes.data(), r.scales.data(), table.data(), s, back.data());
      EXPECT_EQ(back, w);
    }
}

TEST(Quantize, ErrorBoundsGaussianAndHeavyTailed) {
  // Relative RMS error bounds (measured values are about 15-20% below these).
  struct Case { int bits; int64_t g; bool nf; double gauss, heavy; };
  const Case cases[] = {{4, 64, true, 0.095, 0.135}, {4, 128, true, 0.10, 0.165}, {3, 64, true, 0.19, 0.27},
                        {2, 64, true, 0.40, 0.55}, {4, 64, false, 0.10, 0.19}, {3, 128, false, 0.22, 0.39}};
  Shape s{64, 1024, 4, 64};
  auto gw = gaussian(size_t(s.N * s.K), 11);
  auto hw = student_t(size_t(s.N * s.K), 12);
  for (const Case& c : cases) {
    s.bits = c.bits; s.group_size = c.g;
    auto t = c.nf ? nf_table(c.bits) : int_table(c.bits);
    EXPECT_LT(run(gw, s, t).rel_rmse, c.gauss) << c.bits << "-bit g" << c.g << (c.nf ? " nf" : " int");
    EXPECT_LT(run(hw, s, t).rel_rmse, c.heavy) << c.bits << "-bit g" << c.g << (c.nf ? " nf" : " int");
  }
}

TEST(Quantize, SearchedScaleNeverWorseThanAbsmax) {
  Shape s{32, 512, 3, 128};
  auto w = student_t(size_t(s.N * s.K), 5);
  for (int bits : {2, 3, 4}) {
    s.bits = bits;
    auto t = nf_table(bits);
    const double searched = run(w, s, t, true).rel_rmse, absmax = run(w, s, t, false).rel_rmse;
    EXPECT_LE(searched, absmax);
    EXPECT_LT(searched, 0.97 * absmax) << "search should find a real gain on heavy tails, bits " << bits;
  }
}

TEST(Quantize, MoreBitsLessError) {
  Shape s{32, 512, 2, 64};
  auto w = gaussian(size_t(s.N * s.K), 9);
  double prev = 1e9;
  for (int bits : {2, 3, 4}) {
    s.bits = bits;
    const double e = run(w, s, nf_table(bits)).rel_rmse;
    EXPECT_LT(e, prev);
    prev = e;
  }
}

TEST(Quantize, KMeansNeverWorseThanNFInit) {
  for (int bits : {2, 3, 4}) {
    Shape s{48, 512, bits, 64};
    auto w = student_t(size_t(s.N * s.K), 21 + bits, 4.f);
    auto init = nf_table(bits);
    auto learned = kmeans_table(w.data(), DType::F32, s, init.data(), QuantizeOptions{}, 6);
    const double e_init = run(w, s, init).rel_rmse, e_km = run(w, s, learned).rel_rmse;
    EXPECT_LE(e_km, e_init) << bits;
    EXPECT_LT(e_km, e_init) << "k-means should improve on a t(4) weight, bits " << bits;
  }
}

TEST(Quantize, HalfAndBf16InputsMatchFloat) {
  Shape s{16, 256, 4, 64};
  auto w = gaussian(size_t(s.N * s.K), 4);
  std::vector<uint16_t> wb(w.size());
  for (size_t i = 0; i < w.size(); ++i) { wb[i] = float_to_bf16(w[i]); w[i] = bf16_to_float(wb[i]); }
  auto t = nf_table(4);
  std::vector<uint8_t> c1(w.size()), c2(w.size());
  std::vector<uint16_t> s1(size_t(s.N * s.groups())), s2(s1.size());
  quantize(w.data(), DType::F32, s, t.data(), {}, c1.data(), s1.data());
  quantize(wb.data(), DType::BF16, s, t.data(), {}, c2.data(), s2.data());
  EXPECT_EQ(c1, c2);
  EXPECT_EQ(s1, s2);
}

TEST(Quantize, ImportanceShiftsErrorToUnimportantColumns) {
  Shape s{32, 256, 2, 256};
  auto w = gaussian(size_t(s.N * s.K), 13);
  std::vector<float> imp(size_t(s.K), 1.f);
  for (int k = 0; k < 32; ++k) imp[size_t(k)] = 100.f;
  auto t = nf_table(2);
  std::vector<uint8_t> c(w.size());
  std::vector<uint16_t> sc(size_t(s.N * s.groups()));
  QuantizeOptions plain, weighted;
  weighted.importance = imp.data();
  quantize(w.data(), DType::F32, s, t.data(), plain, c.data(), sc.data());
  const double e_plain = quantization_error(w.data(), DType::F32, s, t.data(), c.data(), sc.data(), imp.data());
  quantize(w.data(), DType::F32, s, t.data(), weighted, c.data(), sc.data());
  const double e_weighted = quantization_error(w.data(), DType::F32, s, t.data(), c.data(), sc.data(), imp.data());
  EXPECT_LT(e_weighted, e_plain);
}

TEST(Quantize, RejectsNonFiniteWeights) {
  Shape s{4, 64, 4, 32};
  auto w = gaussian(size_t(s.N * s.K), 1);
  w[2 * 64 + 5] = NAN;
  std::vector<uint8_t> c(w.size());
  std::vector<uint16_t> sc(size_t(s.N * s.groups()));
  auto t = nf_table(4);
  try {
    quantize(w.data(), DType::F32, s, t.data(), {}, c.data(), sc.data());
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("weight: element [2, 5]"), std::string::npos) << e.what();
  }
  w[2 * 64 + 5] = INFINITY;
  EXPECT_THROW(quantize(w.data(), DType::F32, s, t.data(), {}, c.data(), sc.data()), Error);
}

TEST(Quantize, RejectsScaleBeyondFp16) {
  Shape s{1, 32, 4, 32};
  std::vector<float> w(32, 1e6f);
  std::vector<uint8_t> c(32);
  std::vector<uint16_t> sc(1);
  auto t = nf_table(4);
  EXPECT_THROW(quantize(w.data(), DType::F32, s, t.data(), {}, c.data(), sc.data()), Error);
}

TEST(Reference, MatmulMatchesNaive) {
  Shape s{5, 96, 3, 32};
  auto codes = random_codes(size_t(s.N * s.K), 3, 2);
  auto scales = random_scales(size_t(s.N * s.groups()), 3);
  auto t = nf_table(3);
  const int64_t M = 3;
  auto x = gaussian(size_t(M * s.K), 8);
  std::vector<float> bias = {1, 2, 3, 4, 5}, y(size_t(M * s.N));
  reference_matmul(x.data(), DType::F32, M, codes.data(), scales.data(), t.data(), s, bias.data(), y.data());
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < s.N; ++n) {
      double acc = bias[size_t(n)];
      for (int64_t k = 0; k < s.K; ++k)
        acc += double(x[size_t(m * s.K + k)]) * t[codes[size_t(n * s.K + k)]] * half_to_float(scales[size_t(n * 3 + k / 32)]);
      EXPECT_NEAR(y[size_t(m * s.N + n)], acc, 1e-5 * (1 + std::fabs(acc)));
    }
}
