"""torch.nn integration: `LUTLinear` (a drop-in nn.Linear replacement) and `quantize_model`.

    model = lutmm.nn.quantize_model(model, bits=4, group_size=64, table="nf")   # every nn.Linear but lm_head
    y = model(input_ids)                                                        # lutmm kernels on the GPU

A LUTLinear keeps the packed weight as buffers, so `state_dict()` / `load_state_dict()` and safetensors work:
    packed         uint8    [packed_bytes(N, K, bits, g)]
    packed_scales  float16  [packed_scale_count(N, K, bits, g)]   (stays float16 under model.to(dtype))
    table          float32  [2^bits]                               (stays float32 on the CPU, see _apply)
    bias           optional [N], follows the model's dtype and device
"""
from __future__ import annotations

import operator
import warnings
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from . import _core
from ._api import FORMAT_VERSION, QuantizedWeight, _check_qw, dequantize, matmul, quantize

_LUT_BUFFERS = ("packed", "packed_scales", "table")


def _resolve_group_size(group_size: Optional[int], in_features: int) -> int:
    """None or -1 means one group per row (g = K)."""
    return int(in_features) if group_size in (None, -1) else int(group_size)


def buffer_specs(out_features: int, in_features: int, bits: int, group_size: int) -> dict:
    """Expected (dtype, shape) of a LUTLinear's quantized buffers; raises ValueError on an invalid shape."""
    N, K, g = int(out_features), int(in_features), _resolve_group_size(group_size, in_features)
    return {
        "packed": (torch.uint8, (_core.packed_bytes(N, K, bits, g),)),
        "packed_scales": (torch.float16, (_core.packed_scale_count(N, K, bits, g),)),
        "table": (torch.float32, (1 << bits,)),
    }


class LUTLinear(nn.Module):
    """y = x W_hat^T + b with a LUT-quantized W_hat (see `lutmm.quantize`); forward is `lutmm.matmul`.

    Build one with `LUTLinear.from_linear(linear, bits, group_size, table)` or `LUTLinear.from_quantized(qw, bias)`;
    the plain constructor makes an empty (zero) module of the right shapes, to be filled by `load_state_dict`.
    """

    def __init__(self, in_features: int, out_features: int, bits: int = 4, group_size: Optional[int] = 64,
                 bias: bool = False, table_kind: str = "nf", device=None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        if bits not in (2, 3, 4):
            raise ValueError(f"bits: got {bits!r}, expected 2, 3 or 4")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.bits = int(bits)
        self.group_size = _resolve_group_size(group_size, in_features)
        self.table_kind = str(table_kind)
        specs = buffer_specs(out_features, in_features, bits, self.group_size)
        for name, (dt, shape) in specs.items():
            dev = "cpu" if name == "table" and torch.device(device or "cpu").type != "meta" else device
            self.register_buffer(name, torch.zeros(shape, dtype=dt, device=dev))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype or torch.float32, device=device))
        else:
            self.register_buffer("bias", None)
        self._qw: Optional[QuantizedWeight] = None  # cached view of the buffers, rebuilt when they change
        self._qw_table = None                       # the `table` tensor _qw was built from

    # ---- construction ------------------------------------------------------------------------------
    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None) -> "LUTLinear":
        """Wraps a QuantizedWeight (its tensors are used as they are, on their device)."""
        _check_qw(qw)
        N, K = qw.shape
        if bias is not None and tuple(bias.shape) != (N,):
            raise ValueError(f"bias: expected shape ({N},), got {tuple(bias.shape)}")
        m = cls(K, N, qw.bits, qw.group_size, bias=False, table_kind=qw.table_kind, device="meta")
        m.packed, m.packed_scales, m.table = qw.packed, qw.packed_scales, qw.table
        m.bias = None if bias is None else bias.detach().clone()
        return m

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: Optional[int] = 64, table="nf",
                    device=None, quant_device=None, **quant_kwargs) -> "LUTLinear":
        """Quantizes `linear.weight` and returns a LUTLinear on `device` (default: the linear's device).
        quant_device: where the quantizer runs (default: the weight's device; "cuda" uses the GPU).
        `quant_kwargs` go to `lutmm.quantize` (search_scale, importance, kmeans_iterations)."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"linear: expected a torch.nn.Linear, got {type(linear).__name__}")
        qw = quantize(linear.weight, bits=bits, group_size=group_size, table=table, device=quant_device,
                      **quant_kwargs)
        dev = linear.weight.device if device is None else torch.device(device)
        bias = None if linear.bias is None else linear.bias.detach().to(dev)
        return cls.from_quantized(qw.to(dev), bias)

    # ---- views ---------------------------------------------------------------------------------------
    def quantized_weight(self) -> QuantizedWeight:
        """The QuantizedWeight view of the buffers (cached; rebuilt when a buffer was replaced or reloaded)."""
        qw = self._qw
        if (qw is None or qw.packed is not self.packed or qw.packed_scales is not self.packed_scales
                or self._qw_table is not self.table):
            qw = self._rebuild()
        return qw

    def _rebuild(self) -> QuantizedWeight:
        if any(getattr(self, n).is_meta for n in _LUT_BUFFERS):
            raise RuntimeError("LUTLinear: the quantized buffers were never loaded (still on the meta device)")
        if self.table.device.type != "cpu" or self.table.dtype != torch.float32:
            self.table = self.table.to("cpu", torch.float32)  # once, e.g. after loading with a device_map
        self._qw = QuantizedWeight(self.packed, self.packed_scales, self.table, self.bits, self.group_size,
                                   (self.out_features, self.in_features), self.table_kind)
        self._qw_table = self.table
        return self._qw

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense N x K weight W_hat."""
        return dequantize(self.quantized_weight(), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return matmul(x, self.quantized_weight(), self.bias)

    # ---- keep the format dtypes / the CPU table; invalidate the cached view ----------------------------
    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)  # copies in place: the cached table list is stale
        self._qw = None

    def _apply(self, fn, recurse=True):
        """model.to(device / dtype) moves the buffers, but the scales stay float16 (a bf16 round trip would
        lose bits) and the table stays a float32 CPU tensor (the kernels take it by value)."""
        scales, table = self.packed_scales, self.table
        super()._apply(fn, recurse)
        if self.packed_scales.dtype != torch.float16:
            self.packed_scales = (self.packed_scales.to(torch.float16) if scales.is_meta
                                  else scales.to(self.packed_scales.device))
        if not table.is_meta:
            self.table = table
        elif not self.table.is_meta:
            self.table = self.table.to("cpu", torch.float32)
        self._qw = None
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, table={self.table_kind}, bias={self.bias is not None}")


# ---- whole models ----------------------------------------------------------------------------------------
def _matches(name: str, skip: Iterable[str]) -> bool:
    return any(s and s in name for s in skip)


def _tied_weight_ids(model: nn.Module) -> set:
    """ids of parameters that appear under more than one name (tied embeddings / lm_head)."""
    seen, tied = {}, set()
    for _, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(id(p))
        seen[id(p)] = True
    return tied


MODEL_GROUP_SIZES = tuple(_core.group_sizes())  # the format's (C++ lutmm::kGroupSizes); and None / -1: g = K


def check_model_group_size(group_size) -> None:
    """A whole model's group size: one of MODEL_GROUP_SIZES, or None / -1 (one group per row). Raises ValueError
    otherwise (a value no layer could take would leave the model unquantized with only warnings)."""
    try:
        g = None if group_size is None or isinstance(group_size, bool) else operator.index(group_size)
    except TypeError:
        g = None
    if group_size is None or g == -1:
        return
    if g not in MODEL_GROUP_SIZES:
        raise ValueError(f"group_size: got {group_size!r}, expected {', '.join(map(str, MODEL_GROUP_SIZES))}, or "
                         "None / -1 for one group per row")


def quantizable_linears(model: nn.Module, group_size: Optional[int] = 64, skip: Sequence[str] = ("lm_head",),
                        warn: bool = True):
    """(name, module) of the nn.Linear layers quantize_model converts: not matching `skip` (substring of
    the qualified name), in_features divisible by 32 and by the group size, weight not tied to another.
    (A checkpoint's group size may also be K itself: quantize_model checks its argument with
    check_model_group_size.)"""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    tied = _tied_weight_ids(model)
    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or _matches(name, skip):
            continue
        K = mod.in_features
        g = _resolve_group_size(group_size, K)
        if K % 32 or K % g:
            if warn:
                warnings.warn(f"lutmm: not quantizing {name}: in_features = {K} is not a multiple of 32 and of "
                              f"group_size = {g}", stacklevel=3)
            continue
        if id(mod.weight) in tied:
            if warn:
                warnings.warn(f"lutmm: not quantizing {name}: its weight is tied to another parameter "
                              "(add it to skip to silence this)", stacklevel=3)
            continue
        out.append((name, mod))
    return out


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize_model(model: nn.Module, bits: int = 4, group_size: Optional[int] = 64, table="nf",
                   skip: Sequence[str] = ("lm_head",), search_scale: bool = True, device=None,
                   progress: bool = True, stats: Optional[dict] = None, quant_device=None) -> nn.Module:
    """Replaces the nn.Linear layers of `model` (any HF causal LM) by LUTLinear, in place, one layer at a time
    (quantize, swap in, drop the original), so the extra memory is about one layer.

    skip: substrings of qualified module names to leave alone (default: the LM head).  device: where the new
    modules go (default: each original layer's device).  quant_device: where the quantizer runs (default:
    each weight's device — a model on the GPU is quantized on the GPU; "cuda" moves one layer at a time).
    stats: optional dict filled with layers / bytes_before / bytes_after / skipped.
    Records model.config.quantization_config = {"quant_method": "lutmm", "bits", "group_size", "table",
    "format_version", "skip", "modules"} (a plain dict) when the model has a config.
    """
    from tqdm.auto import tqdm

    if bits not in (2, 3, 4):
        raise ValueError(f"bits: got {bits!r}, expected 2, 3 or 4")
    check_model_group_size(group_size)
    skip = [skip] if isinstance(skip, str) else list(skip or [])
    targets = quantizable_linears(model, group_size, skip)
    all_linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    done, before, after = [], 0, 0
    kind = table if isinstance(table, str) else "custom"
    for name, lin in tqdm(targets, desc=f"lutmm {bits}-bit g{group_size} {kind}", disable=not progress,
                          unit="layer"):
        new = LUTLinear.from_linear(lin, bits, group_size, table, device=device, quant_device=quant_device,
                                    search_scale=search_scale)
        before += lin.weight.numel() * lin.weight.element_size()
        after += new.quantized_weight().nbytes()
        _set_submodule(model, name, new)
        del lin
        done.append(name)
    if stats is not None:
        stats.update(layers=len(done), bytes_before=before, bytes_after=after,
                     skipped=[n for n in all_linear if n not in set(done)])
    config = getattr(model, "config", None)
    if config is not None:
        config.quantization_config = {
            "quant_method": "lutmm", "bits": int(bits), "group_size": -1 if group_size is None else int(group_size),
            "table": kind, "format_version": FORMAT_VERSION, "skip": skip, "modules": done,
        }
    return model


def lut_modules(model: nn.Module):
    """(name, LUTLinear) pairs of a model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LUTLinear)]


def replace_with_empty_lut_linear(model: nn.Module, names: Sequence[str], bits: int, group_size: Optional[int],
                                  table_kind: str = "nf", device=None) -> None:
    """Swaps the nn.Linear modules `names` for empty LUTLinear modules of the same shapes (to load a checkpoint
    into). Raises ValueError naming a module that is missing or not an nn.Linear."""
    for name in names:
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"quantization_config.modules: {name!r} is not a module of "
                             f"{type(model).__name__}") from None
        if not isinstance(lin, nn.Linear):
            raise ValueError(f"quantization_config.modules: {name!r} is a {type(lin).__name__}, expected an nn.Linear")
        dev = lin.weight.device if device is None else device
        try:
            new = LUTLinear(lin.in_features, lin.out_features, bits, group_size, bias=lin.bias is not None,
                            table_kind=table_kind, device=dev, dtype=lin.weight.dtype)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        _set_submodule(model, name, new)


def fuse_projections(model: nn.Module, warn: bool = True, gated: bool = True):
    """Fuses q/k/v and gate/up of the Llama attention / MLP modules of `model` into one linear each, in place
    (7 linear calls per decoder layer -> 4; with `gated`, a SiLU MLP's gate/up kernel also writes
    silu(gate) * up). Returns a `lutmm.fuse.FusionReport` (counts, and what was left unfused and why).
    Apply after loading; see lutmm.fuse for the rules."""
    from .fuse import fuse_projections as _fuse
    return _fuse(model, warn=warn, gated=gated)
