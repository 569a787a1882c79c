#include "lutmm/format.h"

#include <algorithm>
#include <cmath>
#include <iterator>

namespace lutmm {

const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "float32";
    case DType::F16: return "float16";
    case DType::BF16: return "bfloat16";
  }
  return "unknown";
}

void validate_shape(const Shape& s) {
  Msg msg;
  if (s.bits != 2 && s.bits != 3 && s.bits != 4) {
    msg << "bits: got " << s.bits << ", expected 2, 3 or 4";
    throw Error(msg.str());
  }
  if (s.N < 1) {
    msg << "N (out_features): got " << s.N << ", expected >= 1";
    throw Error(msg.str());
  }
  if (s.K < kKMultiple || s.K % kKMultiple != 0) {
    msg << "K (in_features): got " << s.K << ", expected a positive multiple of " << kKMultiple;
    throw Error(msg.str());
  }
  if (s.N > kMaxDim || s.K > kMaxDim || s.N > kMaxWeights / s.K) {
    msg << "shape: N x K = " << s.N << " x " << s.K << " is beyond the format's limits (N, K < 2^31, N x K <= 2^48)";
    throw Error(msg.str());
  }
  const int64_t g = s.group_size;
  if (std::find(std::begin(kGroupSizes), std::end(kGroupSizes), g) == std::end(kGroupSizes) && g != s.K) {
    msg << "group_size: got " << g << ", expected ";
    for (int64_t v : kGroupSizes) msg << v << ", ";
    msg << "or K (= " << s.K << ")";
    throw Error(msg.str());
  }
  if (s.K % g != 0) {
    msg << "K (in_features): got " << s.K << ", expected a multiple of group_size " << g;
    throw Error(msg.str());
  }
}

void validate_table(const float* table, int64_t len, int bits, const char* what) {
  Msg msg;
  if (len != (int64_t{1} << bits)) {
    msg << what << ": got " << len << " entries, expected 2^bits = " << (1 << bits) << " for bits = " << bits;
    throw Error(msg.str());
  }
  for (int64_t i = 0; i < len; ++i) {
    if (!std::isfinite(table[i])) {
      msg << what << ": entry " << i << " is " << table[i] << ", expected a finite value";
      throw Error(msg.str());
    }
  }
}

}  // namespace lutmm
