// Decode attention, host side: the GPU kernel's split of key positions, argument checks, and the CPU
// reference on cases whose answer is known in closed form.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "../../src/half.h"
#include "lutmm/attention.h"

using namespace lutmm;

TEST(Attention, SplitCoversEveryChunkOnce) {
  // LLaMA-3-8B decode on 132 SMs: 392 cached positions (7 chunks of 64).
  EXPECT_EQ(attention_split(1, 8, 392, 132).splits, 7);   // 56 CTAs: one chunk each
  EXPECT_EQ(attention_split(1, 8, 392, 132).chunks_per_split, 1);
  EXPECT_EQ(attention_split(16, 8, 392, 132).chunks_per_split, 2);  // 128 pairs x 4 splits = 512 CTAs
  EXPECT_EQ(attention_split(16, 8, 392, 132).splits, 4);
  EXPECT_EQ(attention_split(1, 8, 8192, 132).chunks_per_split, 2);  // 128 chunks over 64 splits
  EXPECT_EQ(attention_split(1, 1, 1, 132).splits, 1);
  // Waves x chunks per CTA decides: 128 pairs x 4 splits of 8 chunks fill one wave of 528 slots;
  // 5 splits of 7 chunks (640 CTAs) would take two.
  EXPECT_EQ(attention_split(16, 8, 2048, 132).splits, 4);
  EXPECT_EQ(attention_split(16, 8, 2048, 132).chunks_per_split, 8);
  EXPECT_EQ(attention_split(128, 8, 2048, 132).splits, 1);  // 1024 pairs: already two waves
  // With twice the SMs (1056 slots): 8 splits of 4 chunks fill one wave at 16 x 2048.
  EXPECT_EQ(attention_split(16, 8, 2048, 264).chunks_per_split, 4);
  EXPECT_EQ(attention_split(1, 1, 1 << 20, 2000).splits, kAttnMaxSplits);  // capped
  for (int64_t B : {1, 3, 16, 64})
    for (int64_t Hkv : {1, 8})
      for (int64_t S : {1, 63, 64, 65, 392, 1000, 8192, 100000})
        for (int64_t sms : {1, 108, 132, 264}) {
          const AttnSplit sp = attention_split(B, Hkv, S, sms);
          const int64_t chunks = (S + kAttnChunk - 1) / kAttnChunk;
          ASSERT_GE(sp.splits, 1);
          ASSERT_GE(sp.chunks_per_split, 1);
          ASSERT_GE(sp.splits * sp.chunks_per_split, chunks);        // every chunk has a split
          ASSERT_LT((sp.splits - 1) * sp.chunks_per_split, chunks);  // and every split a chunk
          ASSERT_LE(B * Hkv * sp.splits, std::max(B * Hkv, 2 * kAttnCtasPerSm * sms));  // at most two waves
          ASSERT_LE(sp.splits, kAttnMaxSplits);
          ASSERT_LE(size_t(B * Hkv * sp.splits * 8 * (128 + 2) * 4), attention_workspace_bytes(B, Hkv, 8, S, 128, sms));
        }
  // Scratch: every split's G x D partial output and (max, sum) per query head, in fp32.
  EXPECT_EQ(attention_workspace_bytes(16, 8, 4, 392, 128, 132), size_t(16 * 8 * 4 * 4 * (128 + 2) * 4));
  EXPECT_THROW(attention_workspace_bytes(16, 8, 9, 392, 128, 132), Error);  // G > 8
  EXPECT_THROW(attention_workspace_bytes(16, 8, 4, 392, 96, 132), Error);   // D
  EXPECT_THROW(attention_split(0, 8, 392, 132), Error);
  EXPECT_THROW(attention_split(1, 8, 392, 0), Error);
}

TEST(Attention, AutoTakesTheWideKernelWhenItsCtasFillOnePerSm) {
  EXPECT_TRUE(attention_wide(16, 8, 392, 132));    // 8B decode, batch 16: 128 CTAs <= 132 SMs
  EXPECT_TRUE(attention_wide(4, 8, 392, 132));     // 32 CTAs: at least 132 / 8
  EXPECT_TRUE(attention_wide(16, 8, 2048, 132));   // 32 chunks
  EXPECT_FALSE(attention_wide(16, 8, 2049, 132));  // 33 chunks
  EXPECT_FALSE(attention_wide(2, 8, 392, 132));    // 16 CTAs: too few SMs busy
  EXPECT_FALSE(attention_wide(1, 8, 392, 132));    // batch 1: the split kernel spreads over more SMs
  EXPECT_FALSE(attention_wide(17, 8, 392, 132));   // 136 CTAs: more than one per SM
  EXPECT_FALSE(attention_wide(16, 8, 392, 108));   // A100: 108 SMs
  EXPECT_THROW(attention_wide(0, 8, 392, 132), Error);
}

namespace {
struct Host {  // a bf16 problem on host vectors, contiguous [B, Hkv, S, D] caches
  DecodeAttentionProblem p;
  std::vector<uint16_t> q, k, v, out;
  std::vector<uint8_t> mask;
  Host(int64_t B, int64_t Hkv, int64_t G, int64_t S, int64_t D) {
    q.assign(size_t(B * Hkv * G * D), 0);
    k.assign(size_t(B * Hkv * S * D), 0);
    v.assign(size_t(B * Hkv * S * D), 0);
    out.assign(q.size(), 0);
    p.B = B; p.Hkv = Hkv; p.G = G; p.S = S; p.D = D;
    p.k_stride_b = p.v_stride_b = Hkv * S * D;
    p.k_stride_h = p.v_stride_h = S * D;
    p.q = q.data(); p.k = k.data(); p.v = v.data(); p.out = out.data();
    p.scale = 1.f / std::sqrt(float(D));
  }
  float o(int64_t i) const { return bf16_to_float(out[size_t(i)]); }
};
}  // namespace

TEST(Attention, ReferenceClosedForms) {
  // Equal keys: the output is the mean of the attended values. Masking leaves one position: its value.
  Host h(1, 1, 2, 3, 64);
  for (int64_t s = 0; s < 3; ++s)
    for (int64_t d = 0; d < 64; ++d) {
      h.k[size_t(s * 64 + d)] = float_to_bf16(0.5f);
      h.v[size_t(s * 64 + d)] = float_to_bf16(float(s + 1) + d / 64.f);
    }
  for (auto& x : h.q) x = float_to_bf16(0.25f);
  reference_decode_attention(h.p);
  for (int64_t j = 0; j < 2; ++j)
    for (int64_t d = 0; d < 64; ++d) EXPECT_NEAR(h.o(j * 64 + d), 2.f + d / 64.f, 0.02f) << j << " " << d;
  h.mask = {0, 0, 1};
  h.p.mask = h.mask.data();
  reference_decode_attention(h.p);
  EXPECT_NEAR(h.o(5), 3.f + 5 / 64.f, 0.02f);
  // Two positions, scores 0 and log 3 (q . k scaled): weights 1/4 and 3/4.
  Host t(1, 1, 1, 2, 64);
  t.p.scale = 1.f;
  t.q[0] = float_to_bf16(1.f);
  t.k[64] = float_to_bf16(std::log(3.f));
  for (int64_t d = 0; d < 64; ++d) t.v[size_t(64 + d)] = float_to_bf16(4.f);
  reference_decode_attention(t.p);
  EXPECT_NEAR(t.o(0), 3.f, 0.02f);
  // Nothing attends: NaN, as torch's softmax over nothing.
  std::vector<uint8_t> none(2, 0);
  t.p.mask = none.data();
  reference_decode_attention(t.p);
  EXPECT_TRUE(std::isnan(t.o(0)));
}

TEST(Attention, RejectsBadArguments) {
  Host h(1, 2, 4, 16, 128);
  EXPECT_NO_THROW(validate_decode_attention(h.p));
  auto bad = [&](auto change, const char* what) {
    DecodeAttentionProblem p = h.p;
    change(p);
    try {
      validate_decode_attention(p);
      ADD_FAILURE() << "accepted: " << what;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
  };
  bad([](DecodeAttentionProblem& p) { p.dtype = DType::F32; }, "dtype");
  bad([](DecodeAttentionProblem& p) { p.G = 9; }, "G (query heads per KV head)");
  bad([](DecodeAttentionProblem& p) { p.D = 96; }, "head dimension");
  bad([](DecodeAttentionProblem& p) { p.S = 0; }, "must be >= 1");
  bad([](DecodeAttentionProblem& p) { p.k = nullptr; }, "non-null");
  bad([](DecodeAttentionProblem& p) { p.v = static_cast<const char*>(p.v) + 8; }, "16-byte aligned");
  bad([](DecodeAttentionProblem& p) { p.out = static_cast<char*>(p.out) + 4; }, "out must be 8-byte aligned");
  bad([](DecodeAttentionProblem& p) { p.k_stride_h = 12; }, "multiples of 8");
  bad([](DecodeAttentionProblem& p) { p.v_stride_h = 8 * 128; }, "head stride");
  bad([](DecodeAttentionProblem& p) { p.scale = NAN; }, "scale");
  bad([](DecodeAttentionProblem& p) { p.q_stride_b = 4 * 128 + 4; }, "q_stride_b");
  bad([](DecodeAttentionProblem& p) { p.q_stride_b = 128; }, "q_stride_b");  // shorter than Hkv x G x D
  // The fused step: all five of k_new, v_new, cos, sin, write_pos, aligned, or none.
  static const int64_t pos = 3;
  auto fused = [&](DecodeAttentionProblem& p) {
    p.k_new = p.k; p.v_new = p.v; p.cos = p.k; p.sin = p.v; p.write_pos = &pos;
  };
  DecodeAttentionProblem ok = h.p;
  fused(ok);
  EXPECT_NO_THROW(validate_decode_attention(ok));
  bad([&](DecodeAttentionProblem& p) { fused(p); p.sin = nullptr; }, "all together");
  bad([&](DecodeAttentionProblem& p) { p.write_pos = &pos; }, "all together");
  bad([&](DecodeAttentionProblem& p) { fused(p); p.cos = static_cast<const char*>(p.k) + 8; }, "16-byte aligned");
  bad([&](DecodeAttentionProblem& p) { fused(p); p.cs_stride_b = 4; }, "multiples of 8");
}
