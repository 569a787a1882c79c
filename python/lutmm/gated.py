"""Gated MLPs in one call: gate and up as one weight, silu(gate) * up written by the GEMM's epilogue.

    w = lutmm.gated.interleave_gate_up(gate_qw, up_qw)     # N = 2 I rows, interleaved by 8 (no requantizing)
    h = lutmm.gated.gated_matmul(x, w)                     # silu(x gate^T) * (x up^T), shape (..., I)

In a 16-row block of the packed layout (docs/format.md) lane 4g + t holds the results of rows g and g + 8.
With gate rows 8j .. 8j + 7 as rows 16j .. 16j + 7 of the fused weight and up rows 8j .. 8j + 7 as rows
16j + 8 .. 16j + 15, each gate value meets its up value in one thread, so the kernels (every decode split
and the wgmma kernel) write silu(g) * u straight from their fp32 sums: one kernel and one write of I
columns instead of 2 I columns, a split, SiLU and a product (Epilogue::kSiluMul in include/lutmm/cuda.h).

The interleave moves whole pair codes: in every bit width a code pair of row g and the pair of row g + 8
at the same columns sit side by side (p and p + 1 in the format's notation), so fused block 2a + h takes
half h of each such unit from gate block a and from up block a, and likewise the scales (rows r and r + 8
are stored side by side). It runs as tensor ops on the weight's own device; the result is exactly the
packed form of the interleaved weight (tested against quantizing it).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import _core
from ._api import QuantizedWeight, _check_x

# A unit is the pair (row g, row g + 8) of fields of F bits; a 64-bit word holds whole units. LO selects
# the low field (row g) of every unit of a word.
_UNIT_BITS = {4: 8, 2: 4, 3: 6}  # field width F: a pair code (2 b bits) at 4 and 3 bits, a nibble at 2
_LO = {8: 0x00FF00FF00FF00FF, 4: 0x0F0F0F0F0F0F0F0F, 6: 0x03F03F03F03F, 16: 0x0000FFFF0000FFFF}


def _merge(g: torch.Tensor, u: torch.Tensor, h: torch.Tensor, f: int) -> torch.Tensor:
    """Words (int64) whose units are (field h of g's unit, field h of u's unit); h broadcasts (0 or 1)."""
    lo = _LO[f]
    shift = h * f
    return ((g >> shift) & lo) | (((u >> shift) & lo) << f)


def _to_words(b: torch.Tensor, nbytes: int) -> torch.Tensor:
    """uint8 [..., nbytes] (nbytes <= 8) -> int64 [...], little-endian."""
    w = torch.zeros(b.shape[:-1], dtype=torch.int64, device=b.device)
    for i in range(nbytes):
        w |= b[..., i].to(torch.int64) << (8 * i)
    return w


def _from_words(w: torch.Tensor, nbytes: int) -> torch.Tensor:
    return torch.stack([((w >> (8 * i)) & 0xFF).to(torch.uint8) for i in range(nbytes)], dim=-1)


def _interleave_codes(gp: torch.Tensor, up: torch.Tensor, bits: int, nb_out: int, cb: int) -> torch.Tensor:
    """Packed codes of the fused weight (nb_out row blocks) from gate's and up's (row-block-major bytes)."""
    f = _UNIT_BITS[bits]
    block = 256 * bits
    a = torch.arange(nb_out, device=gp.device) // 2
    h = torch.arange(nb_out, device=gp.device) % 2
    g = gp.view(-1, cb, block)[a]  # [nb_out, cb, block] bytes of the source blocks
    u = up.view(-1, cb, block)[a]
    if bits != 3:  # units never straddle bytes: 64-bit words in place
        return _merge(g.view(torch.int64), u.view(torch.int64), h.view(-1, 1, 1), f).view(torch.uint8).reshape(-1)

    # 3 bits: a lane's 192-bit stream is its 16 bytes at lane * 16 then its 8 at 512 + lane * 8; 12-bit
    # units fill 48-bit words exactly, so regroup each lane's 24 bytes as 4 words of 6 bytes.
    def streams(x):  # [nb_out, cb, 32 lanes, 24 bytes]
        return torch.cat([x[..., :512].reshape(nb_out, cb, 32, 16), x[..., 512:].reshape(nb_out, cb, 32, 8)], dim=-1)

    gw = _to_words(streams(g).view(nb_out, cb, 32, 4, 6), 6)
    uw = _to_words(streams(u).view(nb_out, cb, 32, 4, 6), 6)
    s = _from_words(_merge(gw, uw, h.view(-1, 1, 1, 1), f), 6).view(nb_out, cb, 32, 24)
    return torch.cat([s[..., :16].reshape(nb_out, cb, 512), s[..., 16:].reshape(nb_out, cb, 256)], dim=-1).reshape(-1)


def _interleave_scales(gs: torch.Tensor, us: torch.Tensor, nb_out: int, groups: int) -> torch.Tensor:
    """Packed fp16 scales [row blocks][G][8][2]: the (row r, row r + 8) pair is a 32-bit unit."""
    a = torch.arange(nb_out, device=gs.device) // 2
    h = (torch.arange(nb_out, device=gs.device) % 2).view(-1, 1)
    g = gs.view(-1, groups * 16)[a].contiguous().view(torch.int64)  # [nb_out, groups * 4] words of 2 units
    u = us.view(-1, groups * 16)[a].contiguous().view(torch.int64)
    return _merge(g, u, h, 16).view(torch.float16).reshape(-1)


def _interleave_problem(gate: QuantizedWeight, up: QuantizedWeight) -> Optional[str]:
    """Why interleave_gate_up(gate, up) refuses these weights (the message of its ValueError), or None when
    they can be interleaved: the same shape, K, bits, group size, table and device, I a multiple of 8, and
    packed tensors of the sizes that shape implies."""
    for name, w in (("gate", gate), ("up", up)):
        if not isinstance(w, QuantizedWeight):
            return f"{name}: expected a QuantizedWeight, got {type(w).__name__}"
    if gate.shape != up.shape:
        return f"gate and up: shapes {gate.shape} and {up.shape} differ"
    if gate.bits != up.bits or gate.group_size != up.group_size:
        return (f"gate and up: bits / group size ({gate.bits}, {gate.group_size}) and "
                f"({up.bits}, {up.group_size}) differ")
    if not torch.equal(gate.table, up.table):
        return "gate and up: the value tables differ (one table per fused weight)"
    if gate.device != up.device:
        return f"gate and up: on {gate.device} and {up.device}"
    inter, K = gate.shape
    if inter % 8:
        return f"gate and up: {inter} rows, expected a multiple of 8"
    try:
        nbytes = _core.packed_bytes(inter, K, gate.bits, gate.group_size)
        nscales = _core.packed_scale_count(inter, K, gate.bits, gate.group_size)
    except ValueError as e:  # an invalid shape, bits or group size: the message names it
        return str(e)
    for name, w in (("gate", gate), ("up", up)):
        if (w.packed.dtype != torch.uint8 or w.packed.numel() != nbytes or w.packed_scales.dtype != torch.float16
                or w.packed_scales.numel() != nscales):
            return (f"{name}: packed {w.packed.dtype} x {w.packed.numel()}, packed_scales "
                    f"{w.packed_scales.dtype} x {w.packed_scales.numel()}; expected uint8 x {nbytes} and "
                    f"float16 x {nscales} for {inter} x {K} at {gate.bits} bits, g = {gate.group_size}")
    return None


def interleave_gate_up(gate: QuantizedWeight, up: QuantizedWeight) -> QuantizedWeight:
    """The [2 I, K] weight whose row block j holds gate rows 8j .. 8j + 7, then up rows 8j .. 8j + 7, for
    gated_matmul. gate and up: I x K with the same K, bits, group size and table, on one device, I a
    multiple of 8. Raises ValueError naming the mismatch (_interleave_problem's message)."""
    problem = _interleave_problem(gate, up)
    if problem is not None:
        raise ValueError(problem)
    inter, K = gate.shape
    nb_out = inter // 8  # fused row blocks (2 I / 16)
    cb = (K + 127) // 128
    groups = K // gate.group_size
    packed = _interleave_codes(gate.packed.contiguous(), up.packed.contiguous(), gate.bits, nb_out, cb)
    scales = _interleave_scales(gate.packed_scales.contiguous(), up.packed_scales.contiguous(), nb_out, groups)
    return QuantizedWeight(packed, scales, gate.table, gate.bits, gate.group_size, (2 * inter, K), gate.table_kind)


def silu_mul_interleaved(z: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of a product Z (..., N) whose columns are interleaved by 8 (N a multiple of 16), in
    float32, returned in z's dtype: the epilogue's math, for the CPU, the dequant path and tests."""
    n = z.shape[-1]
    if n % 16:
        raise ValueError(f"z: last dimension {n}, expected a multiple of 16")
    zz = z.float().reshape(*z.shape[:-1], n // 16, 2, 8)
    return (F.silu(zz[..., 0, :]) * zz[..., 1, :]).reshape(*z.shape[:-1], n // 2).to(z.dtype)


def gated_matmul(x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """silu(X gate^T) * (X up^T) for X (..., K) and qw = interleave_gate_up(gate, up): shape (..., N / 2),
    X's dtype. On CUDA one fused kernel (torch op `lutmm::lut_matmul_silu_mul`); on the CPU, float32.
    The packed form does not record the interleaving: any weight of 16k rows is taken as one (rows 16j ..
    16j + 7 gates, 16j + 8 .. 16j + 15 ups), so pass only interleave_gate_up's output (LUTGatedLinear keeps it)."""
    _check_x(x, qw)
    if qw.N % 16:
        raise ValueError(f"qw: {qw.N} rows, expected a multiple of 16 (an interleave_gate_up weight)")
    from . import ops
    op = ops.cuda_lut_matmul_silu_mul if ops.eager_fast_path(x, None) else ops.lut_matmul_silu_mul
    return op(x, qw.packed, qw.packed_scales, qw._table_list, qw.N, qw.K, qw.bits, qw.group_size)


def reference_gated_matmul(x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """The oracle: lutmm.reference_matmul (fp64 sums, CPU), then silu(gate) * up in float32."""
    from ._api import reference_matmul
    return silu_mul_interleaved(reference_matmul(x, qw))
