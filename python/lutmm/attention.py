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
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "lutmm_gqa"


def gqa_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """AttentionInterface function: query [B, Hq, L, D], key / value [B, Hkv, S, D], attention_mask None or
    [B or 1, 1, L, >= S] (bool: True attends, or additive float). Returns ([B, L, Hq, D], None)."""
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
        sc = torch.matmul(q, key.transpose(-1, -2)) * (d ** -0.5 if scaling is None else scaling)
        if mask is not None:
            sc = sc.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else sc + mask
        out = torch.matmul(torch.softmax(sc, dim=-1, dtype=torch.float32).to(value.dtype), value)
    else:
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask,
                                             dropout_p=dropout if module.training else 0.0, scale=scaling)
    return out.reshape(b, hq, q_len, d).transpose(1, 2).contiguous(), None


def register() -> str:
    """Registers the attention function (and SDPA's boolean mask for it) with transformers; returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(NAME, gqa_sdpa_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


def use_gqa_attention(model) -> None:
    """Switches a transformers model (and its submodels) to gqa_sdpa_attention."""
    model.set_attn_implementation(register())
    if model.config._attn_implementation != NAME:
        raise RuntimeError(f"{type(model).__name__} did not take attn_implementation={NAME!r}")
