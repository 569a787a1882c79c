"""lutmm checkpoints: a Hugging Face model directory whose quantized linears are LUTLinear buffers.

    out/config.json         the HF config + "quantization_config": {"quant_method": "lutmm", "bits", "group_size",
                            "table", "format_version", "skip", "modules"}
    out/model.safetensors   the state dict (tied duplicates dropped); per quantized layer NAME:
                              NAME.packed uint8, NAME.packed_scales float16, NAME.table float32 [, NAME.bias]
    out/tokenizer.json ...  copied from the source model when given

`load_quantized` validates everything (config fields, every tensor's presence, dtype and shape, finite tables
and scales) and raises ValueError naming what is wrong; only safetensors are read, nothing is unpickled.
After `import lutmm`, `transformers.AutoModelForCausalLM.from_pretrained(out)` loads it too (see lutmm.hf).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Dict, Tuple

import torch
from torch import nn

from ._api import FORMAT_VERSION
from .nn import MODEL_GROUP_SIZES, lut_modules, quantizable_linears, replace_with_empty_lut_linear

SUPPORTED_FORMAT_VERSIONS = (1, 2)  # 1: repacked to the current layout on load (upgrade_packed)
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")

# safetensors dtype names -> torch dtypes
_ST_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
              "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
              "F64": torch.float64}
_DTYPE_NAMES = {v: k for k, v in _ST_DTYPES.items()}


# ---- quantization_config ----------------------------------------------------------------------------------
def validate_quantization_config(qc) -> dict:
    """Checks a quantization_config (dict or LutmmConfig) and returns it as a normalized plain dict.
    Raises ValueError naming the field, the value and what is expected."""
    if qc is None:
        raise ValueError("quantization_config: missing from config.json (not a lutmm checkpoint)")
    if not isinstance(qc, dict):
        if hasattr(qc, "to_dict"):
            qc = qc.to_dict()
        else:
            raise ValueError(f"quantization_config: expected a dict, got {type(qc).__name__}")
    method = qc.get("quant_method")
    if method != "lutmm":
        raise ValueError(f"quantization_config.quant_method: got {method!r}, expected 'lutmm'")
    version = qc.get("format_version")
    if isinstance(version, bool) or version not in SUPPORTED_FORMAT_VERSIONS:
        raise ValueError(f"quantization_config.format_version: got {version!r}, this lutmm supports "
                         f"{', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))} (upgrade lutmm to read newer files)")
    bits = qc.get("bits")
    if isinstance(bits, bool) or bits not in (2, 3, 4):
        raise ValueError(f"quantization_config.bits: got {bits!r}, expected 2, 3 or 4")
    g = qc.get("group_size")
    if isinstance(g, bool) or not isinstance(g, int) or not (g == -1 or (g > 0 and g % 32 == 0)):
        raise ValueError(f"quantization_config.group_size: got {g!r}, expected {', '.join(map(str, MODEL_GROUP_SIZES))}, "
                         "another positive multiple of 32 equal to in_features, or -1 (one group per row)")
    table = qc.get("table", "custom")
    if not isinstance(table, str):
        raise ValueError(f"quantization_config.table: got {table!r}, expected a string such as 'nf'")
    skip = qc.get("skip") or []
    if not isinstance(skip, (list, tuple)) or not all(isinstance(s, str) for s in skip):
        raise ValueError(f"quantization_config.skip: got {skip!r}, expected a list of strings")
    modules = qc.get("modules")
    if modules is not None and (not isinstance(modules, (list, tuple))
                                or not all(isinstance(s, str) for s in modules)):
        raise ValueError(f"quantization_config.modules: got {modules!r}, expected a list of module names")
    out = {"quant_method": "lutmm", "bits": int(bits), "group_size": int(g), "table": table,
           "format_version": int(version), "skip": list(skip)}
    if modules is not None:
        out["modules"] = list(modules)
    return out


def quantized_module_names(model: nn.Module, qc: dict):
    """The names of the linears a checkpoint quantized: qc["modules"], else the quantize_model rule."""
    if qc.get("modules") is not None:
        return list(qc["modules"])
    return [n for n, _ in quantizable_linears(model, qc["group_size"], qc["skip"], warn=False)]


def upgrade_packed(model: nn.Module, qc: dict) -> dict:
    """Brings the LUT layers' packed codes of a version-1 checkpoint (qc: its validated quantization_config)
    to the current layout, in place: 3-bit codes are repacked (docs/format.md, "Version 1"); 2 and 4 bits
    are the same in both. Returns qc with format_version set to the current one."""
    from . import _core
    from ._api import _ptr

    if qc["format_version"] == FORMAT_VERSION:
        return qc
    for name, m in lut_modules(model):
        if m.bits != 3:
            continue
        N, K, g = m.out_features, m.in_features, m.group_size
        v1 = m.packed.detach().cpu().contiguous()
        new = torch.empty_like(v1)
        _core.repack_v1(_ptr(v1, f"{name}.packed", torch.uint8, _core.packed_bytes(N, K, 3, g)), N, K, 3, g,
                        new.data_ptr())
        with torch.no_grad():
            m.packed.copy_(new.to(m.packed.device))
        m._qw = None
    return {**qc, "format_version": FORMAT_VERSION}


# ---- what a checkpoint must contain ---------------------------------------------------------------------
def tied_keys(model: nn.Module) -> set:
    """State-dict keys that duplicate another key (tied weights, e.g. lm_head.weight): not saved."""
    sd = model.state_dict(keep_vars=True)
    seen, dup = set(), set()
    for k, v in sd.items():
        if id(v) in seen:
            dup.add(k)
        seen.add(id(v))
    # HF's declared ties (before loading, e.g. on the meta device, the tensors are not shared yet)
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    dup |= {t for t, src in dict(tied).items() if t in sd and src in sd}
    return dup


def expected_tensors(model: nn.Module) -> Tuple[Dict[str, tuple], Dict[str, tuple]]:
    """({key: (dtype, shape, exact_dtype, what)} required, same for optional (tied) keys) for a model whose
    quantized layers are LUTLinear. Float tensors outside the LUT buffers may come in any float dtype."""
    sd = model.state_dict(keep_vars=True)
    lut = {}
    for name, m in lut_modules(model):
        what = (f"out_features={m.out_features}, in_features={m.in_features}, bits={m.bits}, "
                f"group_size={m.group_size}")
        for b in ("packed", "packed_scales", "table"):
            lut[f"{name}.{b}" if name else b] = what
    optional_keys = tied_keys(model)
    req, opt = {}, {}
    for k, v in sd.items():
        spec = (v.dtype, tuple(v.shape), k in lut, lut.get(k))
        (opt if k in optional_keys else req)[k] = spec
    return req, opt


def _describe(dtype, shape) -> str:
    return f"{_DTYPE_NAMES.get(dtype, str(dtype))} {list(shape)}"


def check_tensors(model: nn.Module, header: Dict[str, tuple], source: str) -> None:
    """Validates a checkpoint's tensor list {key: (safetensors dtype name, shape)} against the model.
    Raises ValueError naming the first missing / unexpected / mis-shaped / mis-typed tensor."""
    req, opt = expected_tensors(model)
    missing = [k for k in req if k not in header]
    if missing:
        dt, shape, _, what = req[missing[0]]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{source}: missing tensor {missing[0]!r} (expected {_describe(dt, shape)}"
                         f"{' for ' + what if what else ''}){more}")
    unexpected = [k for k in header if k not in req and k not in opt]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ValueError(f"{source}: unexpected tensor {unexpected[0]!r}: {type(model).__name__} with the "
                         f"quantization_config's lutmm layers has no such parameter or buffer{more}")
    for k, (dt_name, shape) in header.items():
        exp_dt, exp_shape, exact, what = req.get(k) or opt[k]
        dt = _ST_DTYPES.get(dt_name)
        for_what = f" for {what}" if what else ""
        if tuple(shape) != exp_shape:
            raise ValueError(f"{source}: tensor {k!r} has shape {list(shape)}, expected {list(exp_shape)}{for_what}")
        ok = dt == exp_dt if exact else (dt is not None and dt.is_floating_point == exp_dt.is_floating_point
                                         and (dt.is_floating_point or dt == exp_dt))
        if not ok:
            want = _DTYPE_NAMES.get(exp_dt, str(exp_dt)) if exact or not exp_dt.is_floating_point else "a float dtype"
            raise ValueError(f"{source}: tensor {k!r} has dtype {dt_name}, expected {want}{for_what}")


def check_table(key: str, table: torch.Tensor, source: str) -> None:
    if not torch.isfinite(table).all():
        raise ValueError(f"{source}: tensor {key!r} (the value table) has non-finite entries (NaN/Inf), "
                         f"expected {table.numel()} finite float32 values")


def check_scales(key: str, scales: torch.Tensor, source: str) -> None:
    """A corrupt scale (NaN/Inf) would turn its group's outputs into NaN/Inf on every call: refused here."""
    bad = ~torch.isfinite(scales.reshape(-1))
    if bad.any():
        first = int(bad.nonzero()[0])
        raise ValueError(f"{source}: tensor {key!r} (the per-group scales) has {int(bad.sum())} non-finite entries "
                         f"(NaN/Inf; the first at flat index {first}), expected finite float16 scales")


# ---- files ------------------------------------------------------------------------------------------------
def weight_files(path: Path) -> list:
    """The safetensors files of a checkpoint directory (single file or sharded with an index)."""
    single, index = path / WEIGHTS_NAME, path / WEIGHTS_INDEX_NAME
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise ValueError(f"{index}: not a valid safetensors index (weight_map: expected an object of tensor "
                             f"name -> file name, got {type(weight_map).__name__})")
        return [path / f for f in sorted(set(weight_map.values()))]
    raise ValueError(f"{path}: no {WEIGHTS_NAME} (or {WEIGHTS_INDEX_NAME}) found")


def _each_file(files, read):
    """{key: read(st, key)} over safetensors files (st: the open file). A missing, corrupt or truncated file
    raises ValueError naming the file."""
    from safetensors import safe_open

    out = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    out[k] = read(st, k)
        except FileNotFoundError:
            raise ValueError(f"{f}: file not found") from None
        except Exception as e:  # SafetensorError, OSError, ...: corrupt or truncated file
            raise ValueError(f"{f}: not a valid safetensors file ({type(e).__name__}: {e})") from None
    return out


def read_header(files) -> Dict[str, tuple]:
    """{key: (dtype name, shape)} over safetensors files, without reading the data."""
    def dtype_shape(st, k):
        sl = st.get_slice(k)
        return sl.get_dtype(), tuple(sl.get_shape())
    return _each_file(files, dtype_shape)


def _read_tensors(files) -> Dict[str, torch.Tensor]:
    return _each_file(files, lambda st, k: st.get_tensor(k))


def read_config(path: Path) -> dict:
    cfg = path / "config.json"
    if not cfg.is_file():
        raise ValueError(f"{path}: no config.json (expected a model directory)")
    try:
        cfg_dict = json.loads(cfg.read_text())
    except ValueError as e:
        raise ValueError(f"{cfg}: not valid JSON ({e})") from None
    if not isinstance(cfg_dict, dict):
        raise ValueError(f"{cfg}: expected a JSON object, got {type(cfg_dict).__name__}")
    return cfg_dict


def is_lutmm_checkpoint(path) -> bool:
    """True when the directory's config.json has quantization_config.quant_method == "lutmm" (or a
    quantization_config that is just the string "lutmm", so that loading names what is wrong with it)."""
    try:
        qc = read_config(Path(path)).get("quantization_config") or {}
    except ValueError:
        return False
    return qc == "lutmm" or (isinstance(qc, dict) and qc.get("quant_method") == "lutmm")


# ---- save / load ------------------------------------------------------------------------------------------
def save_quantized(model: nn.Module, out_dir, tokenizer_dir=None) -> Path:
    """Writes a lutmm checkpoint of a quantize_model()-ed HF model: model.safetensors + config.json, and the
    tokenizer / generation config files of `tokenizer_dir` when given. Returns the output directory."""
    from safetensors.torch import save_file

    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("model: expected a Hugging Face model with a .config")
    qc = validate_quantization_config(getattr(config, "quantization_config", None))
    if not lut_modules(model):
        raise ValueError("model: has no LUTLinear layers (run lutmm.nn.quantize_model first)")
    if any(getattr(m, "lutmm_fused", False) for m in model.modules()):
        raise ValueError("model: its projections were fused (lutmm.nn.fuse_projections), which a checkpoint does "
                         "not describe; save the unfused model and fuse after loading")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    skip = tied_keys(model)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items() if k not in skip}
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt", "lutmm_format_version": str(FORMAT_VERSION)})
    old = config.quantization_config
    config.quantization_config = qc
    try:
        config.save_pretrained(str(out))
    finally:
        config.quantization_config = old
    copied = set()
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.is_file():
                shutil.copyfile(src, out / name)
                copied.add(name)
    gen = getattr(model, "generation_config", None)
    if "generation_config.json" not in copied and gen is not None:
        gen.save_pretrained(str(out))
    return out


def build_skeleton(path: Path, qc: dict, dtype: torch.dtype) -> nn.Module:
    """The HF model of the config (random init) with empty LUTLinear modules at the quantized layers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path))
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a plain model: the LUTLinear swap below is the quantization
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    names = quantized_module_names(model, qc)
    replace_with_empty_lut_linear(model, names, qc["bits"], None if qc["group_size"] == -1 else qc["group_size"],
                                  qc["table"])
    return model


def load_quantized(path, device="cpu", dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Loads a lutmm checkpoint directory (see save_quantized) into an HF causal LM on `device`; non-quantized
    weights (embeddings, norms, lm_head, biases) in `dtype`. Raises ValueError on anything invalid."""
    path = Path(path)
    qc = validate_quantization_config(read_config(path).get("quantization_config"))
    files = weight_files(path)
    header = read_header(files)
    model = build_skeleton(path, qc, dtype)
    source = str(files[0]) if len(files) == 1 else str(path)
    check_tensors(model, header, source)
    sd = _read_tensors(files)
    for name, _ in lut_modules(model):
        key = f"{name}.table"
        check_table(key, sd[key], source)
        check_scales(f"{name}.packed_scales", sd[f"{name}.packed_scales"], source)
    result = model.load_state_dict(sd, strict=False)
    leftover = set(result.missing_keys) - tied_keys(model)
    if leftover or result.unexpected_keys:  # check_tensors makes this unreachable; kept as a guard
        raise ValueError(f"{source}: missing {sorted(leftover)} / unexpected {sorted(result.unexpected_keys)}")
    model.config.quantization_config = upgrade_packed(model, qc)
    model.to(device)
    model.eval()
    return model


def load_model(path, device="cpu", dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A lutmm checkpoint (via load_quantized) or a plain HF causal LM directory (from_pretrained)."""
    if is_lutmm_checkpoint(path):
        return load_quantized(path, device=device, dtype=dtype)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{path}: no config.json (expected a model directory)")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
