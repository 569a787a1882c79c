// Decode attention for grouped-query heads: one query token per sequence, and the G query heads that
// share a KV head read its keys and values once (flash-decoding: the key positions are split over
// CTAs, each keeps a running softmax, a second kernel combines the splits in a fixed order).
//
//   out[b, h, j, :] = sum_s softmax_s(scale * q[b, h, j, :] . k[b, h, s, :] | mask[b, s]) v[b, h, s, :]
//
// for sequence b < B, KV head h < Hkv, query head j < G of that KV head (query head h * G + j in a
// model's numbering), key position s < S where mask[b, s] is nonzero. A row whose positions are all
// masked gives NaN (as a softmax over nothing does in torch). Host code (validation, the split, the
// CPU reference) builds everywhere; the GPU entry points throw in a build without CUDA.
#pragma once
#include <cstddef>
#include <cstdint>

#include "lutmm/format.h"

namespace lutmm {

struct DecodeAttentionProblem {
  DType dtype = DType::BF16;  // of q, k, v and out (fp16 or bf16)
  int64_t B = 0;              // sequences
  int64_t Hkv = 0;            // KV heads
  int64_t G = 0;              // query heads per KV head, 1..8
  int64_t S = 0;              // key positions (>= 1)
  int64_t D = 0;              // head dimension: 64 or 128
  const void* q = nullptr;    // [B, Hkv, G, D]: rows contiguous, sequence b at q + b * q_stride_b; 16-byte aligned
  int64_t q_stride_b = 0;     // elements; 0: Hkv * G * D (q contiguous)
  // k[b, h, s, d] at k + b * k_stride_b + h * k_stride_h + s * D + d (elements): each position's D
  // values contiguous, positions D apart (a KV cache [B, Hkv, S_max, D] with S <= S_max); 16-byte
  // aligned, strides multiples of 8 elements (every row 16-byte aligned). Same for v.
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t k_stride_b = 0, k_stride_h = 0, v_stride_b = 0, v_stride_h = 0;
  // mask[b, s] at mask + b * mask_stride_b + s: nonzero attends. nullptr: every position attends.
  const uint8_t* mask = nullptr;
  int64_t mask_stride_b = 0;  // 0: one row for every sequence
  float scale = 0.f;          // scores are scale * (q . k)
  void* out = nullptr;        // [B, Hkv, G, D], contiguous

  // Optional, the decode step's own token folded in (lutmm.attention's fused path; all set or none):
  // the rotary embedding (transformers' rotate_half convention: dim d pairs with d + D/2) is applied to
  // q and to the new key k_new in fp32 with one rounding, and the rotated k_new and v_new are written
  // into k / v (the KV cache, written through these pointers) at position *write_pos before any
  // position is read; outside [0, S) nothing is written. cos / sin: [B or 1, D] of dtype.
  const void* k_new = nullptr;   // [B, Hkv, D]: sequence b, head h at k_new + b * new_stride_b + h * D
  const void* v_new = nullptr;   // the same layout
  int64_t new_stride_b = 0;      // elements, a multiple of 8
  const void* cos = nullptr;
  const void* sin = nullptr;
  int64_t cs_stride_b = 0;       // elements, a multiple of 8; 0: one row for every sequence
  const int64_t* write_pos = nullptr;  // device memory, read by the kernel
};

// Throws lutmm::Error naming the problem (sizes, dtype, pointers, strides, alignment: q, k, v and
// 16-byte aligned with strides that keep every row so, out 8-byte aligned) unless `p` can run.
void validate_decode_attention(const DecodeAttentionProblem& p);

// How the GPU kernel splits the key positions: chunks of kAttnChunk positions, `chunks_per_split`
// consecutive chunks per CTA, `splits` CTAs per (sequence, KV head). With kAttnCtasPerSm CTAs resident
// per SM, the split minimizes waves x chunks per CTA (the fewest splits on a tie, at most two waves),
// never giving a CTA fewer than one chunk; it depends on the SM count, so results are bitwise
// reproducible on one GPU model, not across models. (The first split aimed at kAttnCtasPerSm x SMs CTAs
// and took two waves at batch 16 x 2048 positions: 640 CTAs for 528 slots, 71.3 us against this
// split's predicted ~60; H100, 2026-11-27.)
constexpr int64_t kAttnChunk = 64;
constexpr int64_t kAttnCtasPerSm = 4;     // kMma's residency (4 warps x 128 registers per thread)
constexpr int64_t kAttnMaxSplits = 1024;  // per (sequence, KV head): bounds the combine's shared memory
constexpr int64_t kAttnWideWarps = 16;    // kWide: warps per CTA (16 x 32 x 128 registers: one CTA per SM)
constexpr int64_t kAttnWideMaxChunks = 32;  // kAuto takes kWide up to 32 chunks (2048 positions; attention_wide)
struct AttnSplit {
  int64_t splits;
  int64_t chunks_per_split;
};
AttnSplit attention_split(int64_t B, int64_t Hkv, int64_t S, int64_t sms);
// Whether AttnKernel::kAuto runs kWide (one CTA per (sequence, KV head), no combine): when those CTAs
// fill from 1/8 of the SMs to all of them, one per SM, and the positions take at most
// kAttnWideMaxChunks chunks. H100, 2026-11-27, 8B heads, us kMma -> kWide at batch x positions in use:
// 4 x 256 7.7 -> 7.2, 16 x 256 12.8 -> 11.2, 16 x 768 27.2 -> 24.4, 16 x 2048 55.6 -> 54.7; batch 1
// (8 CTAs) loses: 1 x 256 6.1 -> 6.3, 1 x 768 8.0 -> 12.0.
bool attention_wide(int64_t B, int64_t Hkv, int64_t S, int64_t sms);
// Bytes of the GPU kernel's scratch on `sms` SMs, for every variant (kMma's split; kWide needs none):
// every split's partial output (G x D fp32) and (max, sum) per query head. Throws lutmm::Error for
// sizes decode_attention rejects.
size_t attention_workspace_bytes(int64_t B, int64_t Hkv, int64_t G, int64_t S, int64_t D, int64_t sms);

// CPU reference on host pointers (fp64 sums, one rounding to the dtype at the end).
void reference_decode_attention(const DecodeAttentionProblem& p);

namespace gpu {
// Bytes of scratch decode_attention needs on `device` (attention_workspace_bytes with its SM count);
// contents need no initialization.
size_t decode_attention_workspace_bytes(int64_t B, int64_t Hkv, int64_t G, int64_t S, int64_t D, int device);
// The kernel (src/cuda/decode_attention.cu), tensor cores (mma.m16n8k16) for both products with K and
// V loaded straight into fragments. kMma: CTAs of 4 warps on attention_split's split, then a combine
// kernel (none when there is one split). kWide: one CTA of kAttnWideWarps warps per (sequence, KV
// head) over all positions, writing the output itself. kAuto: kWide where attention_wide says so, else
// kMma. (CUDA-core variants were measured 2.7-3.4x slower on the H100 and removed; kMmaFine, kMma on a
// split for 8 CTAs per SM, lost to the wave-aware split everywhere: H100, 2026-11-27.)
enum class AttnKernel : int { kAuto = 0, kMma = 1, kWide = 2 };
// Runs the problem on the current device and the caller's stream (one or two kernels, programmatic
// dependent launch where supported); never synchronizes, allocates nothing: safe in CUDA graph capture.
void decode_attention(const DecodeAttentionProblem& p, void* workspace, size_t workspace_bytes, void* stream,
                      AttnKernel kernel = AttnKernel::kAuto);
}  // namespace gpu

}  // namespace lutmm
