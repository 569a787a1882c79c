// Decode attention, host side: argument checks, the GPU kernel's split of key positions, and the CPU
// reference the GPU tests compare against (include/lutmm/attention.h).
#include "lutmm/attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "half.h"

namespace lutmm {

namespace {
void require(bool ok, const std::string& what) {
  if (!ok) throw Error("decode_attention: " + what);
}
bool aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

void validate_sizes(int64_t B, int64_t Hkv, int64_t G, int64_t S, int64_t D) {
  require(B >= 1 && Hkv >= 1 && S >= 1, "B, Hkv and S must be >= 1 (got B=" + std::to_string(B) +
                                            " Hkv=" + std::to_string(Hkv) + " S=" + std::to_string(S) + ")");
  require(G >= 1 && G <= 8, "G (query heads per KV head) must be 1..8, got " + std::to_string(G));
  require(D == 64 || D == 128, "head dimension must be 64 or 128, got " + std::to_string(D));
}
}  // namespace

void validate_decode_attention(const DecodeAttentionProblem& p) {
  require(p.dtype == DType::BF16 || p.dtype == DType::F16,
          std::string("dtype ") + dtype_name(p.dtype) + ", expected float16 or bfloat16");
  validate_sizes(p.B, p.Hkv, p.G, p.S, p.D);
  require(p.q && p.k && p.v && p.out, "q, k, v and out must be non-null");
  require(aligned(p.q, 16) && aligned(p.k, 16) && aligned(p.v, 16), "q, k and v must be 16-byte aligned");
  require(aligned(p.out, 8), "out must be 8-byte aligned");
  for (int64_t st : {p.k_stride_b, p.k_stride_h, p.v_stride_b, p.v_stride_h})
    require(st >= 0 && st % 8 == 0, "k / v strides must be non-negative multiples of 8 elements, got " +
                                        std::to_string(st));
  require(p.Hkv == 1 || p.k_stride_h >= p.S * p.D, "k: the head stride " + std::to_string(p.k_stride_h) +
                                                       " is shorter than S x D = " + std::to_string(p.S * p.D));
  require(p.Hkv == 1 || p.v_stride_h >= p.S * p.D, "v: the head stride " + std::to_string(p.v_stride_h) +
                                                       " is shorter than S x D = " + std::to_string(p.S * p.D));
  require(p.mask_stride_b >= 0, "mask_stride_b must be >= 0");
  require(std::isfinite(p.scale), "scale must be finite");
  require(p.q_stride_b == 0 || (p.q_stride_b >= p.Hkv * p.G * p.D && p.q_stride_b % 8 == 0),
          "q_stride_b " + std::to_string(p.q_stride_b) + " must be 0 or a multiple of 8 elements >= Hkv x G x D");
  const int fused = int(p.k_new != nullptr) + int(p.v_new != nullptr) + int(p.cos != nullptr) +
                    int(p.sin != nullptr) + int(p.write_pos != nullptr);
  require(fused == 0 || fused == 5, "k_new, v_new, cos, sin and write_pos must be given all together or not at all");
  if (fused) {
    require(aligned(p.k_new, 16) && aligned(p.v_new, 16) && aligned(p.cos, 16) && aligned(p.sin, 16) &&
                aligned(p.write_pos, 8),
            "k_new, v_new, cos and sin must be 16-byte aligned, write_pos 8-byte aligned");
    require(p.new_stride_b >= 0 && p.new_stride_b % 8 == 0 && p.cs_stride_b >= 0 && p.cs_stride_b % 8 == 0,
            "new_stride_b and cs_stride_b must be non-negative multiples of 8 elements");
    require(p.B == 1 || p.new_stride_b >= p.Hkv * p.D, "new_stride_b is shorter than Hkv x D");
  }
}

AttnSplit attention_split(int64_t B, int64_t Hkv, int64_t S, int64_t sms) {
  if (B < 1 || Hkv < 1 || S < 1 || sms < 1) throw Error("attention_split: B, Hkv, S and sms must be >= 1");
  const int64_t chunks = (S + kAttnChunk - 1) / kAttnChunk;
  const int64_t pairs = B * Hkv;
  const int64_t slots = kAttnCtasPerSm * sms;  // CTAs resident at once
  // Time ~ waves x chunks per CTA: pick the split with the fewest (the fewest splits on a tie: a
  // cheaper combine), looking no further than two waves.
  const int64_t most = std::clamp<int64_t>(2 * slots / pairs, 1, std::min(chunks, kAttnMaxSplits));
  AttnSplit best{1, chunks};
  int64_t best_cost = ((pairs + slots - 1) / slots) * chunks;
  for (int64_t want = 2; want <= most; ++want) {
    const int64_t per = (chunks + want - 1) / want;
    const int64_t splits = (chunks + per - 1) / per;
    const int64_t cost = ((pairs * splits + slots - 1) / slots) * per;
    if (cost < best_cost) best = {splits, per}, best_cost = cost;
  }
  return best;
}

bool attention_wide(int64_t B, int64_t Hkv, int64_t S, int64_t sms) {
  if (B < 1 || Hkv < 1 || S < 1 || sms < 1) throw Error("attention_wide: B, Hkv, S and sms must be >= 1");
  return 8 * B * Hkv >= sms && B * Hkv <= sms && (S + kAttnChunk - 1) / kAttnChunk <= kAttnWideMaxChunks;
}

size_t attention_workspace_bytes(int64_t B, int64_t Hkv, int64_t G, int64_t S, int64_t D, int64_t sms) {
  validate_sizes(B, Hkv, G, S, D);
  const int64_t splits = attention_split(B, Hkv, S, sms).splits;
  return size_t(B * Hkv * splits * G) * size_t(D + 2) * sizeof(float);
}

void reference_decode_attention(const DecodeAttentionProblem& p) {
  validate_decode_attention(p);
  const bool bf = p.dtype == DType::BF16;
  auto get = [&](const void* base, int64_t i) {
    const uint16_t h = static_cast<const uint16_t*>(base)[i];
    return double(bf ? bf16_to_float(h) : half_to_float(h));
  };
  std::vector<double> sc(size_t(p.S)), acc(size_t(p.D));
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t h = 0; h < p.Hkv; ++h)
      for (int64_t j = 0; j < p.G; ++j) {
        const int64_t qo = ((b * p.Hkv + h) * p.G + j) * p.D;
        double m = -std::numeric_limits<double>::infinity();
        for (int64_t s = 0; s < p.S; ++s) {
          const bool on = !p.mask || p.mask[b * p.mask_stride_b + s] != 0;
          double dot = 0;
          const int64_t ko = b * p.k_stride_b + h * p.k_stride_h + s * p.D;
          if (on)
            for (int64_t d = 0; d < p.D; ++d) dot += get(p.q, qo + d) * get(p.k, ko + d);
          sc[size_t(s)] = on ? dot * p.scale : -std::numeric_limits<double>::infinity();
          m = std::max(m, sc[size_t(s)]);
        }
        std::fill(acc.begin(), acc.end(), 0.0);
        double l = 0;
        for (int64_t s = 0; s < p.S && m > -std::numeric_limits<double>::infinity(); ++s) {
          if (sc[size_t(s)] == -std::numeric_limits<double>::infinity()) continue;
          const double e = std::exp(sc[size_t(s)] - m);
          l += e;
          const int64_t vo = b * p.v_stride_b + h * p.v_stride_h + s * p.D;
          for (int64_t d = 0; d < p.D; ++d) acc[size_t(d)] += e * get(p.v, vo + d);
        }
        uint16_t* out = static_cast<uint16_t*>(p.out) + qo;
        for (int64_t d = 0; d < p.D; ++d) {
          const float o = l > 0 ? float(acc[size_t(d)] / l) : std::numeric_limits<float>::quiet_NaN();
          out[d] = bf ? float_to_bf16(o) : float_to_half(o);
        }
      }
}

}  // namespace lutmm
