"""Grouped-query attention for Hugging Face decoders without copying K and V per query head.

Once the linears are quantized, attention becomes a large part of each decode step. Hugging Face's
`sdpa` attention, given a mask (which a static KV cache always brings), expands K and V from the KV
heads to all query heads (`repeat_kv`) before calling `scaled_dot_product_attention`: on a
LLaMA-3-8B-shaped model at batch 16 that copy and the 4x larger attention took ~3.1 ms of a 6.3 ms
step (H100, docs/performance.md, end-to-end section). Here the G query heads that share a KV head
are folded into the query-length axis instead ([B, Hkv * G, L, D] -> [B, Hkv, G * L, D]), so one SDPA
call reads each KV head once; the mask is repeated over the G folded heads. A decode step (one query
token) skips SDPA: its kernels have a fixed cost of ~13-20 us per call at these sizes, while the plain
ops compile to ~7 us. The result equals the `sdpa` one up to rounding.

    from lutmm.attention import use_gqa_attention
    use_gqa_attention(model)   # any model whose attention goes through AttentionInterface (Llama, ...)

On CUDA, decode steps run through lutmm's own kernel (`torch.ops.lutmm.gqa_decode_attention`,
src/cuda/decode_attention.cu: flash-decoding on the tensor cores, one pass over K and V, masked
positions not loaded); elsewhere (CPU, float masks, head dimensions other than 64 and 128, more than 8
query heads per KV head), or with `use_gqa_attention(model, decode_kernel=False)`, the plain ops below
serve. H100, 2026-11-27 (docs/performance-log.md items 49-51): one 8B layer at batch 16 11.2 us against the
compiled plain ops' 19.3; the 8B-shaped model's compiled decode step +6-7% at 3 bits over the plain ops.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from . import _core
from ._api import _DTYPE_CODE
from .ops import current_stream_handle

NAME = "lutmm_gqa"
NAME_KERNEL = "lutmm_gqa_kernel"  # the same, decode steps through gqa_decode_attention's CUDA kernel


@torch.library.custom_op("lutmm::gqa_decode_attention", mutates_args=())
def gqa_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                         scale: float, variant: int = 0) -> torch.Tensor:
    """One decode step of grouped-query attention. q [B, Hkv, G, D] (query head h * G + j), k / v
    [B, Hkv, S, D], mask None or bool [B or 1, S] (True attends). Returns [B, Hkv, G, D] in q's dtype:
    softmax(scale * q k^T, masked) v, fp32 inside; a row with nothing to attend gives NaN.
    variant (CUDA): 0 auto, 1 kMma (split + combine), 2 kWide (a CTA per KV head), include/lutmm/attention.h's AttnKernel.
    (Not named `kernel`: inductor's fallback lowering passes an argument of that name.)"""
    raise NotImplementedError("lutmm::gqa_decode_attention: no implementation for this device")


@gqa_decode_attention.register_fake
def _(q, k, v, mask, scale, variant=0):
    return q.new_empty(q.shape)  # contiguous, as both implementations return it


def _check_attention_args(q, k, v, mask):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"gqa_decode_attention: q, k, v must be 4-D, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    b, hkv, _, d = q.shape
    if k.shape[:2] != (b, hkv) or k.shape[3] != d or v.shape != k.shape:
        raise ValueError(f"gqa_decode_attention: k / v shape {tuple(k.shape)} / {tuple(v.shape)} do not match q "
                         f"{tuple(q.shape)} ([B, Hkv, S, D])")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"gqa_decode_attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"gqa_decode_attention: dtype {q.dtype}, expected float16, bfloat16 or float32")
    if mask is not None and (mask.dtype != torch.bool or mask.dim() != 2 or mask.shape[0] not in (1, b)
                             or mask.shape[1] != k.shape[2]):
        raise ValueError(f"gqa_decode_attention: mask must be bool [1 or {b}, {k.shape[2]}], got "
                         f"{mask.dtype} {tuple(mask.shape)}")


@gqa_decode_attention.register_kernel("cpu")
def _(q, k, v, mask, scale, variant=0):
    _check_attention_args(q, k, v, mask)
    sc = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if mask is not None:
        sc = sc.masked_fill(~mask[:, None, None, :], float("-inf"))
    return torch.matmul(torch.softmax(sc, dim=-1), v.float()).to(q.dtype).contiguous()


@functools.lru_cache(maxsize=1024)
def _workspace_bytes(b: int, hkv: int, g: int, s: int, d: int, device: int) -> int:
    """The kernel's scratch bytes for these sizes on `device` (one crossing into C++ per shape)."""
    return _core.gpu_decode_attention_workspace_bytes(b, hkv, g, s, d, device)


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """t itself when the kernel can read it in place (rows contiguous and 16-byte aligned: strides of
    the two leading dimensions multiples of 8 elements), else a contiguous copy."""
    ok = (t.stride(-1) == 1 and t.stride(-2) == t.shape[-1] and t.data_ptr() % 16 == 0
          and all(t.shape[i] == 1 or t.stride(i) % 8 == 0 for i in (0, 1)))
    return t if ok else t.clone(memory_format=torch.contiguous_format)


def _aligned16(t: torch.Tensor) -> torch.Tensor:
    """t itself when contiguous and 16-byte aligned (the kernel's 16-byte loads), else a contiguous copy."""
    return t if t.is_contiguous() and t.data_ptr() % 16 == 0 else t.clone(memory_format=torch.contiguous_format)


def _launch(q, k, v, mask, scale, variant=0, fused=(), fused_strides=()) -> torch.Tensor:
    """Runs the CUDA decode-attention kernel on checked arguments and returns out [B, Hkv, G, D]: q
    [B, Hkv, G, D] (rows contiguous; its batch stride is fused_strides[0] in the fused step, else q is
    contiguous), k / v [B, Hkv, S, D] as _rows_contiguous leaves them, mask None or bool [B or 1, S].
    fused / fused_strides: the fused step's pointers and strides (gpu_decode_attention's binding)."""
    b, hkv, g, d = q.shape
    s_len = k.shape[2]
    if mask is not None and mask.stride(-1) != 1:
        mask = mask.contiguous()
    out = q.new_empty(b, hkv, g, d)
    dims = [b, hkv, g, s_len, d]
    strides = [k.stride(0) if b > 1 else 0, k.stride(1) if hkv > 1 else 0,
               v.stride(0) if b > 1 else 0, v.stride(1) if hkv > 1 else 0,
               mask.stride(0) if mask is not None and mask.shape[0] > 1 else 0]
    ptrs = [q.data_ptr(), k.data_ptr(), v.data_ptr(), 0 if mask is None else mask.data_ptr(), out.data_ptr()]
    dev = q.device.index if q.device.index is not None else torch.cuda.current_device()
    ws = torch.empty(_workspace_bytes(b, hkv, g, s_len, d, dev), dtype=torch.uint8, device=q.device)
    _core.gpu_decode_attention(_DTYPE_CODE[q.dtype], dims, strides, ptrs, float(scale), ws.data_ptr(), ws.numel(),
                               current_stream_handle(dev), int(variant), list(fused),
                               list(fused_strides))
    return out


@gqa_decode_attention.register_kernel("cuda")
def _(q, k, v, mask, scale, variant=0):
    _check_attention_args(q, k, v, mask)
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"gqa_decode_attention: dtype {q.dtype}, expected float16 or bfloat16 on CUDA")
    if k.device != q.device or v.device != q.device or (mask is not None and mask.device != q.device):
        raise ValueError("gqa_decode_attention: q, k, v and mask must be on one device")
    return _launch(_aligned16(q), _rows_contiguous(k), _rows_contiguous(v), mask, scale, variant)


@torch.library.custom_op("lutmm::gqa_decode_step", mutates_args=("k_cache", "v_cache"))
def gqa_decode_step(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, write_pos: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
                    heads: int) -> torch.Tensor:
    """A Llama attention layer's decode step after its fused q/k/v projection, as one kernel on CUDA: the
    rotary embedding of q and of the new key, the KV-cache write of the new key and value, and attention.
    qkv [B, (heads + 2 Hkv) D] (query heads, then keys, then values: FusedQKVLlamaAttention's qkv_proj
    output), cos / sin [B or 1, D] (the new position's rotary, transformers' rotate_half convention),
    k_cache / v_cache [B, Hkv, S, D] (written in place at write_pos, an int64 tensor of one element; a
    position outside [0, S) writes nothing), mask None or bool [B or 1, S]. Returns [B, Hkv, G, D]
    (query head h * G + j), softmax(scale q k^T) v as gqa_decode_attention."""
    raise NotImplementedError("lutmm::gqa_decode_step: no implementation for this device")


@gqa_decode_step.register_fake
def _(qkv, cos, sin, k_cache, v_cache, write_pos, mask, scale, heads):
    b, hkv, _, d = k_cache.shape
    return qkv.new_empty(b, hkv, heads // hkv, d)


def _split_step(qkv, cos, sin, k_cache, v_cache, write_pos, heads):
    """Checks the decode-step arguments; returns the q, k, v views [B, H, D] and cos / sin as [B or 1, D]."""
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"gqa_decode_step: k_cache / v_cache must be [B, Hkv, S, D] of one shape, got "
                         f"{tuple(k_cache.shape)} / {tuple(v_cache.shape)}")
    b, hkv, _, d = k_cache.shape
    if min(b, hkv, d, heads) < 1:
        raise ValueError(f"gqa_decode_step: batch, KV heads, head dim (caches {tuple(k_cache.shape)}) and query heads "
                         f"({heads}) must be >= 1")
    if heads % hkv:
        raise ValueError(f"gqa_decode_step: {heads} query heads are not a multiple of {hkv} KV heads")
    if qkv.dim() != 2 or qkv.shape != (b, (heads + 2 * hkv) * d):
        raise ValueError(f"gqa_decode_step: qkv must be [B, (heads + 2 Hkv) D] = [{b}, {(heads + 2 * hkv) * d}], "
                         f"got {tuple(qkv.shape)}")
    if cos.dim() < 1 or sin.dim() < 1 or cos.shape[-1] != d or sin.shape[-1] != d:
        raise ValueError(f"gqa_decode_step: cos / sin must be [B or 1, D = {d}], got {tuple(cos.shape)} / "
                         f"{tuple(sin.shape)}")
    cos, sin = cos.reshape(-1, d), sin.reshape(-1, d)
    if cos.shape != sin.shape or cos.shape[0] not in (1, b):
        raise ValueError(f"gqa_decode_step: cos / sin must be [B or 1, D], got {tuple(cos.shape)} / {tuple(sin.shape)}")
    if len({qkv.dtype, cos.dtype, sin.dtype, k_cache.dtype, v_cache.dtype}) != 1:
        raise ValueError("gqa_decode_step: qkv, cos, sin and the caches must have one dtype")
    if write_pos.numel() != 1 or write_pos.dtype != torch.int64:
        raise ValueError(f"gqa_decode_step: write_pos must be one int64, got {write_pos.dtype} {tuple(write_pos.shape)}")
    q = qkv[:, :heads * d].view(b, heads, d)
    k = qkv[:, heads * d:(heads + hkv) * d].view(b, hkv, d)
    v = qkv[:, (heads + hkv) * d:].view(b, hkv, d)
    return q, k, v, cos, sin


@gqa_decode_step.register_kernel("cpu")
def _(qkv, cos, sin, k_cache, v_cache, write_pos, mask, scale, heads):
    q, k, v, cos, sin = _split_step(qkv, cos, sin, k_cache, v_cache, write_pos, heads)
    b, hkv, s_len, d = k_cache.shape

    def rope(x):  # fp32, one rounding
        x = x.float()
        rot = torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1)
        return (x * cos[:, None].float() + rot * sin[:, None].float()).to(qkv.dtype)

    pos = int(write_pos.reshape(()))
    if 0 <= pos < s_len:
        k_cache[:, :, pos] = rope(k)
        v_cache[:, :, pos] = v
    return gqa_decode_attention(rope(q).view(b, hkv, heads // hkv, d), k_cache, v_cache, mask, scale)


@gqa_decode_step.register_kernel("cuda")
def _(qkv, cos, sin, k_cache, v_cache, write_pos, mask, scale, heads):
    q, k, v, cos, sin = _split_step(qkv, cos, sin, k_cache, v_cache, write_pos, heads)
    b, hkv, s_len, d = k_cache.shape
    _check_attention_args(q.view(b, hkv, heads // hkv, d), k_cache, v_cache, mask)
    if qkv.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"gqa_decode_step: dtype {qkv.dtype}, expected float16 or bfloat16 on CUDA")
    if any(t.device != qkv.device for t in (cos, sin, k_cache, v_cache, write_pos)) or (
            mask is not None and mask.device != qkv.device):
        raise ValueError("gqa_decode_step: all tensors must be on one device")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if _rows_contiguous(t) is not t:  # written in place: a copy would lose the write
            raise ValueError(f"gqa_decode_step: {name} rows must be contiguous and 16-byte aligned")
    if qkv.stride(1) != 1 or qkv.stride(0) % 8 or qkv.data_ptr() % 16:
        qkv = qkv.contiguous().clone() if qkv.data_ptr() % 16 else qkv.contiguous()
        q, k, v, _, _ = _split_step(qkv, cos, sin, k_cache, v_cache, write_pos, heads)
    cos, sin = _aligned16(cos), _aligned16(sin)
    return _launch(q.view(b, hkv, heads // hkv, d), k_cache, v_cache, mask, scale, 0,
                   [k.data_ptr(), v.data_ptr(), cos.data_ptr(), sin.data_ptr(), write_pos.data_ptr()],
                   [qkv.stride(0), qkv.stride(0), cos.stride(0) if cos.shape[0] > 1 else 0])


def _kernel_serves(query, key, mask, q_len, g, training) -> bool:
    return (q_len == 1 and not training and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)
            and key.dtype == query.dtype and query.shape[-1] in (64, 128) and g <= 8
            and (mask is None or (mask.dtype == torch.bool and mask.shape[1] == 1)))


def gqa_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       is_causal: bool | None = None, decode_kernel: bool = False,
                       **kwargs) -> tuple[torch.Tensor, None]:
    """AttentionInterface function: query [B, Hq, L, D], key / value [B, Hkv, S, D], attention_mask None or
    [B or 1, 1, L, >= S] (bool: True attends, or additive float). Returns ([B, L, Hq, D], None).
    decode_kernel: decode steps (L = 1) through gqa_decode_attention where it serves (_kernel_serves)."""
    if kwargs.get("output_attentions", False):
        raise ValueError(f"{NAME} attention does not return attention weights (use attn_implementation='eager')")
    b, hq, q_len, d = query.shape
    hkv, s_len = key.shape[1], key.shape[2]
    if hq % hkv:
        raise ValueError(f"{NAME}: {hq} query heads are not a multiple of {hkv} KV heads")
    g = hq // hkv
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    mask = attention_mask
    if mask is not None:
        mask = mask[:, :, :, :s_len]
    elif causal and q_len > 1:  # SDPA's is_causal (query i sees keys <= i), explicit: folding breaks the flag
        rows = torch.arange(q_len, device=query.device)[:, None]
        mask = (rows >= torch.arange(s_len, device=query.device)[None, :]).view(1, 1, q_len, s_len)
    q = query.reshape(b, hkv, g * q_len, d)  # head h = kv * G + j: rows j * L + i of KV head kv
    scale = d ** -0.5 if scaling is None else scaling
    if decode_kernel and _kernel_serves(query, key, mask, q_len, g, module.training):
        m2 = None if mask is None else mask[:, 0, 0, :]  # [B or 1, S]
        out = gqa_decode_attention(q, key, value, m2, float(scale))
        return out.reshape(b, hq, 1, d).transpose(1, 2).contiguous(), None
    if mask is not None and g > 1:
        mb, mh = mask.shape[0], mask.shape[1]
        if mh != 1:
            raise ValueError(f"{NAME}: per-head masks are not supported (mask of shape {tuple(mask.shape)})")
        mask = mask[:, :, None].expand(mb, 1, g, q_len, s_len).reshape(mb, 1, g * q_len, s_len)
    if q_len == 1 and not module.training:
        # Decode: scores, masked softmax and the weighted sum as plain ops, which torch.compile fuses.
        # (H100, 2026-11-26, LLaMA-3-8B decode shapes, 392 cached positions, CUDA graph: compiled 7.2 us
        # per call at batch 1 and 15.4 at batch 16, against 19.5 / 22.8 for SDPA (cuDNN) on the folded
        # heads and 13.4 / 48.8 for SDPA on repeated K/V.) The scores are rounded to the activations'
        # dtype and the softmax runs in fp32, as in transformers' eager attention.
        sc = torch.matmul(q, key.transpose(-1, -2)) * scale
        if mask is not None:
            sc = sc.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else sc + mask
        out = torch.matmul(torch.softmax(sc, dim=-1, dtype=torch.float32).to(value.dtype), value)
    else:
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask,
                                             dropout_p=dropout if module.training else 0.0, scale=scaling)
    return out.reshape(b, hq, q_len, d).transpose(1, 2).contiguous(), None


def gqa_kernel_attention(*args, **kwargs):
    """gqa_sdpa_attention with decode steps through lutmm's CUDA decode-attention kernel."""
    return gqa_sdpa_attention(*args, decode_kernel=True, **kwargs)


def register(decode_kernel: bool = False) -> str:
    """Registers the attention function (and SDPA's boolean mask for it) with transformers; returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    name = NAME_KERNEL if decode_kernel else NAME
    AttentionInterface.register(name, gqa_kernel_attention if decode_kernel else gqa_sdpa_attention)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def use_gqa_attention(model, decode_kernel: bool = True) -> None:
    """Switches a transformers model (and its submodels) to gqa_sdpa_attention; decode_kernel (default):
    decode steps through lutmm's CUDA kernel (gqa_decode_attention) where it serves, the plain ops elsewhere."""
    name = register(decode_kernel)
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise RuntimeError(f"{type(model).__name__} did not take attn_implementation={name!r}")
