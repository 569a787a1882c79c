// Decode attention for grouped-query heads (include/lutmm/attention.h): flash-decoding in two kernels.
//
// attn_split_kernel (variant 1, AttnKernel::kChunked): one CTA per (split, KV head, sequence). Its 4 warps walk the split's chunks of
//   64 key positions. Per chunk: (1) scores: warp w takes positions w, w + 4, ...; each lane holds
//   D / 32 dimensions of the G queries (pre-multiplied by the scale) and of the key row, and a warp
//   all-reduce (5 shuffles per query) sums the G dot products; masked positions load nothing. (2) The
//   running softmax: warp w updates query heads w and w + 4 (max, rescale, exp, sum over the chunk).
//   (3) P V: thread t takes the value columns 2c, 2c + 1 (c = t % (D / 2)) of every (128 / (D / 2))-th
//   position, G running sums each, rescaled with the running max. At the end the slices meet in
//   shared memory and the CTA writes its partial output (fp32, not normalized) and (max, sum) per
//   query head to the workspace.
// attn_warps_kernel (variant 2, AttnKernel::kWarps): the same split, but each warp walks its own
//   positions (4 consecutive ones per step, K and V rows loaded together, 8 bytes per lane) with its
//   own running softmax in registers (every lane holds the G maxima, sums and its D / 32 columns of
//   the G outputs): no barrier per chunk, twice the loads in flight. The 4 warps' states meet in
//   shared memory once, at the end.
// attn_combine_kernel: one CTA per (KV head, sequence), thread d: out = sum_i o_i e^(m_i - M) /
//   sum_i l_i e^(m_i - M) over the splits i in order (deterministic), M = max_i m_i.
// Both launch with programmatic dependent launch: the split kernel waits for the previous kernel
// before its first load (it has nothing to prefetch: q, k, v and the mask are all fresh).
#include <cmath>

#include "common.cuh"
#include "lutmm/attention.h"

namespace lutmm {
namespace gpu {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kChunk = int(kAttnChunk);  // key positions per chunk
constexpr int kMaxG = 8;

struct AttnParams {
  const void* q;
  const void* k;
  const void* v;
  const uint8_t* mask;
  void* out;
  float* part_o;   // [B, Hkv, splits, G, D]
  float* part_ml;  // [B, Hkv, splits, G, 2]: running max (scaled scores), sum of exponentials
  int64_t k_sb, k_sh, v_sb, v_sh, mask_sb;
  int S, G, Hkv, splits, chunks_per_split;
  float scale;
};

// D / 32 consecutive elements of a row, loaded at once (8 bytes for D = 128, 4 for D = 64).
template <typename T, int N>
__device__ __forceinline__ void load_row(const T* p, float (&f)[N]) {
  static_assert(N == 2 || N == 4, "2 or 4 elements per lane");
  if constexpr (N == 4) {
    const uint2 raw = *reinterpret_cast<const uint2*>(p);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) f[i] = Elem<T>::to_float(e[i]);
  } else {
    const uint32_t raw = *reinterpret_cast<const uint32_t*>(p);
    const T* e = reinterpret_cast<const T*>(&raw);
    f[0] = Elem<T>::to_float(e[0]);
    f[1] = Elem<T>::to_float(e[1]);
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) attn_split_kernel(AttnParams p) {
  constexpr int kLane = D / 32;            // dimensions per lane in the score loop
  constexpr int kPairs = D / 2;            // value column pairs in the P V loop
  constexpr int kSlices = kThreads / kPairs;  // positions interleaved over this many thread slices
  __shared__ float s_p[kMaxG][kChunk];     // scores, then probabilities of the chunk
  __shared__ uint8_t s_on[kChunk];         // position attends
  __shared__ float s_m[kMaxG], s_l[kMaxG], s_alpha[kMaxG];  // running max / sum, this chunk's rescale
  __shared__ float s_acc[kSlices][kMaxG][D];  // the slices' P V sums, for the final reduction

  const int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int G = p.G;
  const T* k_bh = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh;
  const T* v_bh = static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh;
  const uint8_t* mask_b = p.mask ? p.mask + b * p.mask_sb : nullptr;

  grid_dependency_wait();
  grid_dependents_launch();  // the combine kernel may launch; it waits for this grid to finish

  float qr[kMaxG][kLane];  // this lane's dimensions of the G scaled queries
  {
    const T* q_bh = static_cast<const T*>(p.q) + (int64_t(b) * p.Hkv + h) * G * D;
#pragma unroll
    for (int j = 0; j < kMaxG; ++j) {
      if (j < G) load_row<T, kLane>(q_bh + j * D + lane * kLane, qr[j]);
#pragma unroll
      for (int i = 0; i < kLane; ++i) qr[j][i] = j < G ? qr[j][i] * p.scale : 0.f;
    }
  }
  if (tid < kMaxG) {
    s_m[tid] = -INFINITY;
    s_l[tid] = 0.f;
  }
  const int c_pair = tid % kPairs, slice = tid / kPairs;
  float acc[kMaxG][2] = {};

  const int first = split * p.chunks_per_split * kChunk;
  const int last = min(p.S, first + p.chunks_per_split * kChunk);
  for (int s0 = first; s0 < last; s0 += kChunk) {
    const int n = min(kChunk, last - s0);
    bool on = false;
    if (tid < kChunk) {
      on = tid < n && (!mask_b || mask_b[s0 + tid] != 0);
      s_on[tid] = on;
    }
    if (!__syncthreads_or(on)) continue;  // nothing attends in this chunk: no loads

    // (1) Scores, four positions per warp in flight.
    for (int i0 = warp; i0 < kChunk; i0 += 4 * kWarps) {
      float kr[4][kLane] = {};
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int i = i0 + u * kWarps;
        if (i < kChunk && s_on[i]) load_row<T, kLane>(k_bh + int64_t(s0 + i) * D + lane * kLane, kr[u]);
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int i = i0 + u * kWarps;
        if (i >= kChunk) continue;
        const bool att = s_on[i];
#pragma unroll
        for (int j = 0; j < kMaxG; ++j) {
          if (j >= G) continue;
          float dot = 0.f;
#pragma unroll
          for (int e = 0; e < kLane; ++e) dot += att ? qr[j][e] * kr[u][e] : 0.f;
#pragma unroll
          for (int off = 16; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
          if (lane == j) s_p[j][i] = att ? dot : -INFINITY;
        }
      }
    }
    __syncthreads();

    // (2) Running softmax: warp w updates query heads w, w + 4.
    for (int j = warp; j < G; j += kWarps) {
      float a = s_p[j][lane], c = s_p[j][lane + 32];
      float mx = fmaxf(a, c);
#pragma unroll
      for (int off = 16; off > 0; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      const float m_old = s_m[j];
      const float m_new = fmaxf(m_old, mx);  // finite: some position of the chunk attends
      a = __expf(a - m_new);                  // masked: exp(-inf) = 0
      c = __expf(c - m_new);
      s_p[j][lane] = a;
      s_p[j][lane + 32] = c;
      float sum = a + c;
#pragma unroll
      for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
      __syncwarp();
      if (lane == 0) {
        const float alpha = m_old == -INFINITY ? 0.f : __expf(m_old - m_new);
        s_alpha[j] = alpha;
        s_l[j] = s_l[j] * alpha + sum;
        s_m[j] = m_new;
      }
    }
    __syncthreads();

    // (3) P V over this thread's slice of positions and its two value columns.
#pragma unroll
    for (int j = 0; j < kMaxG; ++j) {
      const float alpha = j < G ? s_alpha[j] : 0.f;
      acc[j][0] *= alpha;
      acc[j][1] *= alpha;
    }
#pragma unroll 4
    for (int i = slice; i < n; i += kSlices) {
      if (!s_on[i]) continue;
      float vv[2];
      load_row<T, 2>(v_bh + int64_t(s0 + i) * D + 2 * c_pair, vv);
#pragma unroll
      for (int j = 0; j < kMaxG; ++j) {
        if (j >= G) continue;
        const float pj = s_p[j][i];
        acc[j][0] += pj * vv[0];
        acc[j][1] += pj * vv[1];
      }
    }
    __syncthreads();  // s_p, s_on and s_alpha are rewritten by the next chunk
  }

  // The slices' sums meet in shared memory; the CTA writes its partial output and statistics.
#pragma unroll
  for (int j = 0; j < kMaxG; ++j) {
    if (j >= G) continue;
    s_acc[slice][j][2 * c_pair] = acc[j][0];
    s_acc[slice][j][2 * c_pair + 1] = acc[j][1];
  }
  __syncthreads();
  const int64_t part = (int64_t(b) * p.Hkv + h) * p.splits + split;
  float* o = p.part_o + part * G * D;
  for (int idx = tid; idx < G * D; idx += kThreads) {
    float sum = 0.f;
#pragma unroll
    for (int sl = 0; sl < kSlices; ++sl) sum += s_acc[sl][idx / D][idx % D];
    o[idx] = sum;
  }
  if (tid < G) {
    p.part_ml[part * G * 2 + 2 * tid] = s_m[tid];
    p.part_ml[part * G * 2 + 2 * tid + 1] = s_l[tid];
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) attn_warps_kernel(AttnParams p) {
  constexpr int kLane = D / 32;  // columns per lane (of q, the key rows, the value rows and the output)
  constexpr int kStep = 4;       // consecutive positions a warp loads at once
  __shared__ float s_o[kWarps][kMaxG][D];  // the warps' outputs (relative to their own maxima)
  __shared__ float s_m[kWarps][kMaxG], s_l[kWarps][kMaxG], s_M[kMaxG], s_L[kMaxG];

  const int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int G = p.G;
  const T* k_bh = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh + lane * kLane;
  const T* v_bh = static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh + lane * kLane;
  const uint8_t* mask_b = p.mask ? p.mask + b * p.mask_sb : nullptr;

  grid_dependency_wait();
  grid_dependents_launch();

  float qr[kMaxG][kLane];
  {
    const T* q_bh = static_cast<const T*>(p.q) + (int64_t(b) * p.Hkv + h) * G * D + lane * kLane;
#pragma unroll
    for (int j = 0; j < kMaxG; ++j) {
      if (j < G) load_row<T, kLane>(q_bh + j * D, qr[j]);
#pragma unroll
      for (int i = 0; i < kLane; ++i) qr[j][i] = j < G ? qr[j][i] * p.scale : 0.f;
    }
  }
  float m[kMaxG], l[kMaxG], acc[kMaxG][kLane];
#pragma unroll
  for (int j = 0; j < kMaxG; ++j) {
    m[j] = -INFINITY;
    l[j] = 0.f;
#pragma unroll
    for (int i = 0; i < kLane; ++i) acc[j][i] = 0.f;
  }

  const int first = split * p.chunks_per_split * kChunk;
  const int last = min(p.S, first + p.chunks_per_split * kChunk);
  for (int s0 = first + warp * kStep; s0 < last; s0 += kWarps * kStep) {
    float kr[kStep][kLane] = {}, vr[kStep][kLane] = {};
    bool on[kStep];
#pragma unroll
    for (int u = 0; u < kStep; ++u) {  // every lane reads the same mask byte: warp-uniform branches
      const int s = s0 + u;
      on[u] = s < last && (!mask_b || mask_b[s] != 0);
      if (on[u]) {
        load_row<T, kLane>(k_bh + int64_t(s) * D, kr[u]);
        load_row<T, kLane>(v_bh + int64_t(s) * D, vr[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < kStep; ++u) {
      if (!on[u]) continue;
#pragma unroll
      for (int j = 0; j < kMaxG; ++j) {
        if (j >= G) continue;
        float dot = 0.f;
#pragma unroll
        for (int e = 0; e < kLane; ++e) dot += qr[j][e] * kr[u][e];
#pragma unroll
        for (int off = 16; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
        const float m_new = fmaxf(m[j], dot);
        const float corr = __expf(m[j] - m_new);  // m[j] = -inf: 0 (m_new is finite)
        const float e_s = __expf(dot - m_new);
        l[j] = l[j] * corr + e_s;
#pragma unroll
        for (int e = 0; e < kLane; ++e) acc[j][e] = acc[j][e] * corr + e_s * vr[u][e];
        m[j] = m_new;
      }
    }
  }

  // The warps' states meet: M = max over warps, L = sum l e^(m - M), O = sum o e^(m - M) (warps that
  // saw nothing, l = 0, are skipped).
#pragma unroll
  for (int j = 0; j < kMaxG; ++j) {
    if (j >= G) continue;
#pragma unroll
    for (int e = 0; e < kLane; ++e) s_o[warp][j][lane * kLane + e] = acc[j][e];
    if (lane == 0) {
      s_m[warp][j] = m[j];
      s_l[warp][j] = l[j];
    }
  }
  __syncthreads();
  if (tid < G) {
    float M = -INFINITY, L = 0.f;
    for (int w = 0; w < kWarps; ++w) M = fmaxf(M, s_m[w][tid]);
    for (int w = 0; w < kWarps; ++w)
      if (s_l[w][tid] > 0.f) L += s_l[w][tid] * __expf(s_m[w][tid] - M);
    s_M[tid] = M;
    s_L[tid] = L;
  }
  __syncthreads();
  const int64_t part = (int64_t(b) * p.Hkv + h) * p.splits + split;
  float* o = p.part_o + part * G * D;
  for (int idx = tid; idx < G * D; idx += kThreads) {
    const int j = idx / D;
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w)
      if (s_l[w][j] > 0.f) sum += s_o[w][j][idx % D] * __expf(s_m[w][j] - s_M[j]);
    o[idx] = sum;
  }
  if (tid < G) {
    p.part_ml[part * G * 2 + 2 * tid] = s_M[tid];
    p.part_ml[part * G * 2 + 2 * tid + 1] = s_L[tid];
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(D) attn_combine_kernel(AttnParams p) {
  const int h = blockIdx.x, b = blockIdx.y, d = threadIdx.x;
  const int G = p.G;
  grid_dependency_wait();
  grid_dependents_launch();
  const int64_t part0 = (int64_t(b) * p.Hkv + h) * p.splits;
  T* out = static_cast<T*>(p.out) + (int64_t(b) * p.Hkv + h) * G * D;
  for (int j = 0; j < G; ++j) {
    float M = -INFINITY;
    for (int i = 0; i < p.splits; ++i) M = fmaxf(M, p.part_ml[(part0 + i) * G * 2 + 2 * j]);
    float L = 0.f, O = 0.f;
    for (int i = 0; i < p.splits; ++i) {
      const float l = p.part_ml[(part0 + i) * G * 2 + 2 * j + 1];
      if (l == 0.f) continue;  // nothing attended in this split (its partial output is zeros, its max -inf)
      const float w = __expf(p.part_ml[(part0 + i) * G * 2 + 2 * j] - M);
      L += l * w;
      O += p.part_o[(part0 + i) * G * D + j * D + d] * w;
    }
    out[j * D + d] = Elem<T>::from_float(L > 0.f ? O / L : NAN);
  }
}

template <typename T, int D>
void launch(const AttnParams& ap, int64_t B, int64_t Hkv, AttnKernel kernel, cudaStream_t stream, int device) {
  const dim3 grid(unsigned(ap.splits), unsigned(Hkv), unsigned(B));
  if (kernel == AttnKernel::kChunked)
    launch_pdl(&attn_split_kernel<T, D>, grid, dim3(kThreads), 0, stream, device, 1, ap);
  else
    launch_pdl(&attn_warps_kernel<T, D>, grid, dim3(kThreads), 0, stream, device, 1, ap);
  launch_pdl(&attn_combine_kernel<T, D>, dim3(unsigned(Hkv), unsigned(B)), dim3(D), 0, stream, device, 1, ap);
}

}  // namespace

size_t decode_attention_workspace_bytes(int64_t B, int64_t Hkv, int64_t G, int64_t S, int64_t D, int device) {
  return attention_workspace_bytes(B, Hkv, G, S, D, sm_count(device));
}

void decode_attention(const DecodeAttentionProblem& p, void* workspace, size_t workspace_bytes, void* stream,
                      AttnKernel kernel) {
  validate_decode_attention(p);
  if (kernel != AttnKernel::kAuto && kernel != AttnKernel::kChunked && kernel != AttnKernel::kWarps)
    throw Error("decode_attention: kernel must be kAuto, kChunked or kWarps");
  if (kernel == AttnKernel::kAuto) kernel = AttnKernel::kWarps;  // unmeasured (2026-11-26): the design with more loads in flight
  if (p.B > 65535 || p.Hkv > 65535) throw Error("decode_attention: B and Hkv must be <= 65535");
  if (p.S > (int64_t(1) << 30)) throw Error("decode_attention: S must be < 2^30");
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  const int sms = sm_count(device);
  const AttnSplit sp = attention_split(p.B, p.Hkv, p.S, sms);
  check_workspace(workspace, workspace_bytes, attention_workspace_bytes(p.B, p.Hkv, p.G, p.S, p.D, sms),
                  "decode_attention_workspace_bytes");
  AttnParams ap;
  ap.q = p.q;
  ap.k = p.k;
  ap.v = p.v;
  ap.mask = p.mask;
  ap.out = p.out;
  ap.part_o = static_cast<float*>(workspace);
  ap.part_ml = ap.part_o + p.B * p.Hkv * sp.splits * p.G * p.D;
  ap.k_sb = p.k_stride_b;
  ap.k_sh = p.k_stride_h;
  ap.v_sb = p.v_stride_b;
  ap.v_sh = p.v_stride_h;
  ap.mask_sb = p.mask_stride_b;
  ap.S = int(p.S);
  ap.G = int(p.G);
  ap.Hkv = int(p.Hkv);
  ap.splits = int(sp.splits);
  ap.chunks_per_split = int(sp.chunks_per_split);
  ap.scale = p.scale;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const bool bf = p.dtype == DType::BF16;
  if (p.D == 128) {
    if (bf) launch<__nv_bfloat16, 128>(ap, p.B, p.Hkv, kernel, st, device);
    else launch<__half, 128>(ap, p.B, p.Hkv, kernel, st, device);
  } else {
    if (bf) launch<__nv_bfloat16, 64>(ap, p.B, p.Hkv, kernel, st, device);
    else launch<__half, 64>(ap, p.B, p.Hkv, kernel, st, device);
  }
}

}  // namespace gpu
}  // namespace lutmm
