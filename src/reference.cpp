#include "lutmm/reference.h"

#include <cmath>
#include <cstring>
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
  const int64_t G = s.groups(), cbs = s.col_blocks(), bb = s.block_bytes();
  // Walks each block lane by lane, as the GPU does (see pack.h for the layout).
  parallel_for(0, s.row_blocks(), [&](int64_t nb) {
    for (int64_t kb = 0; kb < cbs; ++kb) {
      const uint8_t* blk = packed + (nb * cbs + kb) * bb;
      for (int lane = 0; lane < 32; ++lane) {
        const int g = lane / 4, t = lane % 4;
        uint32_t wd[8] = {}, hi[2] = {};
        if (s.bits == 4) {
          std::memcpy(wd, blk + lane * 16, 16);
          std::memcpy(wd + 4, blk + 512 + lane * 16, 16);
        } else {
          std::memcpy(wd, blk + lane * 16, 16);
          if (s.bits == 3) std::memcpy(hi, blk + 512 + lane * 8, 8);
        }
        for (int ks = 0; ks < 8; ++ks) {
          const int64_t col0 = kb * kBlockCols + 32 * (ks / 2) + 8 * t + 4 * (ks % 2);
          if (col0 >= s.K) continue;
          for (int p = 0; p < 4; ++p) {
            const int r = g + 8 * (p & 1);
            const int64_t row = nb * kBlockRows + r, col = col0 + 2 * (p >> 1);
            if (row >= s.N) continue;
            int q0, q1;
            if (s.bits == 4) {
              const int idx = (wd[ks] >> (8 * p)) & 0xff;
              q0 = idx & 15; q1 = idx >> 4;
            } else if (s.bits == 2) {
              const int idx = (wd[ks / 2] >> (4 * ((ks % 2) * 4 + p))) & 0xf;
              q0 = idx & 3; q1 = idx >> 2;
            } else {  // pair i = 4 ks + p: bits 6 i .. 6 i + 5 of the lane's stream wd[0..3], hi[0..1]
              const uint32_t stream[6] = {wd[0], wd[1], wd[2], wd[3], hi[0], hi[1]};
              const int bit = 6 * (4 * ks + p), w = bit / 32;
              const uint64_t two = stream[w] | (w < 5 ? uint64_t(stream[w + 1]) << 32 : 0);
              const int idx = int(two >> (bit % 32)) & 63;
              q0 = idx & 7; q1 = idx >> 3;
            }
            const float sc = half_to_float(packed_scales[(nb * G + col / s.group_size) * 16 + (r % 8) * 2 + r / 8]);
            out[row * s.K + col] = table[q0] * sc;
            out[row * s.K + col + 1] = table[q1] * sc;
          }
        }
      }
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

void reference_silu_mul(const float* Z, int64_t M, int64_t N, float* Y) {
  if (M < 1 || N < 16 || N % 16 != 0) throw Error("reference_silu_mul: expected M >= 1 and N a multiple of 16");
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < N / 16; ++j)
      for (int r = 0; r < 8; ++r) {
        const double g = Z[m * N + 16 * j + r], u = Z[m * N + 16 * j + 8 + r];
        Y[m * (N / 2) + 8 * j + r] = float(g / (1.0 + std::exp(-g)) * u);
      }
}

}  // namespace lutmm
