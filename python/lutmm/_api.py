"""Core Python API: quantize / dequantize / matmul on torch tensors, over the C++ core."""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple, Union

import torch

from . import _core

# Version 2 (2026-11-26): 3-bit pair codes are 6 contiguous bits of a lane's code stream (version 1 kept
# their low and high bits apart); 2 and 4 bits are unchanged. Version 1 checkpoints load (repacked).
FORMAT_VERSION = 2
TableSpec = Union[str, Sequence[float], torch.Tensor]


_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _ptr(t: torch.Tensor, name: str, dtype=None, numel=None, device_type=None) -> int:
    """Address of a contiguous tensor for the C++ core, after checking what the core relies on."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtype is not None and t.dtype not in (dtype if isinstance(dtype, tuple) else (dtype,)):
        raise ValueError(f"{name}: dtype {t.dtype}, expected {dtype}")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"{name}: got {t.numel()} elements, expected {numel}")
    if device_type is not None and not (t.is_cuda if device_type == "cuda" else t.device.type == device_type):
        raise ValueError(f"{name}: on {t.device}, expected a {device_type} tensor")
    if not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor")
    return t.data_ptr() if t.numel() else 0


def gpu_available() -> bool:
    """True when the extension has CUDA kernels and torch sees a CUDA device."""
    return torch.cuda.is_available() and _core.gpu_available()


def build_info() -> str:
    return _core.build_info()


def _check_bits(bits) -> int:
    if bits not in (2, 3, 4):
        raise ValueError(f"bits: got {bits!r}, expected 2, 3 or 4")
    return int(bits)


def make_table(table: TableSpec, bits: int) -> torch.Tensor:
    """The value table T (float32, 2^bits entries) for a spec: "nf", "int", or explicit values."""
    bits = _check_bits(bits)
    if isinstance(table, str):
        if table == "nf":
            return torch.tensor(_core.nf_table(bits), dtype=torch.float32)
        if table == "int":
            return torch.tensor(_core.int_table(bits), dtype=torch.float32)
        raise ValueError(f"table: got {table!r}, expected 'nf', 'int' or 2^bits values"
                         + (" ('kmeans' is learned from a weight: lutmm.quantize(w, table='kmeans'))"
                            if table == "kmeans" else ""))
    t = torch.as_tensor(table, dtype=torch.float32).detach().cpu().reshape(-1).contiguous()
    if t.numel() != 1 << bits:
        raise ValueError(f"table: got {t.numel()} entries, expected 2^bits = {1 << bits} for bits = {bits}")
    if not torch.isfinite(t).all():
        raise ValueError("table: expected finite values (no NaN/Inf)")
    if (t == t[0]).all():  # every code would dequantize to one value per group (all zeros: no scale fits)
        raise ValueError(f"table: all {t.numel()} entries equal {float(t[0])}, expected at least two distinct values")
    return t


@dataclass
class QuantizedWeight:
    """A LUT-quantized N x K weight, kept in the packed (GPU-ready, device-independent) layout.

    packed:        uint8 [packed_bytes]          codes, see docs/format.md
    packed_scales: float16 [packed_scale_count]  per-group scales, packed per 16-row block
    table:         float32 [2^bits]              value table T (always on the CPU)

    Construction checks the fields' types and the shape's integers, never the values in device memory: a
    NaN/Inf scale gives NaN/Inf in its group's outputs (lutmm checkpoints are checked when loaded).
    """
    packed: torch.Tensor
    packed_scales: torch.Tensor
    table: torch.Tensor
    bits: int
    group_size: int
    shape: Tuple[int, int]
    table_kind: str = "custom"
    _table_list: list = field(default=None, repr=False, compare=False)

    def __post_init__(self):  # types and values only: nothing here reads device memory
        for name in ("packed", "packed_scales", "table"):
            if not isinstance(getattr(self, name), torch.Tensor):
                raise ValueError(f"QuantizedWeight.{name}: expected a torch.Tensor, got "
                                 f"{type(getattr(self, name)).__name__}")
        self.bits = _check_bits(self.bits)
        try:
            self.group_size = operator.index(self.group_size)
            shape = tuple(operator.index(d) for d in self.shape)
        except TypeError:
            raise ValueError(f"QuantizedWeight: group_size {self.group_size!r} and shape {self.shape!r} must be "
                             "integers") from None
        if len(shape) != 2 or min(shape) < 0 or self.group_size < 1:
            raise ValueError(f"QuantizedWeight: shape {self.shape!r} must be (N, K) >= 0 and group_size "
                             f"{self.group_size!r} >= 1")
        self.shape = shape
        self.table = self.table.detach().to("cpu", torch.float32).contiguous()
        self._table_list = [float(v) for v in self.table.tolist()]

    @property
    def N(self) -> int:
        return self.shape[0]

    @property
    def K(self) -> int:
        return self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def to(self, device) -> "QuantizedWeight":
        return QuantizedWeight(self.packed.to(device), self.packed_scales.to(device), self.table, self.bits,
                               self.group_size, self.shape, self.table_kind)

    def codes(self) -> torch.Tensor:
        """Unpacked codes, uint8 N x K (CPU)."""
        return _unpack(self)[0]

    def scales(self) -> torch.Tensor:
        """Per-group scales, float16 N x G (CPU)."""
        return _unpack(self)[1]

    def nbytes(self) -> int:
        return self.packed.numel() + 2 * self.packed_scales.numel() + 4 * self.table.numel()


def _unpack(qw: QuantizedWeight):
    N, K = qw.shape
    codes = torch.empty(N, K, dtype=torch.uint8)
    scales = torch.empty(N, K // qw.group_size, dtype=torch.float16)
    packed, pscales = qw.packed.cpu().contiguous(), qw.packed_scales.cpu().contiguous()
    _core.unpack(_ptr(packed, "packed", torch.uint8, _core.packed_bytes(N, K, qw.bits, qw.group_size)),
                 _ptr(pscales, "packed_scales", torch.float16, _core.packed_scale_count(N, K, qw.bits, qw.group_size)),
                 N, K, qw.bits, qw.group_size, _ptr(codes, "codes"), _ptr(scales, "scales"))
    return codes, scales


def pack(codes: torch.Tensor, scales: torch.Tensor, table: torch.Tensor, bits: int, group_size: int,
         table_kind: str = "custom") -> QuantizedWeight:
    """Builds a QuantizedWeight from logical codes (uint8 N x K) and fp16 scales (N x K/g)."""
    bits = _check_bits(bits)
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise ValueError(f"codes: expected a 2-D uint8 tensor, got {codes.dtype} with {codes.dim()} dims")
    N, K = codes.shape
    _core.validate_shape(N, K, bits, group_size)
    packed = torch.empty(_core.packed_bytes(N, K, bits, group_size), dtype=torch.uint8)
    pscales = torch.empty(_core.packed_scale_count(N, K, bits, group_size), dtype=torch.float16)
    c = codes.cpu().contiguous()
    sc = scales.to(torch.float16).cpu().contiguous()
    _core.pack(_ptr(c, "codes"), _ptr(sc, "scales", numel=N * (K // group_size)), N, K, bits, group_size,
               _ptr(packed, "packed"), _ptr(pscales, "packed_scales"))
    return QuantizedWeight(packed, pscales, table, bits, int(group_size), (int(N), int(K)), table_kind)


def quantize(weight: torch.Tensor, bits: int = 4, group_size: Optional[int] = 64, table: TableSpec = "nf",
             search_scale: bool = True, importance: Optional[torch.Tensor] = None,
             kmeans_iterations: int = 8, device=None) -> QuantizedWeight:
    """Quantizes an N x K weight (fp32/fp16/bf16, any device) to the LUT format.

    bits: 2, 3 or 4.  group_size: 32, 64, 128, 256, or None/-1 for one group per row (g = K).
    table: "nf" (NormalFloat), "int" (symmetric uniform), "kmeans" (learned per layer from NF), or
    2^bits explicit values.  search_scale: per-group scale search (else absmax).
    importance: optional K non-negative weights per input column (e.g. E[x^2] from calibration).
    device: where the per-group search runs: None = the weight's device (a CUDA weight is quantized on
    its GPU by the torch quantizer, a CPU weight by the C++ one), or "cpu" / "cuda" / a torch.device.
    The result is always a CPU QuantizedWeight (packing runs on the CPU); call .to(device) after.
    """
    bits = _check_bits(bits)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"weight: expected a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D tensor (out_features x in_features), got shape {tuple(weight.shape)}")
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"weight: dtype {weight.dtype}, expected float32, float16 or bfloat16")
    N, K = weight.shape
    g = K if group_size in (None, -1) else int(group_size)
    _core.validate_shape(N, K, bits, g)
    w = weight.detach().cpu().contiguous()
    imp = None
    if importance is not None:
        imp = torch.as_tensor(importance, dtype=torch.float32).detach().cpu().reshape(-1).contiguous()
        if imp.numel() != K:
            raise ValueError(f"importance: got {imp.numel()} values, expected K = {K}")
        if not torch.isfinite(imp).all() or (imp < 0).any():
            raise ValueError("importance: expected finite non-negative values")
    kind = table if isinstance(table, str) else "custom"
    if isinstance(table, str) and table == "kmeans":
        init = make_table("nf", bits)
        t = torch.tensor(_core.kmeans_table(_ptr(w, "weight"), _DTYPE_CODE[w.dtype], N, K, bits, g, init.tolist(),
                                            kmeans_iterations, 0 if imp is None else _ptr(imp, "importance")),
                         dtype=torch.float32)
    else:
        t = make_table(table, bits)
    run_on = torch.device(device) if device is not None else weight.device
    if run_on.type != "cpu":
        from .quantize_torch import quantize_codes
        codes, scales = quantize_codes(weight.detach().to(run_on), bits, g, t, search_scale,
                                       None if imp is None else imp.to(run_on))
        return pack(codes.cpu(), scales.cpu(), t, bits, g, kind)
    codes = torch.empty(N, K, dtype=torch.uint8)
    scales = torch.empty(N, K // g, dtype=torch.float16)
    _core.quantize(_ptr(w, "weight"), _DTYPE_CODE[w.dtype], N, K, bits, g, t.tolist(), _ptr(codes, "codes"),
                   _ptr(scales, "scales"), bool(search_scale), 16, 0.625, 0 if imp is None else _ptr(imp, "importance"))
    return pack(codes, scales, t, bits, g, kind)


ROW_BLOCK = 16  # rows per packed block: the unit of concatenation (and slicing) along N


def _check_concat_part(i: int, part: QuantizedWeight, first: QuantizedWeight, is_last: bool) -> None:
    """Raises ValueError naming what makes `part` (index i) unable to follow `first` in concat_rows."""
    if not isinstance(part, QuantizedWeight):
        raise ValueError(f"parts[{i}]: expected a QuantizedWeight, got {type(part).__name__}")
    if part.packed.dtype != torch.uint8 or part.packed_scales.dtype != torch.float16:
        raise ValueError(f"parts[{i}]: packed dtype {part.packed.dtype} / packed_scales dtype "
                         f"{part.packed_scales.dtype}, expected torch.uint8 / torch.float16")
    nbytes = _core.packed_bytes(part.N, part.K, part.bits, part.group_size)
    nscales = _core.packed_scale_count(part.N, part.K, part.bits, part.group_size)
    if part.packed.numel() != nbytes or part.packed_scales.numel() != nscales:
        raise ValueError(f"parts[{i}]: {part.packed.numel()} packed bytes / {part.packed_scales.numel()} scales, "
                         f"expected {nbytes} / {nscales} for shape {part.shape}")
    for what in ("bits", "group_size", "K"):
        if getattr(part, what) != getattr(first, what):
            raise ValueError(f"parts[{i}]: {what} = {getattr(part, what)}, but parts[0] has "
                             f"{what} = {getattr(first, what)} (all parts must share bits, group size and K)")
    if not torch.equal(part.table, first.table):
        raise ValueError(f"parts[{i}]: its value table differs from parts[0]'s (a fused weight has one table; "
                         "NF / int tables always match, per-layer k-means tables do not)")
    if part.device != first.device:
        raise ValueError(f"parts[{i}]: on {part.device}, but parts[0] is on {first.device}")
    if not is_last and part.N % ROW_BLOCK:
        raise ValueError(f"parts[{i}]: N = {part.N} is not a multiple of {ROW_BLOCK}; every part but the last "
                         f"must fill whole {ROW_BLOCK}-row blocks")


def concat_rows(parts: Sequence[QuantizedWeight]) -> QuantizedWeight:
    """The QuantizedWeight of cat([W_0, W_1, ...], dim=0) (rows = out_features), without unpacking.

    The packed codes and scales are stored in 16-row blocks, row-block-major (docs/format.md), so when every
    part but the last has N a multiple of 16 the result is the byte concatenation of the parts: exactly
    what packing the concatenated codes and scales gives. All parts must have the same bits, group size, K,
    value table and device; raises ValueError naming the part and the mismatch otherwise.
    """
    parts = list(parts)
    if not parts:
        raise ValueError("parts: expected at least one QuantizedWeight")
    first = parts[0]
    for i, part in enumerate(parts):
        _check_concat_part(i, part, first, is_last=i == len(parts) - 1)
    kinds = {p.table_kind for p in parts}
    N = sum(p.N for p in parts)
    return QuantizedWeight(torch.cat([p.packed for p in parts]), torch.cat([p.packed_scales for p in parts]),
                           first.table, first.bits, first.group_size, (N, first.K),
                           kinds.pop() if len(kinds) == 1 else "custom")


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W_hat = T[Q] * S as an N x K tensor on qw's device. On the GPU (fp16/bf16) the table is rounded to
    dtype first, exactly as the kernels see it."""
    _check_qw(qw)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype: got {dtype}, expected a floating-point torch.dtype")
    N, K = qw.shape
    if qw.packed.is_cuda and dtype in (torch.float16, torch.bfloat16):
        from . import ops
        return ops.gpu_dequantize(qw.packed, qw.packed_scales, qw._table_list, N, K, qw.bits, qw.group_size, dtype)
    from . import ops
    return ops.cpu_dequantize(qw.packed.cpu(), qw.packed_scales.cpu(), qw._table_list, N, K, qw.bits,
                              qw.group_size).to(device=qw.device, dtype=dtype)


def _check_qw(qw, name: str = "qw") -> None:
    if not isinstance(qw, QuantizedWeight):
        raise ValueError(f"{name}: expected a lutmm.QuantizedWeight (from lutmm.quantize), got {type(qw).__name__}")


def _check_x(x: torch.Tensor, qw: QuantizedWeight):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != qw.K:
        raise ValueError(f"x: last dimension is {x.shape[-1] if x.dim() else None}, expected K = {qw.K}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x: dtype {x.dtype}, expected float16 or bfloat16 (float32 on the CPU)")
    if x.device != qw.device:
        raise ValueError(f"x: on {x.device}, but the weight is on {qw.device}")


def matmul(x: torch.Tensor, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Y = X W_hat^T (+ bias) for X of shape (..., K); Y has X's dtype and shape (..., N).

    On CUDA (fp16/bf16) this is the lutmm kernel (torch op `lutmm::lut_matmul`); on the CPU, a float32
    torch matmul on the dequantized weight."""
    _check_qw(qw)
    _check_x(x, qw)
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise ValueError(f"bias: expected a torch.Tensor or None, got {type(bias).__name__}")
    if bias is not None and (bias.shape != (qw.N,) or bias.device != x.device):
        raise ValueError(f"bias: expected shape ({qw.N},) on {x.device}, got {tuple(bias.shape)} on {bias.device}")
    from . import ops
    op = ops.cuda_lut_matmul if ops.eager_fast_path(x, bias) else ops.lut_matmul
    return op(x, qw.packed, qw.packed_scales, qw._table_list, qw.N, qw.K, qw.bits, qw.group_size, bias)


def reference_matmul(x: torch.Tensor, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The oracle: fp64 accumulation on the CPU, float32 result of shape (M, N) for x of shape (M, K)."""
    _check_qw(qw)
    _check_x(x.cpu(), qw.to("cpu"))
    codes, scales = _unpack(qw)
    x2 = x.detach().cpu().reshape(-1, qw.K).contiguous()
    if x2.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x: dtype {x2.dtype} unsupported")
    out = torch.empty(x2.shape[0], qw.N, dtype=torch.float32)
    b = None if bias is None else bias.detach().cpu().float().contiguous()
    _core.reference_matmul(_ptr(x2, "x"), _DTYPE_CODE[x2.dtype], x2.shape[0], _ptr(codes, "codes"),
                           _ptr(scales, "scales"), qw._table_list, qw.N, qw.K, qw.bits, qw.group_size,
                           0 if b is None else _ptr(b, "bias", numel=qw.N), _ptr(out, "out"))
    return out.reshape(*x.shape[:-1], qw.N)
