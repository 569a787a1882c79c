#include "lutmm/quantize.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "half.h"
#include "parallel.h"

namespace lutmm {
namespace {

// Nearest-entry lookup for an arbitrary (unsorted, possibly repeated) table: binary search over the
// midpoints of the sorted values, then map back to the caller's code.
struct Nearest {
  float midf[16];              // midpoints, padded with +inf to 16 for a fixed-trip branchless count
  std::vector<float> mid;      // 2^b - 1 midpoints of sorted values
  std::vector<uint8_t> code;   // sorted position -> original code
  std::vector<float> value;    // sorted values
  float tmin = 0, tmax = 0;
  explicit Nearest(const float* t, int n) {
    std::vector<int> idx(n);
    std::iota(idx.begin(), idx.end(), 0);
    std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return t[a] < t[b]; });
    for (int i = 0; i < n; ++i) { code.push_back(uint8_t(idx[i])); value.push_back(t[idx[i]]); }
    for (int i = 0; i + 1 < n; ++i) mid.push_back(0.5f * (value[i] + value[i + 1]));
    for (int i = 0; i < 16; ++i) midf[i] = i < int(mid.size()) ? mid[size_t(i)] : INFINITY;
    tmin = value.front(); tmax = value.back();
  }
  // Number of midpoints <= x, i.e. the sorted position of the nearest value (ties go up, like
  // upper_bound). Branchless: measured ~2x faster than std::upper_bound here (2026-11-25).
  int sorted_pos(float x) const {
    int p = 0;
    for (int i = 0; i < 16; ++i) p += midf[i] <= x;
    return p;
  }
};

void check_finite(const void* W, DType dtype, const Shape& s) {
  std::vector<int64_t> bad_in_row(size_t(s.N), -1);
  parallel_for(0, s.N, [&](int64_t n) {
    for (int64_t k = 0; k < s.K; ++k)
      if (!std::isfinite(load_as_float(W, int(dtype), n * s.K + k))) { bad_in_row[size_t(n)] = n * s.K + k; break; }
  });
  int64_t bad = -1;
  for (int64_t v : bad_in_row) if (v >= 0) { bad = v; break; }
  if (bad >= 0) {
    Msg m;
    m << "weight: element [" << bad / s.K << ", " << bad % s.K << "] is "
      << load_as_float(W, int(dtype), bad) << ", expected finite values (no NaN/Inf)";
    throw Error(m.str());
  }
}

// Quantizes one group of `len` weights `w` (importance `imp`, may be null) with scale s; returns
// the weighted squared error and writes sorted positions to `pos`.
double quantize_group_at(const float* w, const float* imp, int len, float s, const Nearest& nt, uint8_t* pos) {
  double err = 0;
  const float inv = s != 0.f ? 1.f / s : 0.f;
  for (int i = 0; i < len; ++i) {
    const int p = s != 0.f ? nt.sorted_pos(w[i] * inv) : nt.sorted_pos(0.f);
    pos[i] = uint8_t(p);
    const double d = double(w[i]) - double(s) * nt.value[p];
    err += (imp ? imp[i] : 1.0) * d * d;
  }
  return err;
}

// The smallest scale that maps the group's range inside the table's range ("absmax").
float absmax_scale(const float* w, int len, const Nearest& nt) {
  float wmax = 0, wmin = 0, amax = 0;
  for (int i = 0; i < len; ++i) { wmax = std::max(wmax, w[i]); wmin = std::min(wmin, w[i]); amax = std::max(amax, std::fabs(w[i])); }
  float s = 0;
  if (nt.tmax > 0 && wmax > 0) s = std::max(s, wmax / nt.tmax);
  if (nt.tmin < 0 && wmin < 0) s = std::max(s, wmin / nt.tmin);
  if (s == 0 && amax > 0) s = amax / std::max(std::fabs(nt.tmin), std::fabs(nt.tmax));
  return s;
}

void check_scale(float s, int64_t n, int64_t grp) {
  if (!(s < 65504.f)) {
    Msg m;
    m << "weight: group " << grp << " of row " << n << " needs scale " << s
      << ", beyond the fp16 range of the format's scales (max 65504)";
    throw Error(m.str());
  }
}

// Quantizes one group; returns its error. Writes codes (original table indices) and fp16 scale.
double quantize_group(const float* w, const float* imp, int len, const Nearest& nt, const QuantizeOptions& opt,
                      uint8_t* codes, uint16_t* scale_out, int64_t n, int64_t grp) {
  std::vector<uint8_t> pos(len), best_pos(len);
  const float s0 = absmax_scale(w, len, nt);
  check_scale(s0, n, grp);
  float best_s = round_to_half(s0);
  double best = quantize_group_at(w, imp, len, best_s, nt, best_pos.data());
  if (opt.search_scale && s0 > 0) {
    const int pts = std::max(1, opt.grid_points);
    for (int i = 1; i < pts; ++i) {
      const float f = 1.f - (1.f - opt.min_shrink) * float(i) / float(std::max(1, pts - 1));
      const float s = round_to_half(s0 * f);
      const double e = quantize_group_at(w, imp, len, s, nt, pos.data());
      if (e < best) { best = e; best_s = s; best_pos.swap(pos); }
    }
    // Least-squares refinement of the scale for the chosen codes.
    double num = 0, den = 0;
    for (int i = 0; i < len; ++i) {
      const double wi = imp ? imp[i] : 1.0, t = nt.value[best_pos[i]];
      num += wi * w[i] * t; den += wi * t * t;
    }
    if (den > 0 && num > 0) {
      const float s = round_to_half(float(num / den));
      if (s < 65504.f) {
        const double e = quantize_group_at(w, imp, len, s, nt, pos.data());
        if (e < best) { best = e; best_s = s; best_pos.swap(pos); }
      }
    }
  }
  for (int i = 0; i < len; ++i) codes[i] = nt.code[best_pos[i]];
  *scale_out = float_to_half(best_s);
  return best;
}

}  // namespace

void quantize(const void* W, DType dtype, const Shape& s, const float* table, const QuantizeOptions& opt,
              uint8_t* codes, uint16_t* scales_f16) {
  validate_shape(s);
  validate_table(table, s.table_size(), s.bits);
  check_finite(W, dtype, s);
  const Nearest nt(table, s.table_size());
  const int64_t G = s.groups(), g = s.group_size;
  parallel_for(0, s.N, [&](int64_t n) {
    std::vector<float> row(size_t(s.K));
    for (int64_t k = 0; k < s.K; ++k) row[size_t(k)] = load_as_float(W, int(dtype), n * s.K + k);
    for (int64_t j = 0; j < G; ++j)
      quantize_group(row.data() + j * g, opt.importance ? opt.importance + j * g : nullptr, int(g), nt, opt,
                     codes + n * s.K + j * g, scales_f16 + n * G + j, n, j);
  });
}

double quantization_error(const void* W, DType dtype, const Shape& s, const float* table, const uint8_t* codes,
                          const uint16_t* scales_f16, const float* importance) {
  validate_shape(s);
  const int64_t G = s.groups();
  std::vector<double> row_err(size_t(s.N), 0.0);
  parallel_for(0, s.N, [&](int64_t n) {
    double e = 0;
    for (int64_t k = 0; k < s.K; ++k) {
      const double w = load_as_float(W, int(dtype), n * s.K + k);
      const double wh = double(table[codes[n * s.K + k]]) * half_to_float(scales_f16[n * G + k / s.group_size]);
      e += (importance ? importance[k] : 1.0) * (w - wh) * (w - wh);
    }
    row_err[size_t(n)] = e;
  });
  double total = 0;
  for (double e : row_err) total += e;  // fixed order: deterministic
  return total;
}

std::vector<float> kmeans_table(const void* W, DType dtype, const Shape& s, const float* init,
                                const QuantizeOptions& opt, int iterations) {
  validate_shape(s);
  validate_table(init, s.table_size(), s.bits, "init table");
  const int T = s.table_size();
  const int64_t G = s.groups(), g = s.group_size;
  std::vector<uint8_t> codes(size_t(s.N * s.K));
  std::vector<uint16_t> scales(size_t(s.N * G));
  std::vector<float> table(init, init + T), best_table = table;
  quantize(W, dtype, s, table.data(), opt, codes.data(), scales.data());
  double best_err = quantization_error(W, dtype, s, table.data(), codes.data(), scales.data(), opt.importance);
  for (int it = 0; it < iterations; ++it) {
    // Centroid step with scales fixed: T[j] = sum imp*s*w / sum imp*s^2 over weights with code j.
    std::vector<double> rnum(size_t(s.N) * T, 0.0), rden(size_t(s.N) * T, 0.0);
    parallel_for(0, s.N, [&](int64_t n) {
      double* ln = &rnum[size_t(n) * T];
      double* ld = &rden[size_t(n) * T];
      for (int64_t k = 0; k < s.K; ++k) {
        const double sc = half_to_float(scales[n * G + k / g]);
        const double wi = opt.importance ? opt.importance[k] : 1.0;
        const int c = codes[n * s.K + k];
        ln[c] += wi * sc * load_as_float(W, int(dtype), n * s.K + k);
        ld[c] += wi * sc * sc;
      }
    });
    std::vector<double> num(T, 0.0), den(T, 0.0);
    for (int64_t n = 0; n < s.N; ++n)
      for (int j = 0; j < T; ++j) { num[j] += rnum[size_t(n) * T + j]; den[j] += rden[size_t(n) * T + j]; }
    for (int j = 0; j < T; ++j) if (den[j] > 0) table[j] = float(num[j] / den[j]);
    // Renormalise so the largest magnitude is 1 (scales absorb the factor).
    float mx = 0;
    for (float v : table) mx = std::max(mx, std::fabs(v));
    if (mx > 0) for (float& v : table) v /= mx;
    // Assignment step (codes and scales re-searched for the new table).
    quantize(W, dtype, s, table.data(), opt, codes.data(), scales.data());
    const double err = quantization_error(W, dtype, s, table.data(), codes.data(), scales.data(), opt.importance);
    if (err < best_err) { best_err = err; best_table = table; }
  }
  return best_table;
}

}  // namespace lutmm
