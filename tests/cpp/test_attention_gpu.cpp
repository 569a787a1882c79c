// Decode attention on the GPU (src/cuda/decode_attention.cu) against the CPU reference: random cases
// over B, KV heads, G, S (one and many chunks, splits of several chunks, S not a multiple of 64), D,
// dtype, masks (none, one row for all sequences, per-sequence prefixes, random holes, a sequence with
// nothing to attend) and caches longer than S, both kernel variants; bitwise reproducible; bad
// arguments rejected.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "gpu_test_util.h"
#include "lutmm/attention.h"

using namespace lutmm;
using namespace lutmm_test;

namespace {

struct Case {
  int64_t B, Hkv, G, S, S_max, D;
  DType dt;
  int mask_kind;  // 0 none, 1 one row for all, 2 per-sequence prefixes, 3 random holes + an empty sequence
};

// Runs a case on the GPU twice and on the CPU; returns the max |gpu - ref| / max |ref| over non-NaN
// outputs (NaN must match NaN).
double run_case(const Case& c, std::mt19937& rng, gpu::AttnKernel kernel) {
  auto cvt = [&](float f) { return to_dtype(f, c.dt); };
  auto back = [&](uint16_t h) { return from_dtype(h, c.dt); };
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<uint16_t> q(size_t(c.B * c.Hkv * c.G * c.D)), k(size_t(c.B * c.Hkv * c.S_max * c.D)), v(k.size());
  for (auto& x : q) x = cvt(nd(rng));
  for (auto& x : k) x = cvt(2.f * nd(rng));  // scores of a few units: peaked softmaxes
  for (auto& x : v) x = cvt(nd(rng));
  std::vector<uint8_t> mask;
  int64_t mask_rows = 0;
  if (c.mask_kind == 1) {
    mask_rows = 1;
    mask.assign(size_t(c.S), 1);
    for (int64_t s = c.S * 3 / 4; s < c.S; ++s) mask[size_t(s)] = 0;  // a static cache's unused tail
    mask[0] = 1;
  } else if (c.mask_kind >= 2) {
    mask_rows = c.B;
    mask.assign(size_t(c.B * c.S), 0);
    std::uniform_int_distribution<int64_t> len(1, c.S);
    std::bernoulli_distribution hole(0.3);
    for (int64_t b = 0; b < c.B; ++b) {
      const int64_t n = len(rng);
      for (int64_t s = 0; s < n; ++s) mask[size_t(b * c.S + s)] = c.mask_kind == 3 ? !hole(rng) : 1;
    }
    if (c.mask_kind == 3) std::fill(mask.begin(), mask.begin() + c.S, 0);  // sequence 0: nothing attends
  }
  DecodeAttentionProblem p;
  p.dtype = c.dt;
  p.B = c.B; p.Hkv = c.Hkv; p.G = c.G; p.S = c.S; p.D = c.D;
  p.k_stride_b = p.v_stride_b = c.Hkv * c.S_max * c.D;
  p.k_stride_h = p.v_stride_h = c.S_max * c.D;
  p.mask_stride_b = mask_rows > 1 ? c.S : 0;
  p.scale = 1.f / std::sqrt(float(c.D));
  std::vector<uint16_t> ref(q.size());
  DecodeAttentionProblem h = p;
  h.q = q.data(); h.k = k.data(); h.v = v.data(); h.mask = mask.empty() ? nullptr : mask.data(); h.out = ref.data();
  reference_decode_attention(h);

  DevBuf<void> dq(q), dk(k), dv(v), dm(mask), dout(q.size() * 2);
  p.q = dq.p; p.k = dk.p; p.v = dv.p; p.mask = mask.empty() ? nullptr : static_cast<uint8_t*>(dm.p); p.out = dout.p;
  const size_t ws_bytes = gpu::decode_attention_workspace_bytes(p.B, p.Hkv, p.G, p.S, p.D, 0);
  DevBuf<void> ws(ws_bytes);
  std::vector<uint16_t> y1(q.size()), y2(q.size());
  for (auto* y : {&y1, &y2}) {
    EXPECT_EQ(cudaMemset(dout.p, 0xff, q.size() * 2), cudaSuccess);  // poisoned: NaN in both dtypes
    EXPECT_EQ(cudaMemset(ws.p, 0x7f, ws_bytes), cudaSuccess);
    gpu::decode_attention(p, ws.p, ws_bytes, nullptr, kernel);
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(y->data(), dout.p, q.size() * 2, cudaMemcpyDeviceToHost), cudaSuccess);
  }
  EXPECT_EQ(std::memcmp(y1.data(), y2.data(), y1.size() * 2), 0) << "not reproducible";
  double err = 0, mag = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const float r = back(ref[i]), g = back(y1[i]);
    if (std::isnan(r) || std::isnan(g)) {
      EXPECT_TRUE(std::isnan(r) && std::isnan(g)) << "element " << i << ": ref " << r << ", gpu " << g;
      continue;
    }
    err = std::max(err, double(std::fabs(r - g)));
    mag = std::max(mag, double(std::fabs(r)));
  }
  return err / std::max(mag, 1e-6);
}

}  // namespace

TEST(GpuAttention, RandomizedAgainstReference) {
  REQUIRE_GPU();
  std::mt19937 rng(2026);
  const Case fixed[] = {{1, 8, 4, 392, 392, 128, DType::BF16, 1},    // LLaMA-3-8B decode, batch 1
                        {16, 8, 4, 392, 400, 128, DType::BF16, 2},   // batch 16, per-sequence lengths
                        {2, 8, 8, 5000, 5120, 128, DType::F16, 2},   // 70B heads, long context: splits of chunks
                        {3, 2, 3, 65, 65, 64, DType::BF16, 3},       // holes, an empty sequence (NaN)
                        {1, 1, 1, 1, 1, 64, DType::F16, 0},          // one position
                        {4, 4, 2, 127, 256, 128, DType::F16, 0}};
  for (gpu::AttnKernel kernel : {gpu::AttnKernel::kMma, gpu::AttnKernel::kWide})
    for (const Case& c : fixed) {
      const double e = run_case(c, rng, kernel);
      EXPECT_LT(e, c.dt == DType::BF16 ? 1.2e-2 : 2e-3)
          << "kernel " << int(kernel) << " B=" << c.B << " Hkv=" << c.Hkv << " G=" << c.G << " S=" << c.S;
    }
  std::uniform_int_distribution<int> pick(0, 1000000);
  for (int t = 0; t < 60; ++t) {
    Case c{1 + pick(rng) % 5, 1 + pick(rng) % 4, 1 + pick(rng) % 8, 1 + pick(rng) % 700, 0,
           pick(rng) % 2 ? 128 : 64, pick(rng) % 2 ? DType::BF16 : DType::F16, pick(rng) % 4};
    c.S_max = c.S + (pick(rng) % 3) * 16;
    const auto kernel = gpu::AttnKernel(t % 3);  // kAuto, kMma, kWide
    const double e = run_case(c, rng, kernel);
    EXPECT_LT(e, c.dt == DType::BF16 ? 1.2e-2 : 2e-3) << "case " << t << " kernel " << int(kernel) << ": B=" << c.B << " Hkv=" << c.Hkv
                                                       << " G=" << c.G << " S=" << c.S << " D=" << c.D;
  }
}

TEST(GpuAttention, RejectsBadArguments) {
  REQUIRE_GPU();
  DevBuf<void> buf(1 << 20);
  DecodeAttentionProblem p;
  p.B = 1; p.Hkv = 1; p.G = 4; p.S = 16; p.D = 128;
  p.q = p.k = p.v = buf.p;
  p.out = buf.p;
  p.scale = 0.1f;
  const size_t need = gpu::decode_attention_workspace_bytes(p.B, p.Hkv, p.G, p.S, p.D, 0);
  EXPECT_GT(need, 0u);
  EXPECT_THROW(gpu::decode_attention(p, buf.p, need - 1, nullptr), Error);  // workspace too small
  p.G = 16;
  EXPECT_THROW(gpu::decode_attention(p, buf.p, 1 << 20, nullptr), Error);
  p.G = 4;
  EXPECT_THROW(gpu::decode_attention(p, buf.p, 1 << 20, nullptr, gpu::AttnKernel(7)), Error);  // no such variant
}
