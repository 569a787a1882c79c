// Helpers for the C++ tests: random weights and quantized layers.
#pragma once
#include <cstdint>
#include <random>
#include <vector>

#include "../../src/half.h"
#include "lutmm/format.h"

namespace lutmm_test {

inline std::vector<float> gaussian(size_t n, uint32_t seed, float sigma = 1.f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.f, sigma);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

inline std::vector<float> student_t(size_t n, uint32_t seed, float dof = 3.f) {
  std::mt19937 rng(seed);
  std::student_t_distribution<float> d(dof);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

inline std::vector<uint8_t> random_codes(size_t n, int bits, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<uint8_t> v(n);
  for (auto& x : v) x = uint8_t(rng() % (1u << bits));
  return v;
}

// Random fp16 scales in [lo, hi].
inline std::vector<uint16_t> random_scales(size_t n, uint32_t seed, float lo = 0.01f, float hi = 0.1f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<uint16_t> v(n);
  for (auto& x : v) x = lutmm::float_to_half(d(rng));
  return v;
}

}  // namespace lutmm_test
