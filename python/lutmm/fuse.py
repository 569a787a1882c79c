"""Fused projections for decode speed (issue 7): q/k/v as one linear, gate/up as one, in Llama models.

    model = lutmm.nn.quantize_model(model, bits=4)        # or load_quantized(...) / from_pretrained(...)
    report = lutmm.nn.fuse_projections(model)              # 7 linears per layer -> 4; returns a FusionReport

At decode the per-call fixed cost of the small k/v projections dominates; one [Nq+Nk+Nv, K] matmul and one
[2*I, K] matmul replace five calls and give the kernel bigger shapes. The fused weight of LUTLinear layers is
`lutmm.concat_rows` of theirs (a byte concatenation of the packed layout: exact, same codes, scales and
table), so the fused model computes the same products; nn.Linear layers (a bf16 baseline) are fused by
concatenating their weights. In a SiLU MLP of LUTLinear layers (without bias), gate and up are instead interleaved by
8 rows (`lutmm.gated.interleave_gate_up`: whole pair codes moved, exact) into a `LUTGatedLinear`, whose
kernel writes silu(gate) * up from its fp32 sums: no separate SiLU-and-product kernel, half the output
(`gated=False` keeps the concatenation).

What gets fused: every transformers `LlamaAttention` / `LlamaMLP` (exactly those classes) whose projections
are all LUTLinear with the same bits, group size and value table (NF / int tables always match; per-layer
k-means tables do not, so such layers are left unfused), or all nn.Linear of one dtype and device. Anything
else is left unchanged and listed in the report's `skipped` (and warned about). Fusion changes the module
tree (`self_attn.qkv_proj`, `mlp.gate_up_proj`): apply it after loading a checkpoint, and save checkpoints
from the unfused model (`lutmm.checkpoint.save_quantized` refuses a fused one). A fused model's own
state_dict loads into a model fused the same way.

The fused forwards contain no data-dependent control flow and keep no state between calls: they work under
torch.compile(fullgraph=True) and CUDA graph capture like the unfused model.
"""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn
from transformers.cache_utils import StaticLayer
from transformers.models.llama import modeling_llama as _llama

from ._api import concat_rows
from .attention import NAME_KERNEL, gqa_decode_step
from .gated import _interleave_problem, gated_matmul, interleave_gate_up
from .nn import LUTLinear

QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")
# LlamaAttention.forward's parameters in the transformers versions whose forward FusedQKVLlamaAttention mirrors.
_ATTENTION_PARAMS = ["self", "hidden_states", "position_embeddings", "attention_mask", "past_key_values", "kwargs"]
_STOCK_ROTARY = _llama.apply_rotary_pos_emb  # the fused decode step implements this one (rotate_half)


# ---- one linear from several ---------------------------------------------------------------------------
def _concat_bias(mods: Sequence[nn.Module]):
    biases = [m.bias for m in mods]
    if all(b is None for b in biases):
        return None
    if any(b is None for b in biases):
        raise ValueError("some projections have a bias and some do not")
    return torch.cat([b.detach() for b in biases])


def _concat_lut(mods: Sequence[LUTLinear]) -> LUTLinear:
    qw = concat_rows([m.quantized_weight() for m in mods])
    return LUTLinear.from_quantized(qw, _concat_bias(mods))


def _concat_dense(mods: Sequence[nn.Linear]) -> nn.Linear:
    first = mods[0].weight
    for m in mods:
        if m.in_features != mods[0].in_features or m.weight.dtype != first.dtype or m.weight.device != first.device:
            raise ValueError("the nn.Linear projections differ in in_features, dtype or device")
    weight = torch.cat([m.weight.detach() for m in mods])
    bias = _concat_bias(mods)
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=first.requires_grad)
    if bias is not None:
        fused.bias = nn.Parameter(bias, requires_grad=mods[0].bias.requires_grad)
    return fused


def _hooks_problem(mods: Sequence[nn.Module]) -> Optional[str]:
    """Why `mods` can't be fused because of hooks (the reason), or None."""
    for m in mods:
        if m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook"):
            return "a projection has forward hooks (e.g. accelerate offload), which fusion would drop"
    return None


def _check_no_hooks(mods: Sequence[nn.Module]) -> None:
    problem = _hooks_problem(mods)
    if problem is not None:
        raise ValueError(problem)


def concat_linears(mods: Sequence[nn.Module]) -> nn.Module:
    """One linear whose output is the concatenation of the outputs of `mods` (all LUTLinear, or all nn.Linear).
    Raises ValueError saying why they can't be fused (mixed types, formats or tables, hooks attached)."""
    kinds = {type(m) for m in mods}
    _check_no_hooks(mods)
    if kinds == {LUTLinear}:
        return _concat_lut(mods)
    if kinds == {nn.Linear}:
        return _concat_dense(mods)
    raise ValueError(f"the projections are {sorted(k.__name__ for k in kinds)}: expected all LUTLinear or all "
                     "nn.Linear")


# ---- fused modules ---------------------------------------------------------------------------------------
class FusedQKVLlamaAttention(_llama.LlamaAttention):
    """LlamaAttention whose q/k/v come from one linear `qkv_proj` (out_features Nq + Nk + Nv), split after.
    After the projections, forward is transformers' LlamaAttention.forward line for line (rotary, cache
    update, attention interface), so everything but the number of matmuls is unchanged; except that a
    decode step with lutmm's attention kernel on a static cache (_fused_step_inputs) runs the rotary, the
    cache update and attention as one kernel (lutmm.attention.gqa_decode_step)."""

    lutmm_fused = True
    qkv_sizes: Tuple[int, int, int]

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                lutmm_fold=None, **kwargs):
        # lutmm_fold = (eps, residual): a FoldedLlamaDecoderLayer's call (lutmm.layerfold): hidden_states is
        # the raw residual stream, q/k/v apply the RMSNorm themselves and o adds the residual
        if lutmm_fold is None:
            qkv_proj, o_proj = self.qkv_proj, self.o_proj
        else:
            from .layerfold import layer_matmul
            eps, residual = lutmm_fold
            qkv_proj = lambda t: layer_matmul(self.qkv_proj, t, rms_eps=eps)  # noqa: E731
            o_proj = lambda t: layer_matmul(self.o_proj, t, residual=residual)  # noqa: E731
        step = _fused_step_inputs(self, hidden_states, position_embeddings, attention_mask, past_key_values, kwargs)
        if step is not None:  # a decode step through lutmm's kernel: rotary, cache write, attention in one
            layer, mask = step
            b = hidden_states.shape[0]
            cos, sin = position_embeddings
            out = gqa_decode_step(qkv_proj(hidden_states).view(b, -1), cos, sin, layer.keys, layer.values,
                                  layer.cumulative_length, mask, float(self.scaling),
                                  self.config.num_attention_heads)
            layer.cumulative_length.add_(1)  # as StaticLayer.update
            return o_proj(out.view(b, 1, -1)), None
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        q, k, v = qkv_proj(hidden_states).split(self.qkv_sizes, dim=-1)
        query_states = q.view(hidden_shape).transpose(1, 2)
        key_states = k.view(hidden_shape).transpose(1, 2)
        value_states = v.view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = _llama.apply_rotary_pos_emb(query_states, key_states, cos, sin)

        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)

        attention_interface = _llama.ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, _llama.eager_attention_forward)
        attn_output, attn_weights = attention_interface(
            self, query_states, key_states, value_states, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling, **kwargs)

        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        attn_output = o_proj(attn_output)
        return attn_output, attn_weights


def _fused_step_inputs(attn, hidden_states, position_embeddings, attention_mask, past_key_values, kwargs):
    """(cache layer, mask [B or 1, S] or None) when this call can run as lutmm::gqa_decode_step: one new token
    per sequence, inference, lutmm's decode-attention kernel selected (use_gqa_attention), a transformers
    static cache layer already holding its tensors, fp16 / bf16 on CUDA, head dim 64 or 128, at most 8 query
    heads per KV head, a boolean decode mask, cos / sin of the activations' dtype with one row per sequence
    or one for all; else None (the line-by-line forward below)."""
    if (hidden_states.dim() != 3 or hidden_states.shape[1] != 1 or attn.training or not hidden_states.is_cuda
            or hidden_states.dtype not in (torch.float16, torch.bfloat16) or past_key_values is None
            or attn.config._attn_implementation != NAME_KERNEL or kwargs.get("output_attentions", False)
            or attn.head_dim not in (64, 128) or attn.num_key_value_groups > 8
            or _llama.apply_rotary_pos_emb is not _STOCK_ROTARY):
        return None
    layers = getattr(past_key_values, "layers", None)
    if layers is None or attn.layer_idx >= len(layers):
        return None
    layer = layers[attn.layer_idx]
    if (type(layer) is not StaticLayer or not layer.is_initialized or layer.keys.dtype != hidden_states.dtype
            or layer.keys.shape[1] * attn.num_key_value_groups != attn.config.num_attention_heads):
        return None
    cos = position_embeddings[0] if position_embeddings is not None else None
    if (cos is None or cos.dtype != hidden_states.dtype or cos.shape[-1] != attn.head_dim
            or cos.numel() not in (attn.head_dim, hidden_states.shape[0] * attn.head_dim)):
        return None
    mask = attention_mask
    if mask is not None:
        if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1:
            return None
        mask = mask[:, 0, 0, :layer.keys.shape[2]]
    return layer, mask


class FusedGateUpLlamaMLP(_llama.LlamaMLP):
    """LlamaMLP whose gate and up projections are one linear `gate_up_proj` (out_features 2 * intermediate):
    down(act(gate) * up) as in LlamaMLP.forward. With LUT weights and SiLU, `gate_up_proj` is a
    LUTGatedLinear (gate and up rows interleaved by 8, lutmm.gated) that returns silu(gate) * up itself."""

    lutmm_fused = True
    gate_up_sizes: Tuple[int, int]

    def forward(self, x):
        if isinstance(self.gate_up_proj, LUTGatedLinear):
            return self.down_proj(self.gate_up_proj(x))
        gate, up = self.gate_up_proj(x).split(self.gate_up_sizes, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


class LUTGatedLinear(LUTLinear):
    """silu(x gate^T) * (x up^T) with gate and up as one LUT weight interleaved by 8 (lutmm.gated): out_features
    is 2 I (the weight's rows), the output has I columns. One kernel writes the product (Epilogue::kSiluMul)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gated_matmul(x, self.quantized_weight())

    def extra_repr(self) -> str:
        return super().extra_repr() + ", silu(gate) * up (rows interleaved by 8)"


def _why_not_gated(mlp: nn.Module, mods: Sequence[nn.Module]) -> Optional[str]:
    """Why gate_proj and up_proj (`mods`) of `mlp` can't be one LUTGatedLinear exactly (the reason), or None
    when they can: not LUT, a bias, an activation other than SiLU, hooks, mismatched formats or tables, I
    not a multiple of 8 (the last three: lutmm.gated's interleave check)."""
    gate, up = mods
    if type(gate) is not LUTLinear or type(up) is not LUTLinear:
        return "not LUTLinear"
    if gate.bias is not None or up.bias is not None:
        return "a bias"
    act = getattr(mlp.config, "hidden_act", None)
    if act not in ("silu", "swish"):
        return f"activation {act!r}, not SiLU"
    return _hooks_problem(mods) or _interleave_problem(gate.quantized_weight(), up.quantized_weight())


def _gated_lut(mlp: nn.Module, mods: Sequence[nn.Module]) -> LUTGatedLinear:
    """gate_proj and up_proj (`mods`) of a SiLU MLP as one LUTGatedLinear; ValueError with _why_not_gated's
    reason where that can't be done exactly."""
    problem = _why_not_gated(mlp, mods)
    if problem is not None:
        raise ValueError(problem)
    gate, up = mods
    return LUTGatedLinear.from_quantized(interleave_gate_up(gate.quantized_weight(), up.quantized_weight()))


def _fuse_mlp(mlp: nn.Module, gated: bool) -> None:
    """gate/up of `mlp` as one LUTGatedLinear where possible (and `gated`: _why_not_gated finds no reason),
    else as one concatenated linear. Raises ValueError (from the concatenation), leaving `mlp` unchanged."""
    if gated and _why_not_gated(mlp, [getattr(mlp, n) for n in GATE_UP]) is None:
        _fuse_into(mlp, GATE_UP, FusedGateUpLlamaMLP, "gate_up_proj", "gate_up_sizes",
                   make=lambda mods: _gated_lut(mlp, mods))
    else:
        _fuse_into(mlp, GATE_UP, FusedGateUpLlamaMLP, "gate_up_proj", "gate_up_sizes")


def _fuse_into(module: nn.Module, names: Sequence[str], fused_cls, fused_name: str, sizes_name: str,
               make=concat_linears) -> None:
    """Replaces the linears `names` of `module` by one linear `fused_name` = make(those linears) and turns
    `module` into `fused_cls` (a subclass of its class that only changes forward). Raises ValueError, leaving
    `module` unchanged."""
    mods = [getattr(module, n) for n in names]
    fused = make(mods)
    sizes = tuple(int(m.out_features) for m in mods)
    for n in names:
        delattr(module, n)
    module.__class__ = fused_cls
    setattr(module, fused_name, fused)
    setattr(module, sizes_name, sizes)


def _attention_forward_matches() -> bool:
    params = list(inspect.signature(_llama.LlamaAttention.forward).parameters)
    return params == _ATTENTION_PARAMS


@dataclass
class FusionReport:
    """What fuse_projections did: counts of fused modules, and (qualified name, reason) of those left alone."""
    attention: int = 0
    mlp: int = 0
    gated: int = 0  # fused MLPs whose gate_up_proj is a LUTGatedLinear (silu(gate) * up in the kernel)
    skipped: List[Tuple[str, str]] = field(default_factory=list)

    @property
    def linear_calls_saved(self) -> int:
        """Linear calls removed per forward: 2 per fused attention (3 -> 1), 1 per fused MLP (2 -> 1)."""
        return 2 * self.attention + self.mlp


def fuse_projections(model: nn.Module, warn: bool = True, gated: bool = True) -> FusionReport:
    """Fuses q/k/v into `self_attn.qkv_proj` and gate/up into `mlp.gate_up_proj` in every LlamaAttention /
    LlamaMLP of `model`, in place, where the projections can be fused exactly (see the module docstring;
    gated: SiLU MLPs of LUT weights get the gated epilogue, report.gated counts them).
    Returns a FusionReport; modules left unfused are listed there with the reason, and warned about."""
    report = FusionReport()
    attention_ok = _attention_forward_matches()
    for name, module in list(model.named_modules()):
        if type(module) is _llama.LlamaAttention:
            if not attention_ok:
                report.skipped.append((name, "this transformers version's LlamaAttention.forward signature "
                                             "differs from the one the fused forward mirrors"))
                continue
            try:
                _fuse_into(module, QKV, FusedQKVLlamaAttention, "qkv_proj", "qkv_sizes")
                report.attention += 1
            except ValueError as e:
                report.skipped.append((name, str(e)))
        elif type(module) is _llama.LlamaMLP:
            try:
                _fuse_mlp(module, gated)
                report.mlp += 1
                report.gated += isinstance(module.gate_up_proj, LUTGatedLinear)
            except ValueError as e:
                report.skipped.append((name, str(e)))
    if warn and report.skipped:
        listed = "; ".join(f"{n}: {why}" for n, why in report.skipped[:3])
        more = f" (and {len(report.skipped) - 3} more)" if len(report.skipped) > 3 else ""
        warnings.warn(f"lutmm: left {len(report.skipped)} modules unfused: {listed}{more}", stacklevel=2)
    return report


def is_fused(model: nn.Module) -> bool:
    """True when fuse_projections fused any module of `model`."""
    return any(getattr(m, "lutmm_fused", False) for m in model.modules())
