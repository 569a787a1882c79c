"""A Llama decoder layer without elementwise kernels between its projections (experimental, issue 7).

    model = ...                                       # a bf16 Llama (transformers)
    lutmm.layerfold.fold_norm_weights(model)          # W_qkv <- W_qkv diag(g_in), W_gate/up <- W diag(g_post), g <- 1
    lutmm.nn.quantize_model(model, bits=4)            # quantizes the folded weights
    lutmm.nn.fuse_projections(model)                  # q/k/v and gate/up fused (gate/up gated)
    lutmm.layerfold.fold_layers(model)                # each layer: 4 lutmm matmul calls + attention, nothing else

A decoder layer computes h1 = h + o(attn(q/k/v(RMSNorm(h)))), h2 = h1 + down(silu(gate) * up(RMSNorm(h1))).
Between lutmm's kernels the compiled model runs two inductor kernels per layer (residual add + RMSNorm); a
kernel boundary in front of a lutmm kernel that does not trigger it early costs it its overlapped prologue
(docs/performance-log.md item 60). Here the norm's weight g lives in the next projection's columns (exact in
real arithmetic: RMSNorm(h) W^T = r (h diag(g)) W^T = r h (W diag(g))^T with r = rsqrt(mean(h^2) + eps)), the
projection computes r per token itself and scales its sums (GemmProblem::rms_norm), and o / down add the
residual stream in their epilogue (GemmProblem::residual): `lutmm::lut_matmul_layer`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers.models.llama import modeling_llama as _llama

from .fuse import FusedGateUpLlamaMLP, FusedQKVLlamaAttention, LUTGatedLinear
from .nn import LUTLinear


@torch.no_grad()
def fold_norm_weights(model: nn.Module) -> int:
    """Moves each LlamaDecoderLayer's RMSNorm weights into the projections that read the norm's output
    (q/k/v and gate/up; nn.Linear, before quantizing), setting the norms' weights to 1: the same model up to
    rounding. Returns the number of layers folded."""
    n = 0
    for layer in model.modules():
        if not isinstance(layer, _llama.LlamaDecoderLayer):
            continue
        pairs = ((layer.input_layernorm, [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]),
                 (layer.post_attention_layernorm, [layer.mlp.gate_proj, layer.mlp.up_proj]))
        for norm, linears in pairs:
            if any(type(m) is not nn.Linear for m in linears):
                raise ValueError("fold_norm_weights: fold before quantizing (the projections must be nn.Linear)")
            g = norm.weight.float()
            for m in linears:
                m.weight.copy_((m.weight.float() * g).to(m.weight.dtype))
            norm.weight.fill_(1.0)
        n += 1
    return n


def _norm_is_folded(norm: nn.Module) -> bool:
    return isinstance(norm, _llama.LlamaRMSNorm) and bool(torch.all(norm.weight == 1))


# Up to this many tokens per call the projection computes each token's RMSNorm factor itself (every CTA of the
# call reads all of its tokens' rows: 8 KB each at hidden size 4096); above it the norm runs first as torch
# ops (one inductor kernel when compiled, as in the unfolded layer) and the kernel gets normalized rows.
# H100, 2026-11-27, lutmm_bench, 4-bit 6144x4096: plain 7.8 us at M = 1 and 10.6 at M = 16; with the factor
# in the kernel 8.6 and 18.2 (its first version: one warp per token). docs/performance-log.md item 61.
RMS_IN_KERNEL_MAX_TOKENS = 4


def rms_norm_rows(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm without a weight (folded into the next projection), rounded once to x's dtype as transformers'
    LlamaRMSNorm does."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def layer_matmul(mod: LUTLinear, x: torch.Tensor, rms_eps: Optional[float] = None,
                 residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """mod(RMSNorm(x)) (+ residual) with the norm's weight folded into mod's weight; a LUTGatedLinear gives
    silu(gate) * up. One lutmm::lut_matmul_layer call (after rms_norm_rows above RMS_IN_KERNEL_MAX_TOKENS)."""
    if rms_eps is not None and x.numel() // x.shape[-1] > RMS_IN_KERNEL_MAX_TOKENS:
        x, rms_eps = rms_norm_rows(x, rms_eps), None
    qw = mod.quantized_weight()
    return torch.ops.lutmm.lut_matmul_layer(x, qw.packed, qw.packed_scales, qw._table_list, qw.N, qw.K, qw.bits,
                                            qw.group_size, residual, -1.0 if rms_eps is None else float(rms_eps),
                                            isinstance(mod, LUTGatedLinear))


class FoldedLlamaDecoderLayer(_llama.LlamaDecoderLayer):
    """LlamaDecoderLayer whose norms (weights folded, see fold_norm_weights) and residual adds run inside its
    projections (layer_matmul); attention as FusedQKVLlamaAttention runs it."""

    lutmm_folded = True

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                position_embeddings=None, **kwargs):
        attn, mlp = self.self_attn, self.mlp
        h1, _ = attn(hidden_states=hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                     past_key_values=past_key_values, use_cache=use_cache, position_embeddings=position_embeddings,
                     lutmm_fold=(self.input_layernorm.variance_epsilon, hidden_states), **kwargs)
        m = layer_matmul(mlp.gate_up_proj, h1, rms_eps=self.post_attention_layernorm.variance_epsilon)
        return layer_matmul(mlp.down_proj, m, residual=h1)


def _why_not(layer: nn.Module) -> Optional[str]:
    attn, mlp = layer.self_attn, layer.mlp
    if not isinstance(attn, FusedQKVLlamaAttention) or not isinstance(mlp, FusedGateUpLlamaMLP):
        return "not fused (lutmm.nn.fuse_projections first)"
    if type(attn.qkv_proj) is not LUTLinear or type(attn.o_proj) is not LUTLinear:
        return "attention projections are not LUTLinear"
    if type(mlp.gate_up_proj) is not LUTGatedLinear or type(mlp.down_proj) is not LUTLinear:
        return "the MLP is not gated LUT (SiLU, lutmm.gated)"
    if any(m.bias is not None for m in (attn.qkv_proj, attn.o_proj, mlp.down_proj)):
        return "a projection has a bias"
    if not (_norm_is_folded(layer.input_layernorm) and _norm_is_folded(layer.post_attention_layernorm)):
        return "norm weights are not folded (lutmm.layerfold.fold_norm_weights before quantizing)"
    return None


def fold_layers(model: nn.Module) -> int:
    """Turns every foldable LlamaDecoderLayer of a fused model into a FoldedLlamaDecoderLayer, in place;
    returns how many. Raises ValueError naming the first layer that can't be (and why)."""
    layers = [(n, m) for n, m in model.named_modules() if type(m) is _llama.LlamaDecoderLayer]
    for name, layer in layers:
        why = _why_not(layer)
        if why:
            raise ValueError(f"{name}: {why}")
    for _, layer in layers:
        layer.__class__ = FoldedLlamaDecoderLayer
    return len(layers)
