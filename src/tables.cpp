#include "lutmm/tables.h"

#include <algorithm>
#include <cmath>

#include "lutmm/format.h"

namespace lutmm {
namespace {
void check_bits(int bits) {
  if (bits < 2 || bits > 4) {
    Msg m;
    m << "bits: got " << bits << ", expected 2, 3 or 4";
    throw Error(m.str());
  }
}
// linspace(a, b, n) in double precision.
std::vector<double> linspace(double a, double b, int n) {
  std::vector<double> v(n);
  for (int i = 0; i < n; ++i) v[i] = n == 1 ? a : a + (b - a) * i / (n - 1);
  return v;
}
}  // namespace

std::vector<float> int_table(int bits) {
  check_bits(bits);
  const int half = 1 << (bits - 1);
  std::vector<float> t(1 << bits);
  for (int i = 0; i < (1 << bits); ++i) t[i] = float(double(i - half) / double(half - 1));
  return t;
}

double normal_ppf(double p) {
  if (!(p > 0.0 && p < 1.0)) throw Error("normal_ppf: p must lie in (0, 1)");
  // Acklam's rational approximation, then two Newton steps on erfc for full double precision.
  static const double a[] = {-3.969683028665376e+01, 2.209460984245205e+02, -2.759285104469687e+02,
                             1.383577518672690e+02, -3.066479806614716e+01, 2.506628277459239e+00};
  static const double b[] = {-5.447609879822406e+01, 1.615858368580409e+02, -1.556989798598866e+02,
                             6.680131188771972e+01, -1.328068155288572e+01};
  static const double c[] = {-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e+00,
                             -2.549732539343734e+00, 4.374664141464968e+00, 2.938163982698783e+00};
  static const double d[] = {7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e+00,
                             3.754408661907416e+00};
  double x;
  const double lo = 0.02425;
  if (p < lo) {
    double q = std::sqrt(-2 * std::log(p));
    x = (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) /
        ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1);
  } else if (p <= 1 - lo) {
    double q = p - 0.5, r = q * q;
    x = (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q /
        (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1);
  } else {
    double q = std::sqrt(-2 * std::log(1 - p));
    x = -(((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) /
        ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1);
  }
  for (int it = 0; it < 2; ++it) {
    double cdf = 0.5 * std::erfc(-x / std::sqrt(2.0));
    double pdf = std::exp(-0.5 * x * x) / std::sqrt(2 * M_PI);
    x -= (cdf - p) / pdf;
  }
  return x;
}

std::vector<float> nf_table(int bits) {
  check_bits(bits);
  const double offset = 0.9677083;  // QLoRA's choice: the outermost quantile of the 4-bit table
  const int pos = 1 << (bits - 1), neg = (1 << (bits - 1)) - 1;
  std::vector<double> v;
  auto ppos = linspace(offset, 0.5, pos + 1);
  for (int i = 0; i < pos; ++i) v.push_back(normal_ppf(ppos[i]));
  auto pneg = linspace(offset, 0.5, neg + 1);
  for (int i = 0; i < neg; ++i) v.push_back(-normal_ppf(pneg[i]));
  v.push_back(0.0);
  std::sort(v.begin(), v.end());
  const double mx = v.back();
  std::vector<float> t(v.size());
  for (size_t i = 0; i < v.size(); ++i) t[i] = float(v[i] / mx);
  return t;
}

}  // namespace lutmm
