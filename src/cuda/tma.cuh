// Host side of TMA (the Hopper tensor copy engine): 2-D tensor-map descriptors for the kernels that
// load tiles with cp.async.bulk.tensor (lut_wgmma.cu: activations; lut_stream.cu: codes, scales).
#pragma once
#include <cuda.h>  // CUtensorMap (the encoder is fetched from the driver at run time: no -lcuda)

#include <algorithm>
#include <mutex>
#include <string>

#include "common.cuh"

namespace lutmm {
namespace gpu {

using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
// cuTensorMapEncodeTiled from the driver (the runtime library has no wrapper).
inline EncodeTiledFn encode_tiled() {
  static std::once_flag once;
  static EncodeTiledFn fn = nullptr;
  std::call_once(once, [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) == cudaSuccess &&
        q == cudaDriverEntryPointSuccess)
      fn = reinterpret_cast<EncodeTiledFn>(f);
    cudaGetLastError();
  });
  if (!fn) throw Error("TMA: cuTensorMapEncodeTiled not available from the CUDA driver");
  return fn;
}

// Descriptor of a RANK-dimensional tensor (dims innermost first, byte strides of dims 1.. RANK-1) read in
// boxes of `box`, zeros outside the tensor. `what` names it in errors.
template <int RANK>
inline CUtensorMap tensor_map(const void* base, CUtensorMapDataType type, const cuuint64_t (&dims)[RANK],
                              const cuuint64_t (&strides)[RANK - 1], const cuuint32_t (&box)[RANK],
                              CUtensorMapSwizzle swizzle, const std::string& what) {
  CUtensorMap m;
  cuuint32_t estrides[RANK];
  std::fill(estrides, estrides + RANK, cuuint32_t(1));
  const CUresult r = encode_tiled()(&m, type, RANK, const_cast<void*>(base), dims, strides, box, estrides,
                                    CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                    CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    throw Error(std::string("TMA: cuTensorMapEncodeTiled failed (") + std::to_string(int(r)) + ") for " + what);
  return m;
}

// Descriptor of a row-major 2-D tensor (`rows` x `cols` elements of `type`, rows `row_bytes` apart)
// read in boxes of box_rows x box_cols, zeros outside the tensor. `what` names it in errors.
inline CUtensorMap tensor_map_2d(const void* base, CUtensorMapDataType type, int64_t rows, int64_t cols,
                                 int64_t row_bytes, int box_rows, int box_cols, CUtensorMapSwizzle swizzle,
                                 const char* what) {
  return tensor_map<2>(base, type, {cuuint64_t(cols), cuuint64_t(rows)}, {cuuint64_t(row_bytes)},
                       {cuuint32_t(box_cols), cuuint32_t(box_rows)}, swizzle,
                       std::string(what) + " of " + std::to_string(rows) + " x " + std::to_string(cols));
}

// The packed codes as a 2-D array of 32-bit words, [row_blocks][col_blocks * 256 * BITS / 4] (the blocks of a
// row block lie consecutively along K: docs/format.md), read in boxes of `box_rows` row blocks x `box_words`.
template <int BITS>
inline CUtensorMap codes_tensor_map(const GemmProblem& prob, int box_rows, int box_words) {
  const Shape& s = prob.shape;
  const int64_t row_bytes = s.col_blocks() * (256 * BITS);
  return tensor_map_2d(prob.packed, CU_TENSOR_MAP_DATA_TYPE_UINT32, s.row_blocks(), row_bytes / 4, row_bytes, box_rows,
                       box_words, CU_TENSOR_MAP_SWIZZLE_NONE, "packed codes");
}
// The packed codes as a 3-D array of 32-bit words, [row_blocks][col_blocks][256 * BITS / 4], read in boxes of
// `box_rows` row blocks x `box_kblocks` k-blocks x one block (lut_stream.cu's row tiles).
template <int BITS>
inline CUtensorMap codes_tensor_map_3d(const GemmProblem& prob, int box_rows, int box_kblocks) {
  const Shape& s = prob.shape;
  return tensor_map<3>(prob.packed, CU_TENSOR_MAP_DATA_TYPE_UINT32,
                       {cuuint64_t(64 * BITS), cuuint64_t(s.col_blocks()), cuuint64_t(s.row_blocks())},
                       {cuuint64_t(256 * BITS), cuuint64_t(s.col_blocks() * 256 * BITS)},
                       {cuuint32_t(64 * BITS), cuuint32_t(box_kblocks), cuuint32_t(box_rows)}, CU_TENSOR_MAP_SWIZZLE_NONE,
                       "the packed codes");
}
// The activations (M x K, K a multiple of 128) as [M][K / 128][128], read in boxes of one token x 8 k-blocks
// (lut_stream.cu's tiles of one row block).
inline CUtensorMap x_rows_1d(const void* x, CUtensorMapDataType type, int64_t M, int64_t K) {
  return tensor_map<3>(x, type, {128, cuuint64_t(K / 128), cuuint64_t(M)}, {256, cuuint64_t(K * 2)}, {128, 8, 1},
                       CU_TENSOR_MAP_SWIZZLE_NONE, "x");
}
// The packed scales, [row_blocks][G * 16] fp16, read in boxes of `box_rows` row blocks x the 16 * gpk scales of
// one k-block's groups (gpk = groups_per_kblock(gl)).
// box_kblocks > 1 (row tiles): that many k-blocks' groups, for g <= 128 (each k-block has its own groups).
inline CUtensorMap scales_tensor_map(const GemmProblem& prob, int box_rows, int box_kblocks = 1) {
  const Shape& s = prob.shape;
  const int gpk = groups_per_kblock(group_log2(s.group_size));
  return tensor_map_2d(prob.packed_scales, CU_TENSOR_MAP_DATA_TYPE_UINT16, s.row_blocks(), s.groups() * 16,
                       s.groups() * 32, box_rows, 16 * gpk * box_kblocks, CU_TENSOR_MAP_SWIZZLE_NONE, "packed scales");
}

}  // namespace gpu
}  // namespace lutmm
