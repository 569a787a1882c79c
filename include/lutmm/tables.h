// Value tables T (2^bits entries) for the LUT format.
#pragma once
#include <vector>

namespace lutmm {

// Symmetric uniform integer grid: T[i] = (i - 2^(b-1)) / (2^(b-1) - 1), i.e. the integers
// -2^(b-1) .. 2^(b-1)-1 normalised so that +1 is the largest entry (4 bits: -8/7 .. 7/7).
std::vector<float> int_table(int bits);

// NormalFloat NF_b (QLoRA construction): 2^(b-1) positive quantiles of N(0,1), 2^(b-1)-1 negative
// ones and an exact zero, normalised to [-1, 1]. NF4 equals the bitsandbytes / QLoRA values.
std::vector<float> nf_table(int bits);

// Inverse of the standard normal CDF (double precision), used to build NF tables.
double normal_ppf(double p);

}  // namespace lutmm
