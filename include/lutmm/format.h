// lutmm: the logical quantization format and its validation.
//
//   W is N x K (out_features x in_features), X is M x K, Y is M x N.
//   Q[n,k] in [0, 2^bits)                codes, one per weight
//   S[n, k / g]                          per-group scales, G = K / g groups per row
//   T[0 .. 2^bits)                       one table of values per layer
//   W_hat[n,k] = T[Q[n,k]] * S[n, k/g];  Y = X W_hat^T (+ bias)
//
// See docs/format.md for the packed (GPU) layout.
#pragma once
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace lutmm {

// Every bad-input error lutmm raises. The message names the argument, the value it got and what it
// expects; the Python layer maps it to ValueError.
struct Error : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// Builds error messages without iostreams (their locale state is not safe to share between two
// C++ runtimes in one process, as in a Python extension linked with a static libstdc++).
struct Msg {
  std::string s;
  Msg& operator<<(const char* v) { s += v; return *this; }
  Msg& operator<<(const std::string& v) { s += v; return *this; }
  Msg& operator<<(const void* v) { char b[32]; std::snprintf(b, sizeof b, "%p", v); s += b; return *this; }
  template <typename T, typename = std::enable_if_t<std::is_arithmetic_v<T>>>
  Msg& operator<<(T v) {
    if constexpr (std::is_floating_point_v<T>) {
      char b[32];
      std::snprintf(b, sizeof b, "%g", double(v));
      s += b;
    } else {
      s += std::to_string(v);
    }
    return *this;
  }
  const std::string& str() const { return s; }
};

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };
const char* dtype_name(DType t);

// Packed-layout unit: a block of 16 weight rows x 128 input columns (see docs/format.md).
constexpr int kBlockRows = 16;
constexpr int kBlockCols = 128;
// K must be a multiple of this (and of the group size).
constexpr int kKMultiple = 32;
// The group sizes of the format besides K itself (one group per row); Python's lutmm.nn.MODEL_GROUP_SIZES.
constexpr int64_t kGroupSizes[] = {32, 64, 128, 256};
// Largest N and K (int32 dimensions, as the kernels index them) and largest N x K (2^48 weights: every byte
// count of the format then fits int64 with room to spare).
constexpr int64_t kMaxDim = (int64_t{1} << 31) - 1;
constexpr int64_t kMaxWeights = int64_t{1} << 48;

struct Shape {
  int64_t N = 0;         // out_features (rows of W)
  int64_t K = 0;         // in_features (columns of W)
  int bits = 4;          // 2, 3 or 4
  int64_t group_size = 128;  // one of kGroupSizes, or K (one group per row)

  int64_t groups() const { return K / group_size; }                  // G
  int table_size() const { return 1 << bits; }                       // 2^bits
  int64_t n_pad() const { return (N + kBlockRows - 1) / kBlockRows * kBlockRows; }
  int64_t k_pad() const { return (K + kBlockCols - 1) / kBlockCols * kBlockCols; }
  int64_t row_blocks() const { return n_pad() / kBlockRows; }
  int64_t col_blocks() const { return k_pad() / kBlockCols; }
  int64_t block_bytes() const { return kBlockRows * kBlockCols * bits / 8; }     // 256 * bits
  int64_t packed_bytes() const { return row_blocks() * col_blocks() * block_bytes(); }
  // Packed scales: [row_blocks][G][8][2] fp16, rows (r, r+8) of a block side by side.
  int64_t packed_scale_count() const { return row_blocks() * groups() * kBlockRows; }
};

// Throws lutmm::Error unless bits, group size, N and K form a valid shape.
void validate_shape(const Shape& s);
// Throws unless `table` has 2^bits finite entries (`what` names the argument in the message).
void validate_table(const float* table, int64_t len, int bits, const char* what = "table");

}  // namespace lutmm
