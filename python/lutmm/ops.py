"""The torch ops `lutmm::lut_matmul`, `lutmm::lut_matmul_silu_mul` and `lutmm::lut_matmul_layer` (CPU + CUDA +
fake implementations).

Works with torch.compile(fullgraph=True) and CUDA graph capture: the CUDA path allocates only
through torch's caching allocator, launches on the current stream and never synchronizes.
"""
from __future__ import annotations

import functools
import os
from typing import List, Optional

import torch
import torch.nn.functional as F

from . import _core
from ._api import _DTYPE_CODE, _ptr
from .gated import silu_mul_interleaved

# Path selection for tests and benchmarks: None = dispatch rule; "lut", "wgmma" (Hopper only) or
# "dequant" forces a path.
FORCE_PATH: Optional[str] = os.environ.get("LUTMM_FORCE_PATH") or None
_PATHS = {1: "lut", 2: "dequant", 3: "wgmma"}
_PATH_CODES = {v: k for k, v in _PATHS.items()}

# Per-device workspace for the fused paths' Stream-K fixup: zero-filled once; every call leaves its
# fixed counter region zeroed (the partial sums after it are scratch), so one serves every shape.
# Sized generously on first use so that CUDA graph capture never needs to grow it.
_MIN_WORKSPACE_BYTES = 64 << 20
_workspaces: dict = {}


def _workspace(device: torch.device, nbytes: int) -> torch.Tensor:
    ws = _workspaces.get(device.index)
    if ws is None or ws.numel() < nbytes:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"lutmm: the workspace must grow to {nbytes} bytes during CUDA graph capture; "
                               "run the model once before capturing")
        ws = torch.zeros(max(nbytes, _MIN_WORKSPACE_BYTES), dtype=torch.uint8, device=device)
        _workspaces[device.index] = ws
    return ws


# The current CUDA stream's handle without building a torch.cuda.Stream object (~1-2 us of eager
# overhead per call); inductor's generated code reads it the same way. The public API where it is missing.
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def current_stream_handle(device_index: int) -> int:
    if _raw_stream is not None:
        return _raw_stream(device_index)
    return torch.cuda.current_stream(device_index).cuda_stream


# Per-shape facts cached so that a call crosses into C++ once, not six times (eager overhead).
@functools.lru_cache(maxsize=4096)
def _sizes(N: int, K: int, bits: int, group_size: int):
    _core.validate_shape(N, K, bits, group_size)
    return _core.packed_bytes(N, K, bits, group_size), _core.packed_scale_count(N, K, bits, group_size)


def _check_forced(forced: Optional[str]) -> None:
    if forced is not None and forced not in _PATH_CODES:
        raise ValueError(f"LUTMM_FORCE_PATH / FORCE_PATH: got {forced!r}, expected one of {sorted(_PATH_CODES)}")


@functools.lru_cache(maxsize=4096)
def _plan(M: int, N: int, K: int, bits: int, group_size: int, device_index: int, forced: Optional[str] = None):
    """(path, workspace bytes) for a call; `forced` overrides the dispatch rule."""
    _check_forced(forced)
    path = forced or _PATHS[_core.gpu_choose_path(M, N, K, bits, group_size, device_index)]
    if path == "wgmma" and not _core.gpu_wgmma_supported(device_index):
        raise ValueError("path 'wgmma' needs an sm_90 (Hopper) GPU and a build with sm_90a code")
    ws = 0 if path == "dequant" else _core.gpu_workspace_bytes(M, N, K, bits, group_size, device_index,
                                                                _PATH_CODES[path])
    return path, ws


def choose_path(M: int, N: int, K: int, bits: int, group_size: int, device_index: int = 0) -> str:
    if FORCE_PATH:  # without asking the device: a forced path is what the caller wants, even on the CPU
        _check_forced(FORCE_PATH)
        return FORCE_PATH
    return _plan(M, N, K, bits, group_size, device_index)[0]


@torch.library.custom_op("lutmm::lut_matmul", mutates_args=())
def lut_matmul(x: torch.Tensor, packed: torch.Tensor, packed_scales: torch.Tensor, table: List[float], N: int, K: int,
               bits: int, group_size: int, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Y[..., N] = X[..., K] W_hat^T (+ bias). Dispatches to the CPU or CUDA implementation."""
    raise NotImplementedError("lutmm::lut_matmul: no implementation for this device")


@lut_matmul.register_fake
def _(x, packed, packed_scales, table, N, K, bits, group_size, bias=None):
    return x.new_empty(*x.shape[:-1], N)


def _check_packed(packed, packed_scales, N, K, bits, group_size, device_type):
    nbytes, nscales = _sizes(N, K, bits, group_size)
    return (_ptr(packed, "packed", torch.uint8, nbytes, device_type),
            _ptr(packed_scales, "packed_scales", torch.float16, nscales, device_type))


def cpu_dequantize(packed, packed_scales, table, N, K, bits, group_size) -> torch.Tensor:
    """float32 N x K weight from the packed layout, on the CPU."""
    pp, ps = _check_packed(packed, packed_scales, N, K, bits, group_size, "cpu")
    w = torch.empty(N, K, dtype=torch.float32)
    _core.dequantize_packed(pp, ps, list(table), N, K, bits, group_size, w.data_ptr())
    return w


def gpu_dequantize(packed, packed_scales, table, N, K, bits, group_size, dtype) -> torch.Tensor:
    """N x K weight of `dtype` (fp16/bf16) from the packed layout, on packed's CUDA device."""
    pp, ps = _check_packed(packed, packed_scales, N, K, bits, group_size, "cuda")
    w = torch.empty(N, K, dtype=dtype, device=packed.device)
    _core.gpu_dequantize(pp, ps, list(table), N, K, bits, group_size, _DTYPE_CODE[dtype], w.data_ptr(),
                         current_stream_handle(packed.get_device()))
    return w


def _check_cpu_x(x, K: int, N: int, bias=None) -> None:
    """The CPU kernels' x (and bias): what the CUDA path's checks refuse there is refused here too, instead of
    a torch shape error or a silently truncated integer result."""
    if not x.is_floating_point():  # float64 is taken (the tests' gradient checks), in float32
        raise ValueError(f"x: dtype {x.dtype}, expected a floating-point dtype (float16 / bfloat16 / float32)")
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x: shape {tuple(x.shape)}, expected (..., K = {K})")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias: shape {tuple(bias.shape)}, expected ({N},)")


def _cpu_product(x, packed, packed_scales, table, N, K, bits, group_size, bias=None) -> torch.Tensor:
    """The CPU kernels' float32 Z = X W_hat^T (+ bias), x checked (_check_cpu_x)."""
    _check_cpu_x(x, K, N, bias)
    w = cpu_dequantize(packed.contiguous(), packed_scales.contiguous(), table, N, K, bits, group_size)
    return F.linear(x.float(), w, None if bias is None else bias.float())


def _eps_or_none(rms_eps: float) -> Optional[float]:
    """lut_matmul_layer's rms_eps (negative: no norm) as the optional eps of _after_product / _cuda_gemm."""
    return rms_eps if rms_eps >= 0 else None


@lut_matmul.register_kernel("cpu")
def _(x, packed, packed_scales, table, N, K, bits, group_size, bias=None):
    return _cpu_product(x, packed, packed_scales, table, N, K, bits, group_size, bias).to(x.dtype)


def _after_product(z: torch.Tensor, x: torch.Tensor, rms_eps: Optional[float], silu_mul: bool,
                   residual: Optional[torch.Tensor]) -> torch.Tensor:
    """What the fused kernels do after the product, on a float32 Z = X W_hat^T (the CPU kernels and the CUDA
    paths without them): the RMSNorm factor rsqrt(mean(x^2) + rms_eps) per token, silu(gate) * up, the
    residual. Float32 out."""
    if rms_eps is not None:
        z = z * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + rms_eps)
    if silu_mul:
        z = silu_mul_interleaved(z)
    return z if residual is None else z + residual.float()


def _cuda_gemm(x, packed, packed_scales, table, N, K, bits, group_size, bias, silu_mul: bool, residual=None,
               rms_eps: Optional[float] = None):
    """Y (..., N) = X W_hat^T (+ bias), or with silu_mul (an interleave_gate_up weight) silu(gate) * up
    (..., N / 2), on X's CUDA device; the fused kernels write the product in their epilogue, the dequant
    path computes it after cuBLAS. A folded decoder layer (lutmm.layerfold): with rms_eps, each token's
    sums are scaled by rsqrt(mean(x^2) + rms_eps) first; residual (..., N) is added last. The LUT path
    does both in the kernel, the others after the matmul."""
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"x: dtype {x.dtype}, expected float16 or bfloat16 on CUDA")
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    n_out = N // 2 if silu_mul else N
    flat = x.dim() == 2  # (M, K): no reshapes (each ~0.5-1 us of eager overhead)
    x2 = x if flat else x.reshape(-1, K)
    if not x2.is_contiguous() or x2.data_ptr() % 16:
        x2 = x2.contiguous().clone() if x2.data_ptr() % 16 else x2.contiguous()
    M = x2.shape[0]
    if M == 0:
        return x.new_empty(*x.shape[:-1], n_out)
    dev_index = x.get_device()
    stream = current_stream_handle(dev_index)
    path, ws_bytes = _plan(M, N, K, bits, group_size, dev_index, FORCE_PATH)
    if packed.get_device() != dev_index or packed_scales.get_device() != dev_index:
        name, t = ("packed", packed) if packed.get_device() != dev_index else ("packed_scales", packed_scales)
        raise ValueError(f"{name}: on {t.device}, expected {x.device} (the device of x)")
    dev = x.device
    if residual is not None:  # (..., n_out) of x's dtype and device (_check_layer_args)
        residual = residual.reshape(M, n_out).contiguous()
    if (residual is not None or rms_eps is not None) and path != "lut":  # the kernels that take them: LUT only
        z = _cuda_gemm(x2, packed, packed_scales, table, N, K, bits, group_size, bias, False).float()
        return _after_product(z, x2, rms_eps, silu_mul, residual).to(x.dtype).reshape(*x.shape[:-1], n_out)
    if path != "dequant":
        pp, ps = _check_packed(packed, packed_scales, N, K, bits, group_size, "cuda")
        bp = 0
        if bias is not None:
            bias = bias.contiguous()
            bp = _ptr(bias, "bias", x.dtype, N, "cuda")
        y = torch.empty(M, n_out, dtype=x.dtype, device=dev)
        ws = _workspace(dev, ws_bytes)
        _core.gpu_lut_gemm(x2.data_ptr(), _DTYPE_CODE[x.dtype], M, pp, ps, list(table), N, K, bits, group_size, bp,
                           y.data_ptr(), ws.data_ptr(), ws.numel(), stream, _PATH_CODES[path], int(silu_mul),
                           0 if residual is None else residual.data_ptr(), rms_eps is not None,
                           0.0 if rms_eps is None else float(rms_eps))
    else:
        w = gpu_dequantize(packed, packed_scales, table, N, K, bits, group_size, x.dtype)
        y = F.linear(x2, w, bias)
        if silu_mul:  # after cuBLAS, from its rounded product
            y = silu_mul_interleaved(y)
    return y if flat else y.reshape(*x.shape[:-1], n_out)


def cuda_lut_matmul(x, packed, packed_scales, table, N, K, bits, group_size, bias=None):
    """The CUDA implementation of lutmm::lut_matmul. lutmm.matmul and LUTLinear call it directly in eager
    mode without autograd: the custom-op dispatcher costs ~10-20 us per call (bench/bench_overhead.py)."""
    return _cuda_gemm(x, packed, packed_scales, table, N, K, bits, group_size, bias, False)


lut_matmul.register_kernel("cuda")(cuda_lut_matmul)


@torch.library.custom_op("lutmm::lut_matmul_silu_mul", mutates_args=())
def lut_matmul_silu_mul(x: torch.Tensor, packed: torch.Tensor, packed_scales: torch.Tensor, table: List[float], N: int,
                        K: int, bits: int, group_size: int) -> torch.Tensor:
    """Y[..., N/2] = silu(gate) * up of X[..., K] W_hat^T, W an interleave_gate_up weight (lutmm.gated)."""
    raise NotImplementedError("lutmm::lut_matmul_silu_mul: no implementation for this device")


@lut_matmul_silu_mul.register_fake
def _(x, packed, packed_scales, table, N, K, bits, group_size):
    return x.new_empty(*x.shape[:-1], N // 2)


@lut_matmul_silu_mul.register_kernel("cpu")
def _(x, packed, packed_scales, table, N, K, bits, group_size):
    z = _cpu_product(x, packed, packed_scales, table, N, K, bits, group_size)
    return _after_product(z, x, None, True, None).to(x.dtype)


def cuda_lut_matmul_silu_mul(x, packed, packed_scales, table, N, K, bits, group_size):
    """The CUDA implementation of lutmm::lut_matmul_silu_mul (called directly in eager mode, as cuda_lut_matmul)."""
    return _cuda_gemm(x, packed, packed_scales, table, N, K, bits, group_size, None, True)


lut_matmul_silu_mul.register_kernel("cuda")(cuda_lut_matmul_silu_mul)


def eager_fast_path(x: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """True when a CUDA call can skip the op dispatcher: not tracing for torch.compile, no autograd."""
    if not x.is_cuda or torch.compiler.is_compiling():
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)))


@torch.library.custom_op("lutmm::dequantize", mutates_args=())
def dequantize_op(packed: torch.Tensor, packed_scales: torch.Tensor, table: List[float], N: int, K: int, bits: int,
                  group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """W_hat (N x K, `dtype`) on packed's device; the GPU kernel for fp16/bf16 on CUDA."""
    if packed.is_cuda and dtype in (torch.float16, torch.bfloat16):
        return gpu_dequantize(packed, packed_scales, table, N, K, bits, group_size, dtype)
    return cpu_dequantize(packed.cpu().contiguous(), packed_scales.cpu().contiguous(), table, N, K, bits,
                          group_size).to(device=packed.device, dtype=dtype)


@dequantize_op.register_fake
def _(packed, packed_scales, table, N, K, bits, group_size, dtype):
    return packed.new_empty(N, K, dtype=dtype)


# Autograd: gradients flow to x and bias (for adapters / QLoRA-style training); the packed weight is
# frozen. dX = dY W_hat, computed from a dequantized copy of W.
def _setup_context(ctx, inputs, output):
    x, packed, packed_scales, table, N, K, bits, group_size, bias = inputs
    ctx.save_for_backward(packed, packed_scales)
    ctx.args = (table, N, K, bits, group_size)
    ctx.x_dtype = x.dtype
    ctx.has_bias = bias is not None


def _grad_weight(gy, packed, packed_scales, table, N, K, bits, group_size) -> torch.Tensor:
    """W_hat for a backward: gy's dtype on CUDA (fp16 / bf16), else float32."""
    wdt = gy.dtype if (gy.is_cuda and gy.dtype in (torch.float16, torch.bfloat16)) else torch.float32
    return torch.ops.lutmm.dequantize(packed, packed_scales, table, N, K, bits, group_size, wdt)


def _backward(ctx, gy):
    packed, packed_scales = ctx.saved_tensors
    table, N, K, bits, group_size = ctx.args
    gx = gb = None
    if ctx.needs_input_grad[0]:
        w = _grad_weight(gy, packed, packed_scales, table, N, K, bits, group_size)
        gx = torch.matmul(gy.to(w.dtype), w).to(ctx.x_dtype)
    if ctx.has_bias and ctx.needs_input_grad[8]:
        gb = gy.reshape(-1, N).sum(0)
    return gx, None, None, None, None, None, None, None, gb


lut_matmul.register_autograd(_backward, setup_context=_setup_context)


# Autograd of lut_matmul_silu_mul (gradients to x; the weight is frozen): with Z = X W_hat^T recomputed in
# the backward (gate columns G, up columns U, interleaved by 8), Y = silu(G) * U gives
# dG = dY * U * silu'(G), dU = dY * silu(G), and dX = dZ W_hat with dZ interleaved back like Z.
def _setup_context_silu_mul(ctx, inputs, output):
    x, packed, packed_scales, table, N, K, bits, group_size = inputs
    ctx.save_for_backward(x, packed, packed_scales)
    ctx.args = (table, N, K, bits, group_size)


def _silu_mul_grad(z: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """dZ (float32, ..., N) of Y = silu_mul_interleaved(Z) given dY (..., N / 2)."""
    N = z.shape[-1]
    z = z.float().reshape(*z.shape[:-1], N // 16, 2, 8)
    g, u = z[..., 0, :], z[..., 1, :]
    sg = torch.sigmoid(g)
    dy = gy.float().reshape(*gy.shape[:-1], N // 16, 8)
    return torch.stack([dy * u * sg * (1 + g * (1 - sg)), dy * g * sg], dim=-2).reshape(*gy.shape[:-1], N)


def _grad_x(x, gy, packed, packed_scales, table, N, K, bits, group_size, rms_eps: Optional[float],
            silu_mul: bool) -> torch.Tensor:
    """dX of Y = _after_product(X W_hat^T, X, rms_eps, silu_mul, ...) given dY. With Z = X W_hat^T
    (recomputed) and r = rsqrt(mean(x^2) + eps) per token, Y0 = r Z (Z without the norm): dY0 from dY
    (through silu_mul when gated), then dX = r dY0 W_hat - (r^3 / K) <dY0, Z> x."""
    w = _grad_weight(gy, packed, packed_scales, table, N, K, bits, group_size)
    z = torch.matmul(x.to(w.dtype), w.t()).float()
    r = None if rms_eps is None else torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + rms_eps)
    dy0 = _silu_mul_grad(z if r is None else z * r, gy) if silu_mul else gy.float()
    if r is None:
        return torch.matmul(dy0.to(w.dtype), w).to(x.dtype)
    return (r * torch.matmul(dy0.to(w.dtype), w).float()
            - (r ** 3 / K) * (dy0 * z).sum(-1, keepdim=True) * x.float()).to(x.dtype)


def _backward_silu_mul(ctx, gy):
    x, packed, packed_scales = ctx.saved_tensors
    table, N, K, bits, group_size = ctx.args
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None, None, None, None
    gx = _grad_x(x, gy, packed, packed_scales, table, N, K, bits, group_size, None, True)
    return gx, None, None, None, None, None, None, None


lut_matmul_silu_mul.register_autograd(_backward_silu_mul, setup_context=_setup_context_silu_mul)


# ---- a folded decoder layer (lutmm.layerfold) -------------------------------------------------------------
@torch.library.custom_op("lutmm::lut_matmul_layer", mutates_args=())
def lut_matmul_layer(x: torch.Tensor, packed: torch.Tensor, packed_scales: torch.Tensor, table: List[float], N: int,
                     K: int, bits: int, group_size: int, residual: Optional[torch.Tensor], rms_eps: float,
                     silu_mul: bool) -> torch.Tensor:
    """Z = X W_hat^T; with rms_eps >= 0 each token's row of Z times rsqrt(mean(x^2) + rms_eps) (an RMSNorm
    whose weight is folded into W); with silu_mul silu(gate) * up (lutmm.gated); plus residual if given."""
    raise NotImplementedError("lutmm::lut_matmul_layer: no implementation for this device")


@lut_matmul_layer.register_fake
def _(x, packed, packed_scales, table, N, K, bits, group_size, residual, rms_eps, silu_mul):
    return x.new_empty(*x.shape[:-1], N // 2 if silu_mul else N)


def _check_layer_args(x, residual, rms_eps: float, N: int, silu_mul: bool) -> None:
    """lut_matmul_layer's own arguments, the same on every device (the kernels check the rest)."""
    if not (rms_eps < 0 or 0 <= rms_eps < 1):  # NaN fails both
        raise ValueError(f"rms_eps: expected 0 <= eps < 1, or negative for no norm; got {rms_eps}")
    if residual is None:
        return
    if silu_mul:
        raise ValueError("residual: not with silu_mul (a gated MLP's gate/up call does not add the residual)")
    want = (*x.shape[:-1], N)
    if tuple(residual.shape) != want:
        raise ValueError(f"residual: shape {tuple(residual.shape)}, expected {want} (the output's)")
    if residual.dtype != x.dtype or residual.device != x.device:
        raise ValueError(f"residual: {residual.dtype} on {residual.device}, expected {x.dtype} on {x.device} (x's)")


@lut_matmul_layer.register_kernel("cpu")
def _(x, packed, packed_scales, table, N, K, bits, group_size, residual, rms_eps, silu_mul):
    _check_layer_args(x, residual, rms_eps, N, silu_mul)
    z = _cpu_product(x, packed, packed_scales, table, N, K, bits, group_size)
    return _after_product(z, x, _eps_or_none(rms_eps), silu_mul, residual).to(x.dtype)


def cuda_lut_matmul_layer(x, packed, packed_scales, table, N, K, bits, group_size, residual, rms_eps, silu_mul):
    _check_layer_args(x, residual, rms_eps, N, silu_mul)
    return _cuda_gemm(x, packed, packed_scales, table, N, K, bits, group_size, None, silu_mul, residual,
                      _eps_or_none(rms_eps))


lut_matmul_layer.register_kernel("cuda")(cuda_lut_matmul_layer)


# Autograd of lut_matmul_layer (gradients to x and the residual; the weight is frozen): dX as _grad_x says,
# the residual's gradient is dY.
def _setup_context_layer(ctx, inputs, output):
    x, packed, packed_scales, table, N, K, bits, group_size, residual, rms_eps, silu_mul = inputs
    ctx.save_for_backward(x, packed, packed_scales)
    ctx.args = (table, N, K, bits, group_size, rms_eps, silu_mul)
    ctx.res_dtype = None if residual is None else residual.dtype


def _backward_layer(ctx, gy):
    x, packed, packed_scales = ctx.saved_tensors
    table, N, K, bits, group_size, rms_eps, silu_mul = ctx.args
    gx = gres = None
    if ctx.needs_input_grad[0]:
        gx = _grad_x(x, gy, packed, packed_scales, table, N, K, bits, group_size, _eps_or_none(rms_eps), silu_mul)
    if ctx.res_dtype is not None and ctx.needs_input_grad[8]:
        gres = gy.to(ctx.res_dtype)
    return gx, None, None, None, None, None, None, None, gres, None, None


lut_matmul_layer.register_autograd(_backward_layer, setup_context=_setup_context_layer)
