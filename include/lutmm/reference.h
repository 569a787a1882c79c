// CPU reference: the oracle every GPU test compares against.
#pragma once
#include <cstdint>

#include "lutmm/format.h"

namespace lutmm {

// W_hat[n,k] = T[Q[n,k]] * S[n, k/g] as fp32 (N x K). codes: N x K bytes; scales: N x G fp16.
void dequantize(const uint8_t* codes, const uint16_t* scales_f16, const float* table, const Shape& shape,
                float* out);

// The same W_hat straight from the packed layout (pack.h): packed codes and packed fp16 scales.
void dequantize_packed(const uint8_t* packed, const uint16_t* packed_scales, const float* table, const Shape& shape,
                       float* out);

// Y[m,n] = sum_k X[m,k] * W_hat[n,k] (+ bias[n]) with fp64 accumulation. X: M x K of `x_dtype`;
// bias: N floats or nullptr; Y: M x N fp32.
void reference_matmul(const void* X, DType x_dtype, int64_t M, const uint8_t* codes, const uint16_t* scales_f16,
                      const float* table, const Shape& shape, const float* bias, float* Y);

// The gated-MLP epilogue (gpu::Epilogue::kSiluMul) on a reference product Z (M x N, N a multiple of 16,
// gate and up rows interleaved by 8): Y[m][8j + r] = silu(Z[m][16j + r]) * Z[m][16j + 8 + r], Y M x N/2.
void reference_silu_mul(const float* Z, int64_t M, int64_t N, float* Y);

}  // namespace lutmm
