"""Calibrated quantization of whole models: weighted k-means tables, learned scales, GPTQ (docs/quality.md).

    model = lutmm.quality.quantize_model_calibrated(model, tokenizer_dir, bits=4, group_size=64,
                                                    method="gptq+kmeans", calib="wikitext-2/valid.txt")

Methods ("+"-joined parts; every one writes the same lutmm format):
    rtn        no calibration: `lutmm.nn.quantize_model` (table nf / int / kmeans, searched or absmax scales)
    kmeans     per-layer k-means table weighted by the calibration statistics E[x_k^2] (codes: nearest, scales:
               the scale search weighted by E[x_k^2])
    learned    fp16 scales trained on the calibration activations (`lutmm.gptq.learn_scales`)
    gptq       Hessian-aware error compensation onto the table (`lutmm.gptq.gptq_quantize`)
    refit      with gptq: alternate least-squares refits of the table and the scales with GPTQ re-picking the
               codes (`lutmm.refit.gptq_refit`); the table becomes a per-layer learned one
    select     with gptq: per layer, GPTQ onto each candidate LUT (NF, the weighted k-means table; with refit also
               the refits of the better one) and keep the least damped output error (`gptq_select`); the uniform
               int grid is never a candidate
    e.g. "gptq+kmeans": GPTQ onto the weighted k-means table. Without "kmeans" the table is `table` (nf / int).

Calibration is sequential: the decoder layers are processed in order on inputs that went through the already
quantized earlier layers, and inside a layer the linears are quantized in execution order (q/k/v, then o, then
gate/up, then down), each on inputs that went through the already quantized linears before it.
"""
from __future__ import annotations

import random
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import gptq as G
from ._api import FORMAT_VERSION, make_table, pack, quantize
from .nn import LUTLinear, _set_submodule, check_model_group_size, lut_modules, quantizable_linears, \
    quantize_model
from .refit import damped, gptq_refit

METHODS = ("rtn", "kmeans", "learned", "gptq", "gptq+kmeans", "learned+kmeans", "gptq+learned",
           "gptq+learned+kmeans", "gptq+refit", "gptq+kmeans+refit", "gptq+select", "gptq+select+refit")
DEFAULT_METHOD = "gptq+kmeans"
DEFAULT_CALIB_TOKENS = 32768
DEFAULT_DAMP = 0.01  # GPTQ damping, x mean(diag H): best with in-domain calibration text (docs/quality.md)


class _Stop(Exception):
    pass


# ---- calibration data --------------------------------------------------------------------------------------
def calibration_ids(tokenizer, text_path, n_tokens: int = DEFAULT_CALIB_TOKENS, seqlen: int = 512,
                    seed: int = 0) -> torch.Tensor:
    """ceil(n_tokens / seqlen) windows of `seqlen` tokens at random (seeded) offsets of the text: int64
    [n, seqlen]. Use text that does not overlap the evaluation text (e.g. WikiText-2 valid)."""
    from .evaluate import encode_text, read_text_file

    if int(n_tokens) < 1:
        raise ValueError(f"n_tokens: got {n_tokens}, expected >= 1 calibration tokens")
    ids = encode_text(tokenizer, read_text_file(text_path, "calib"))
    n = -(-int(n_tokens) // seqlen)
    if ids.numel() < seqlen + 1:
        raise ValueError(f"calib: {text_path} has {ids.numel()} tokens, expected more than {seqlen}")
    rng = random.Random(seed)
    starts = [rng.randrange(0, ids.numel() - seqlen) for _ in range(n)]
    return torch.stack([ids[s:s + seqlen] for s in starts])


def _decoder_layers(model: nn.Module):
    """(qualified name, ModuleList) of the model's decoder blocks (Llama-like: model.model.layers)."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and name.split(".")[-1] in ("layers", "h", "blocks"):
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        raise ValueError(f"{type(model).__name__}: no decoder layer list found (expected e.g. model.layers)")
    return best


def _to_float(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device, torch.float32) if obj.is_floating_point() else obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_float(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_float(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def _capture_inputs(model, layer0, ids, device, batch):
    """Hidden states (fp32) and keyword arguments that `layer0` receives, one entry per batch of windows."""
    hs, kws = [], []

    def hook(mod, args, kwargs):
        h = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_value", "past_key_values")}
        hs.append(h.to(device, torch.float32))
        kws.append(_to_float(kw, device))
        raise _Stop

    handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(0, ids.shape[0], batch):
            try:
                model(input_ids=ids[i:i + batch].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return hs, kws


def _run(layer, h, kw):
    out = layer(h, **kw)
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def _input_groups(layer, linears: dict, h, kw):
    """Lists of linear names in execution order, those fed the same input tensor grouped together.

    The hooks keep every input alive until the grouping is done: comparing only addresses, an input freed
    after its linear (o_proj's) could hand its memory to the next one (the MLP's normed input), which then
    joined o_proj's group and was quantized with o_proj's Hessian, depending on the allocator's state
    (the CI quality gate: +2.61% in the full suite, +1.66% alone, 2026-11-27)."""
    calls, handles = [], []
    for name, mod in linears.items():
        handles.append(mod.register_forward_hook(lambda m, i, o, n=name: calls.append((n, i[0]))))
    try:
        _run(layer, h, kw)
    finally:
        for hd in handles:
            hd.remove()
    groups, seen, last = [], set(), None
    for n, x in calls:
        if n in seen:
            continue
        seen.add(n)
        if groups and x.data_ptr() == last.data_ptr() and x.shape == last.shape:
            groups[-1].append(n)
        else:
            groups.append([n])
        last = x
    return groups + [[n] for n in linears if n not in seen]


@torch.no_grad()
def _hessian(layer, mod, hs, kws):
    """H = sum over calibration tokens of x x^T for the input x of `mod` (fp32, K x K), and the token count.
    The layer forward stops right after `mod` has seen its input."""
    K = mod.in_features
    H = torch.zeros(K, K, dtype=torch.float32, device=hs[0].device)
    count = [0]

    def hook(m, inp):
        x = inp[0].reshape(-1, K).float()
        H.addmm_(x.T, x)
        count[0] += x.shape[0]
        raise _Stop

    handle = mod.register_forward_pre_hook(hook)
    try:
        for h, kw in zip(hs, kws):
            try:
                _run(layer, h, kw)
            except _Stop:
                pass
    finally:
        handle.remove()
    return H, count[0]


def parse_method(method: str) -> set:
    parts = set(method.split("+"))
    bad = parts - {"rtn", "kmeans", "learned", "gptq", "refit", "select"}
    if bad or not parts or ("rtn" in parts and len(parts) > 1) or ("refit" in parts and (
            "gptq" not in parts or "learned" in parts)) or ("select" in parts and (
            "gptq" not in parts or parts & {"kmeans", "learned"})):
        raise ValueError(f"method: got {method!r}, expected one of {', '.join(METHODS)}")
    return parts


def quantize_weight(W: torch.Tensor, H: torch.Tensor, n: int, bits: int, group_size: int, method: str = "gptq",
                    table="nf", learn_steps: int = 200, kmeans_iterations: int = 8, percdamp: float = DEFAULT_DAMP,
                    act_order: bool = False, kmeans_inits=("nf",), refit_rounds: int = 2):
    """One layer's calibrated QuantizedWeight: W is N x K, H = sum x x^T over n calibration inputs."""
    parts = parse_method(method) - {"rtn"}
    if isinstance(table, str) and table == "kmeans":
        parts.add("kmeans")
    imp = (torch.diag(H) / max(n, 1)).float().cpu()
    if "select" in parts:
        if not (isinstance(table, str) and table == "nf"):
            raise ValueError(f"table: got {table!r} for method {method!r}, which picks its own LUT (NF or k-means)")
        return gptq_select(W, H, bits, group_size, imp, percdamp, act_order, kmeans_iterations, kmeans_inits,
                           refit_rounds if "refit" in parts else 0)[0]
    if "kmeans" in parts:
        qk = G.weighted_kmeans(W, bits, group_size, imp, kmeans_iterations, kmeans_inits)
        tbl, kind = qk.table, "kmeans"
        codes, scales = qk.codes(), qk.scales()
    else:
        tbl, kind = make_table(table, bits), (table if isinstance(table, str) else "custom")
        codes = None
        scales = G.searched_scales(W, bits, group_size, tbl, imp)
    if "learned" in parts:
        codes, scales, _ = G.learn_scales(W, H, tbl, scales, group_size, steps=learn_steps)
    if "refit" in parts:
        codes, scales, tbl, _ = gptq_refit(W, H, bits, group_size, tbl, percdamp, refit_rounds, act_order)
        return pack(codes.cpu(), scales.cpu(), tbl, bits, group_size, "custom")
    if "gptq" in parts:
        fixed = scales if "learned" in parts else None
        codes, scales = G.gptq_quantize(W, H, bits, group_size, tbl, percdamp=percdamp, scales=fixed,
                                        act_order=act_order)
    if codes is None:
        codes = G.rtn_codes(W.float().cpu(), scales.cpu(), tbl, group_size)
    return pack(codes.cpu(), scales.cpu(), tbl, bits, group_size, kind)


@torch.no_grad()
def gptq_select(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, importance: torch.Tensor,
                percdamp: float = DEFAULT_DAMP, act_order: bool = False, kmeans_iterations: int = 8,
                kmeans_inits=("nf",), refit_rounds: int = 0):
    """GPTQ onto each candidate LUT: NormalFloat ("nf") and the k-means table weighted by `importance` ("kmeans",
    as method gptq+kmeans builds it); with refit_rounds > 0 also `gptq_refit` from the better of the two
    ("custom"). Returns (QuantizedWeight of the candidate with the least damped output error tr(E (H + damping)
    E^T), {candidate: that error}). The uniform int grid is never a candidate."""
    Hd = damped(H, percdamp)
    tables = {"nf": make_table("nf", bits),
              "kmeans": G.weighted_kmeans(W, bits, group_size, importance, kmeans_iterations, kmeans_inits).table}
    cands = {k: (*G.gptq_quantize(W, H, bits, group_size, t, percdamp=percdamp, act_order=act_order), t)
             for k, t in tables.items()}
    error = lambda c: G.output_error(W, G.dequant(*c, group_size), Hd)  # noqa: E731
    errors = {k: error(c) for k, c in cands.items()}
    if refit_rounds > 0:
        c, s, t, _ = gptq_refit(W, H, bits, group_size, tables[min(errors, key=errors.get)], percdamp,
                                refit_rounds, act_order)
        cands["custom"] = (c, s, t)
        errors["custom"] = error(cands["custom"])
    best = min(errors, key=errors.get)
    return pack(*cands[best], bits, group_size, best), errors


@torch.no_grad()
def quantize_model_calibrated(model: nn.Module, tokenizer, bits: int = 4, group_size: Optional[int] = 64,
                              method: str = DEFAULT_METHOD, table="nf", calib=None,
                              calib_tokens: int = DEFAULT_CALIB_TOKENS, seqlen: int = 512, seed: int = 0,
                              device=None, skip: Sequence[str] = ("lm_head",), search_scale: bool = True,
                              progress: bool = True, stats: Optional[dict] = None, batch: int = 8,
                              **opts) -> nn.Module:
    """Replaces the model's nn.Linear layers (not matching `skip`) by LUTLinear, in place, with `method`
    (see the module docstring), calibrated on `calib_tokens` tokens of the text file `calib`.
    device: where calibration runs (default: CUDA when available); the model ends where it started.
    opts: learn_steps, kmeans_iterations, percdamp (see `quantize_weight`).
    Records model.config.quantization_config like `lutmm.nn.quantize_model`."""
    from tqdm.auto import tqdm

    parts = parse_method(method)
    if "rtn" in parts:
        return quantize_model(model, bits, group_size, table, skip=skip, search_scale=search_scale,
                              progress=progress, stats=stats)
    if calib is None:
        raise ValueError("calib: a calibration text file is needed for method " + repr(method))
    check_model_group_size(group_size)
    torch.manual_seed(seed)
    skip = [skip] if isinstance(skip, str) else list(skip or [])
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available()
                                                                       else "cpu")
    p0 = next(model.parameters())
    home, home_dtype, esize = p0.device, p0.dtype, p0.element_size()
    targets = dict(quantizable_linears(model, group_size, skip))
    g = {n: (m.in_features if group_size in (None, -1) else int(group_size)) for n, m in targets.items()}
    lname, layers = _decoder_layers(model)
    model.to(dev)
    ids = calibration_ids(tokenizer, calib, calib_tokens, seqlen, seed)
    hs, kws = _capture_inputs(model, layers[0], ids, dev, batch)
    done, before, after, results = [], 0, 0, {}
    for li in tqdm(range(len(layers)), desc=f"lutmm {bits}-bit g{group_size} {method}", disable=not progress,
                   unit="layer"):
        layer = layers[li].float()
        prefix = f"{lname}.{li}."
        lins = {n[len(prefix):]: m for n, m in targets.items() if n.startswith(prefix)}
        for grp in _input_groups(layer, lins, hs[0], kws[0]) if lins else []:
            H, n = _hessian(layer, lins[grp[0]], hs, kws)
            for name in grp:
                lin = lins[name]
                qw = quantize_weight(lin.weight.float(), H, n, bits, g[prefix + name], method, table, **opts)
                before += lin.weight.numel() * esize
                lin.weight.copy_(G.dequant(qw.codes(), qw.scales(), qw.table, qw.group_size).to(dev))
                results[prefix + name] = qw
        hs = [_run(layer, h, kw) for h, kw in zip(hs, kws)]
        layer.to(home_dtype)
    del hs
    model.to(home)
    for name, lin in targets.items():  # linears outside the decoder layers: no calibration data, plain RTN
        qw = results.get(name) or quantize(lin.weight, bits, g[name], table, search_scale=search_scale)
        if name not in results:
            before += lin.weight.numel() * esize
        bias = None if lin.bias is None else lin.bias.detach().to(home, home_dtype)
        new = LUTLinear.from_quantized(qw.to(home), bias)
        after += qw.nbytes()
        _set_submodule(model, name, new)
        done.append(name)
    all_linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if stats is not None:
        stats.update(layers=len(done), bytes_before=before, bytes_after=after, skipped=all_linear)
    config = getattr(model, "config", None)
    if config is not None:
        kinds = {qw.table_kind for qw in results.values()} or {str(table)}
        config.quantization_config = {
            "quant_method": "lutmm", "bits": int(bits), "group_size": -1 if group_size is None else int(group_size),
            "table": kinds.pop() if len(kinds) == 1 else "custom", "format_version": FORMAT_VERSION,
            "skip": skip, "modules": done, "method": method,
        }
    return model


# ---- evaluation helper -------------------------------------------------------------------------------------
class DenseLinear(nn.Module):
    """y = x W_hat^T + b with the dequantized fp32 W_hat kept dense: what the CPU LUTLinear path computes
    (fp32 matmul, result in x's dtype) without re-dequantizing on every call. For fast evaluation only."""

    def __init__(self, w_hat: torch.Tensor, bias: Optional[torch.Tensor]):
        super().__init__()
        self.register_buffer("weight", w_hat.float())
        self.register_buffer("bias", None if bias is None else bias.float())

    def forward(self, x):
        return F.linear(x.float(), self.weight, self.bias).to(x.dtype)


def densify(model: nn.Module) -> nn.Module:
    """Replaces each LUTLinear by a DenseLinear of its dequantized weight, in place (evaluation speed-up)."""
    for name, m in lut_modules(model):
        _set_submodule(model, name, DenseLinear(m.dequantize(), m.bias))
    return model
