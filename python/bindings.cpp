// nanobind bindings of the lutmm C++ core. Arrays cross as raw addresses (tensor.data_ptr()) plus
// explicit shapes; the Python layer (lutmm/_api.py) checks dtype, device, contiguity and size before
// calling. (DLPack ndarray arguments crashed on the H100 machine's Python 3.12, 2026-11-25.)
// No torch header is used. lutmm::Error (std::invalid_argument) becomes ValueError.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <iterator>
#include <type_traits>

#include "lutmm/attention.h"
#include "lutmm/cuda.h"
#include "lutmm/format.h"
#include "lutmm/pack.h"
#include "lutmm/quantize.h"
#include "lutmm/reference.h"
#include "lutmm/tables.h"

namespace nb = nanobind;
using namespace lutmm;

namespace {

template <typename T> T* P(uintptr_t a) { return reinterpret_cast<T*>(a); }

Shape shape_of(int64_t N, int64_t K, int bits, int64_t g) {
  Shape s{N, K, bits, g};
  validate_shape(s);
  return s;
}
DType dtype_of(int code) {
  if (code < 0 || code > 2) throw Error("dtype code: expected 0 (float32), 1 (float16) or 2 (bfloat16)");
  return DType(code);
}
const float* table_of(const std::vector<float>& t, int bits) {
  validate_table(t.data(), int64_t(t.size()), bits);
  return t.data();
}

// Runs f and returns ("", result) or (error message, None). No C++ exception leaves this module:
// on the H100 machine's Python 3.12 an exception crossing nanobind crashed the process (2026-11-25);
// lutmm/_core.py turns the message into ValueError.
template <typename F>
nb::tuple guarded(F&& f) {
  try {
    if constexpr (std::is_void_v<decltype(f())>) {
      f();
      return nb::make_tuple(std::string(), nb::none());
    } else {
      return nb::make_tuple(std::string(), f());
    }
  } catch (const std::exception& e) {
    return nb::make_tuple(std::string(e.what()), nb::none());
  } catch (...) {
    return nb::make_tuple(std::string("lutmm: unknown C++ error"), nb::none());
  }
}

// A decode-attention problem: dims = {B, Hkv, G, S, D}, strides = {k_b, k_h, v_b, v_h, mask_b} (elements),
// ptrs = {q, k, v, mask (0: none), out}.
DecodeAttentionProblem attention_of(int dtype, const std::vector<int64_t>& dims, const std::vector<int64_t>& strides,
                                    const std::vector<uintptr_t>& ptrs, float scale) {
  if (dims.size() != 5 || strides.size() != 5 || ptrs.size() != 5)
    throw Error("decode_attention: expected 5 dims, 5 strides and 5 pointers");
  DecodeAttentionProblem p;
  p.dtype = dtype_of(dtype);
  p.B = dims[0]; p.Hkv = dims[1]; p.G = dims[2]; p.S = dims[3]; p.D = dims[4];
  p.k_stride_b = strides[0]; p.k_stride_h = strides[1]; p.v_stride_b = strides[2]; p.v_stride_h = strides[3];
  p.mask_stride_b = strides[4];
  p.q = P<const void>(ptrs[0]); p.k = P<const void>(ptrs[1]); p.v = P<const void>(ptrs[2]);
  p.mask = P<const uint8_t>(ptrs[3]); p.out = P<void>(ptrs[4]);
  p.scale = scale;
  return p;
}

}  // namespace

NB_MODULE(_ext, m) {
  m.doc() = "lutmm C++ core: LUT-quantized weights, packing, CPU reference and CUDA kernels";

  m.def("group_sizes", [] {  // the format's group sizes besides K (lutmm::kGroupSizes)
    return guarded([] { return std::vector<int64_t>(std::begin(kGroupSizes), std::end(kGroupSizes)); });
  });
  m.def("int_table", [](int bits) { return guarded([&] { return int_table(bits); }); });
  m.def("nf_table", [](int bits) { return guarded([&] { return nf_table(bits); }); });
  m.def("packed_bytes", [](int64_t N, int64_t K, int bits, int64_t g) { return guarded([&] { return shape_of(N, K, bits, g).packed_bytes(); }); });
  m.def("packed_scale_count",
        [](int64_t N, int64_t K, int bits, int64_t g) { return guarded([&] { return shape_of(N, K, bits, g).packed_scale_count(); }); });
  m.def("validate_shape", [](int64_t N, int64_t K, int bits, int64_t g) { return guarded([&] { shape_of(N, K, bits, g); }); });

  m.def("quantize", [](uintptr_t w, int dtype, int64_t N, int64_t K, int bits, int64_t g, std::vector<float> table,
                       uintptr_t codes, uintptr_t scales, bool search_scale, int grid_points, float min_shrink,
                       uintptr_t importance) { return guarded([&] {
    const Shape s = shape_of(N, K, bits, g);
    const float* t = table_of(table, bits);
    QuantizeOptions opt;
    opt.search_scale = search_scale; opt.grid_points = grid_points; opt.min_shrink = min_shrink;
    opt.importance = P<const float>(importance);
    nb::gil_scoped_release nogil;
    quantize(P<const void>(w), dtype_of(dtype), s, t, opt, P<uint8_t>(codes), P<uint16_t>(scales));
  }); });

  m.def("kmeans_table", [](uintptr_t w, int dtype, int64_t N, int64_t K, int bits, int64_t g, std::vector<float> init,
                           int iterations, uintptr_t importance) { return guarded([&] {
    const Shape s = shape_of(N, K, bits, g);
    const float* t = table_of(init, bits);
    QuantizeOptions opt;
    opt.importance = P<const float>(importance);
    nb::gil_scoped_release nogil;
    return kmeans_table(P<const void>(w), dtype_of(dtype), s, t, opt, iterations);
  }); });

  m.def("quantization_error", [](uintptr_t w, int dtype, int64_t N, int64_t K, int bits, int64_t g,
                                 std::vector<float> table, uintptr_t codes, uintptr_t scales, uintptr_t importance) { return guarded([&] {
    const Shape s = shape_of(N, K, bits, g);
    const float* t = table_of(table, bits);
    nb::gil_scoped_release nogil;
    return quantization_error(P<const void>(w), dtype_of(dtype), s, t, P<const uint8_t>(codes),
                              P<const uint16_t>(scales), P<const float>(importance));
  }); });

  m.def("pack", [](uintptr_t codes, uintptr_t scales, int64_t N, int64_t K, int bits, int64_t g, uintptr_t packed,
                   uintptr_t packed_scales) { return guarded([&] {
    const Shape s = shape_of(N, K, bits, g);
    nb::gil_scoped_release nogil;
    pack_codes(P<const uint8_t>(codes), s, P<uint8_t>(packed));
    pack_scales(P<const uint16_t>(scales), s, P<uint16_t>(packed_scales));
  }); });

  m.def("unpack", [](uintptr_t packed, uintptr_t packed_scales, int64_t N, int64_t K, int bits, int64_t g,
                     uintptr_t codes, uintptr_t scales) { return guarded([&] {
    const Shape s = shape_of(N, K, bits, g);
    nb::gil_scoped_release nogil;
    unpack_codes(P<const uint8_t>(packed), s, P<uint8_t>(codes));
    unpack_scales(P<const uint16_t>(packed_scales), s, P<uint16_t>(scales));
  }); });

  m.def("repack_v1", [](uintptr_t v1, int64_t N, int64_t K, int bits, int64_t g, uintptr_t packed) {
    return guarded([&] {
      const Shape s = shape_of(N, K, bits, g);
      nb::gil_scoped_release nogil;
      repack_v1_codes(P<const uint8_t>(v1), s, P<uint8_t>(packed));
    });
  });

  m.def("slice_packed", [](uintptr_t packed, uintptr_t packed_scales, int64_t N, int64_t K, int bits, int64_t g,
                           int64_t n0, int64_t n_len, int64_t k0, int64_t k_len) { return guarded([&] {
    const Shape s = shape_of(N, K, bits, g);
    std::vector<uint8_t> op;
    std::vector<uint16_t> os;
    Shape sub = slice_packed(s, P<const uint8_t>(packed), P<const uint16_t>(packed_scales), n0, n_len, k0, k_len, &op, &os);
    return nb::make_tuple(nb::bytes(reinterpret_cast<const char*>(op.data()), op.size()),
                          nb::bytes(reinterpret_cast<const char*>(os.data()), os.size() * 2), sub.group_size);
  }); });

  m.def("dequantize", [](uintptr_t codes, uintptr_t scales, std::vector<float> table, int64_t N, int64_t K, int bits,
                         int64_t g, uintptr_t out) { return guarded([&] {
    const Shape s = shape_of(N, K, bits, g);
    const float* t = table_of(table, bits);
    nb::gil_scoped_release nogil;
    dequantize(P<const uint8_t>(codes), P<const uint16_t>(scales), t, s, P<float>(out));
  }); });

  m.def("dequantize_packed", [](uintptr_t packed, uintptr_t packed_scales, std::vector<float> table, int64_t N,
                                int64_t K, int bits, int64_t g, uintptr_t out) { return guarded([&] {
    const Shape s = shape_of(N, K, bits, g);
    const float* t = table_of(table, bits);
    nb::gil_scoped_release nogil;
    dequantize_packed(P<const uint8_t>(packed), P<const uint16_t>(packed_scales), t, s, P<float>(out));
  }); });

  m.def("reference_matmul", [](uintptr_t x, int x_dtype, int64_t M, uintptr_t codes, uintptr_t scales,
                               std::vector<float> table, int64_t N, int64_t K, int bits, int64_t g, uintptr_t bias,
                               uintptr_t out) { return guarded([&] {
    const Shape s = shape_of(N, K, bits, g);
    const float* t = table_of(table, bits);
    nb::gil_scoped_release nogil;
    reference_matmul(P<const void>(x), dtype_of(x_dtype), M, P<const uint8_t>(codes), P<const uint16_t>(scales), t, s,
                     P<const float>(bias), P<float>(out));
  }); });

  m.def("reference_decode_attention", [](int dtype, std::vector<int64_t> dims, std::vector<int64_t> strides,
                                         std::vector<uintptr_t> ptrs, float scale) { return guarded([&] {
    const DecodeAttentionProblem p = attention_of(dtype, dims, strides, ptrs, scale);
    nb::gil_scoped_release nogil;
    reference_decode_attention(p);
  }); });

  // ---- GPU ----
  m.def("gpu_decode_attention_workspace_bytes", [](int64_t B, int64_t Hkv, int64_t G, int64_t S, int64_t D,
                                                   int device) { return guarded([&] {
    return gpu::decode_attention_workspace_bytes(B, Hkv, G, S, D, device);
  }); });
  m.def("gpu_decode_attention", [](int dtype, std::vector<int64_t> dims, std::vector<int64_t> strides,
                                   std::vector<uintptr_t> ptrs, float scale, uintptr_t workspace, size_t workspace_bytes,
                                   uintptr_t stream, int kernel, std::vector<uintptr_t> fused,
                                   std::vector<int64_t> fused_strides) { return guarded([&] {
    DecodeAttentionProblem p = attention_of(dtype, dims, strides, ptrs, scale);
    // The fused step: fused = {k_new, v_new, cos, sin, write_pos}, fused_strides = {q_b, new_b, cos/sin_b}.
    if (!fused.empty() || !fused_strides.empty()) {
      if (fused.size() != 5 || fused_strides.size() != 3)
        throw Error("decode_attention: the fused step takes 5 pointers and 3 strides");
      p.k_new = P<const void>(fused[0]); p.v_new = P<const void>(fused[1]);
      p.cos = P<const void>(fused[2]); p.sin = P<const void>(fused[3]);
      p.write_pos = P<const int64_t>(fused[4]);
      p.q_stride_b = fused_strides[0]; p.new_stride_b = fused_strides[1]; p.cs_stride_b = fused_strides[2];
    }
    gpu::decode_attention(p, P<void>(workspace), workspace_bytes, P<void>(stream), gpu::AttnKernel(kernel));
  }); });
  m.def("gpu_available", [] { return guarded([] { return gpu::available(); }); });
  m.def("build_info", [] { return guarded([] { return std::string(gpu::build_info()); }); });
  // path: 1 = the LUT (decode) kernel, 3 = the wgmma (prefill) kernel; see gpu::Path.
  m.def("gpu_workspace_bytes", [](int64_t M, int64_t N, int64_t K, int bits, int64_t g, int device, int path) { return guarded([&] {
    const Shape s = shape_of(N, K, bits, g);
    if (path == int(gpu::Path::kWgmma)) return gpu::wgmma_workspace_bytes(M, s, device);
    return gpu::workspace_bytes(M, s, device);
  }); });
  m.def("gpu_wgmma_supported", [](int device) { return guarded([&] { return gpu::wgmma_supported(device); }); });
  m.def("gpu_choose_path", [](int64_t M, int64_t N, int64_t K, int bits, int64_t g, int device) { return guarded([&] {
    return int(gpu::choose_path(M, shape_of(N, K, bits, g), DType::BF16, device));
  }); });

  m.def("gpu_lut_gemm", [](uintptr_t x, int dtype, int64_t M, uintptr_t packed, uintptr_t packed_scales,
                           std::vector<float> table, int64_t N, int64_t K, int bits, int64_t g, uintptr_t bias,
                           uintptr_t y, uintptr_t workspace, size_t workspace_bytes, uintptr_t stream, int path,
                           int epilogue, uintptr_t residual, bool rms_norm, float rms_eps) { return guarded([&] {
    gpu::GemmProblem p;
    p.shape = shape_of(N, K, bits, g);
    const float* t = table_of(table, bits);
    p.x = P<const void>(x); p.dtype = dtype_of(dtype); p.M = M;
    p.packed = P<const void>(packed); p.packed_scales = P<const uint16_t>(packed_scales);
    for (size_t i = 0; i < table.size(); ++i) p.table[i] = t[i];
    p.bias = P<const void>(bias); p.y = P<void>(y);
    p.epilogue = gpu::Epilogue(epilogue);  // 0: Y = X W^T (+ bias); 1: silu(gate) * up (see gpu::Epilogue)
    p.residual = P<const void>(residual); p.rms_norm = rms_norm; p.rms_eps = rms_eps;  // a folded layer
    if (path == int(gpu::Path::kWgmma)) gpu::wgmma_gemm(p, P<void>(workspace), workspace_bytes, P<void>(stream));
    else gpu::lut_gemm(p, P<void>(workspace), workspace_bytes, P<void>(stream));
  }); });

  m.def("gpu_dequantize", [](uintptr_t packed, uintptr_t packed_scales, std::vector<float> table, int64_t N, int64_t K,
                             int bits, int64_t g, int dtype, uintptr_t out, uintptr_t stream) { return guarded([&] {
    const Shape s = shape_of(N, K, bits, g);
    const float* t = table_of(table, bits);
    gpu::dequantize(P<const void>(packed), P<const uint16_t>(packed_scales), t, s, dtype_of(dtype), P<void>(out),
                    P<void>(stream));
  }); });
}
