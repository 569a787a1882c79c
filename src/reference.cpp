#include "lutmm/reference.h"

#include <string>
#include <vector>

#include "half.h"
#include "parallel.h"
#include "lutmm/pack.h"

namespace lutmm {

void dequantize(const uint8_t* codes, const uint16_t* scales, const float* table, const Shape& s, float* out) {
  validate_shape(s);
  validate_table(table, s.table_size(), s.bits);
  const int64_t G = s.groups();
  for (int64_t i = 0; i < s.N * s.K; ++i)
    if (codes[i] >= s.table_size())
      throw Error("codes: element " + std::to_string(i) + " is " + std::to_string(codes[i]) +
                  ", expected < 2^bits = " + std::to_string(s.table_size()));
  parallel_for(0, s.N, [&](int64_t n) {
    for (int64_t k = 0; k < s.K; ++k)
      out[n * s.K + k] = table[codes[n * s.K + k]] * half_to_float(scales[n * G + k / s.group_size]);
  });
}

void dequantize_packed(const uint8_t* packed, const uint16_t* packed_scales, const float* table, const Shape& s,
                       float* out) {
  validate_shape(s);
  validate_table(table, s.table_size(), s.bits);
  const int64_t G = s.groups();
  const int lo_mask = s.bits == 3 ? 3 : (1 << s.bits) - 1;
  parallel_for(0, s.N, [&](int64_t n) {
    for (int64_t k = 0; k < s.K; ++k) {
      const CodePosition p = code_position(s, n, k);
      int q = (packed[p.byte] >> p.shift) & lo_mask;
      if (p.hi_byte >= 0) q |= ((packed[p.hi_byte] >> p.hi_shift) & 1) << 2;
      const int64_t nb = n / 16, r = n % 16, grp = k / s.group_size;
      out[n * s.K + k] = table[q] * half_to_float(packed_scales[(nb * G + grp) * 16 + (r % 8) * 2 + r / 8]);
    }
  });
}

void reference_matmul(const void* X, DType x_dtype, int64_t M, const uint8_t* codes, const uint16_t* scales,
                      const float* table, const Shape& s, const float* bias, float* Y) {
  validate_shape(s);
  if (M < 1) throw Error("M: expected >= 1");
  std::vector<float> w(size_t(s.N * s.K));
  dequantize(codes, scales, table, s, w.data());
  std::vector<double> x(size_t(M * s.K));
  for (int64_t i = 0; i < M * s.K; ++i) x[i] = load_as_float(X, int(x_dtype), i);
  parallel_for(0, M * s.N, [&](int64_t i) {
    const int64_t m = i / s.N, n = i % s.N;
    double acc = bias ? bias[n] : 0.0;
    const double* xr = &x[size_t(m * s.K)];
    const float* wr = &w[size_t(n * s.K)];
    for (int64_t k = 0; k < s.K; ++k) acc += xr[k] * double(wr[k]);
    Y[m * s.N + n] = float(acc);
  });
}

}  // namespace lutmm
