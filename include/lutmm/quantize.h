// CPU quantizer: weight -> (codes Q, fp16 scales S) for a given table T, and k-means tables.
#pragma once
#include <cstdint>
#include <vector>

#include "lutmm/format.h"

namespace lutmm {

struct QuantizeOptions {
  // Search each group's scale over `grid_points` shrink factors of the absmax scale, from 1 down to
  // `min_shrink`, then refine the best by least squares; false = plain absmax scale.
  bool search_scale = true;
  int grid_points = 16;
  float min_shrink = 0.625f;
  // Optional per-input-column importance (K floats >= 0, e.g. E[x_k^2] from calibration data): the
  // group error minimised is sum_k importance[k] * (w - w_hat)^2. nullptr = all ones.
  const float* importance = nullptr;
};

// Quantizes W (N x K, row-major, dtype F32/F16/BF16) with table T (2^bits floats).
// Writes codes (N x K bytes, values < 2^bits) and scales (N x G fp16 bit patterns).
// Throws lutmm::Error on invalid shape/table or non-finite weights (naming the first bad element).
void quantize(const void* W, DType dtype, const Shape& shape, const float* table,
              const QuantizeOptions& opt, uint8_t* codes, uint16_t* scales_f16);

// Learns a per-layer table by Lloyd's k-means on the scale-normalised weights, starting from `init`
// (2^bits entries). Never returns a table whose quantization error (with searched scales) is worse
// than that of `init`.
std::vector<float> kmeans_table(const void* W, DType dtype, const Shape& shape, const float* init,
                                const QuantizeOptions& opt, int iterations = 8);

// Sum over all weights of importance[k] * (W - W_hat)^2 for given codes and scales.
double quantization_error(const void* W, DType dtype, const Shape& shape, const float* table,
                          const uint8_t* codes, const uint16_t* scales_f16,
                          const float* importance = nullptr);

}  // namespace lutmm
