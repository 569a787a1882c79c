// GPU API for builds without nvcc: every entry point reports that the kernels are absent.
#include "lutmm/attention.h"
#include "lutmm/cuda.h"

namespace lutmm {
namespace gpu {
namespace {
[[noreturn]] void no_cuda() { throw Error("lutmm was built without CUDA kernels (nvcc not found at build time)"); }
}  // namespace
bool available() { return false; }
const char* build_info() { return "built without CUDA kernels"; }
Path choose_path(int64_t, const Shape&, DType, int) { no_cuda(); }
size_t workspace_bytes(int64_t, const Shape&, int) { no_cuda(); }
size_t dequant_scratch_bytes(const Shape&) { no_cuda(); }
void lut_gemm(const GemmProblem&, void*, size_t, void*, LutKernel, DecodeSplit) { no_cuda(); }
DecodePlan decode_plan(int64_t, const Shape&, DType, int, LutKernel, DecodeSplit) { no_cuda(); }
int tma_decode_max_m(int) { return 0; }
double peak_dram_bytes_per_s(int) { return 0.0; }
bool wgmma_supported(int) { return false; }
size_t wgmma_workspace_bytes(int64_t, const Shape&, int) { no_cuda(); }
int wgmma_cluster_size(int64_t, const Shape&, int) { no_cuda(); }
void wgmma_gemm(const GemmProblem&, void*, size_t, void*, WgSplit) { no_cuda(); }
void dequantize(const void*, const uint16_t*, const float*, const Shape&, DType, void*, void*) { no_cuda(); }
size_t decode_attention_workspace_bytes(int64_t, int64_t, int64_t, int64_t, int64_t, int) { no_cuda(); }
void decode_attention(const DecodeAttentionProblem&, void*, size_t, void*, AttnKernel) { no_cuda(); }
}  // namespace gpu
}  // namespace lutmm
