"""Hugging Face transformers integration: quant_method "lutmm" for `from_pretrained`.

After `import lutmm`, a lutmm checkpoint (lutmm.checkpoint.save_quantized / `lutmm quantize`) loads with

    AutoModelForCausalLM.from_pretrained(ckpt_dir)                        # LUTLinear layers, validated

and a plain model can be quantized while loading:

    AutoModelForCausalLM.from_pretrained(bf16_dir, quantization_config=lutmm.hf.LutmmConfig(bits=4))

Importing this module is cheap: transformers is not imported here. `LutmmConfig` / `LutmmHfQuantizer` are
registered with transformers' quantizer registry as soon as that registry is imported (right away if it
already is), through a one-shot import hook. `register()` does it explicitly.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings

_REGISTRY_MODULE = "transformers.quantizers.auto"
_classes = None  # (LutmmConfig, LutmmHfQuantizer) once built


def _build_classes():
    import torch
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    from ._api import FORMAT_VERSION
    from .checkpoint import check_scales, check_tensors, check_table, quantized_module_names, read_header, \
        upgrade_packed, validate_quantization_config
    from .nn import lut_modules, quantize_model, replace_with_empty_lut_linear

    class LutmmConfig(QuantizationConfigMixin):
        """quantization_config of a lutmm model (see lutmm.checkpoint for the fields). Invalid values raise
        ValueError naming the field."""

        def __init__(self, bits: int = 4, group_size: int = 64, table: str = "nf",
                     format_version: int = FORMAT_VERSION, skip=("lm_head",), modules=None,
                     quant_method: str = "lutmm", **kwargs):
            d = validate_quantization_config(dict(quant_method=quant_method, bits=bits, group_size=group_size,
                                                  table=table, format_version=format_version, skip=skip,
                                                  modules=modules))
            self.quant_method = d["quant_method"]
            self.bits, self.group_size, self.table = d["bits"], d["group_size"], d["table"]
            self.format_version, self.skip, self.modules = d["format_version"], d["skip"], d.get("modules")

        def to_dict(self):
            d = {"quant_method": self.quant_method, "bits": self.bits, "group_size": self.group_size,
                 "table": self.table, "format_version": self.format_version, "skip": list(self.skip)}
            if self.modules is not None:
                d["modules"] = list(self.modules)
            return d

    class LutmmHfQuantizer(HfQuantizer):
        """Pre-quantized checkpoints: nn.Linear -> empty LUTLinear before loading (the packed buffers then load
        as they are), checkpoint tensors validated against the model first. Not pre-quantized (a
        quantization_config passed to from_pretrained): quantize_model after loading."""

        requires_calibration = False

        def __init__(self, quantization_config, **kwargs):
            super().__init__(quantization_config, **kwargs)

        def validate_environment(self, *args, **kwargs):
            device_map = kwargs.get("device_map")
            if isinstance(device_map, dict) and "disk" in device_map.values():
                raise ValueError("lutmm: disk offload (device_map with 'disk') is not supported")

        def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
            if not self.pre_quantized:
                return model
            qc = self.quantization_config.to_dict()
            names = quantized_module_names(model, qc)
            replace_with_empty_lut_linear(model, names, qc["bits"],
                                          None if qc["group_size"] == -1 else qc["group_size"], qc["table"])
            # Loading casts float checkpoint tensors to the model dtype; fp16 scales must not go through bf16.
            # "keep in fp32" (lossless for fp16) applies to them; _process_model_after_weight_loading casts back.
            strict = set(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
            model._keep_in_fp32_modules_strict = strict | {r"\.packed_scales$", r"\.table$"}
            if checkpoint_files:
                files = [f for f in checkpoint_files if str(f).endswith(".safetensors")]
                if len(files) != len(checkpoint_files):
                    raise ValueError("lutmm: checkpoints must be safetensors files, got "
                                     f"{[str(f) for f in checkpoint_files]}")
                source = str(files[0]) if len(files) == 1 else f"{len(files)} safetensors files"
                check_tensors(model, read_header(files), source)
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            if not self.pre_quantized:
                qc = self.quantization_config
                quantize_model(model, qc.bits, None if qc.group_size == -1 else qc.group_size, qc.table,
                               skip=qc.skip, progress=False)
                qc.modules = list(model.config.quantization_config["modules"])
                model.config.quantization_config = qc
                return model
            for name, m in lut_modules(model):
                for b in ("packed", "packed_scales", "table"):
                    if getattr(m, b).is_meta:
                        raise ValueError(f"lutmm: {name}.{b} was not loaded from the checkpoint")
                if m.packed_scales.dtype != torch.float16:
                    m.packed_scales = m.packed_scales.to(torch.float16)  # exact: the checkpoint holds fp16
                m.table = m.table.to("cpu", torch.float32)
                check_table(f"{name}.table", m.table, "checkpoint")
                check_scales(f"{name}.packed_scales", m.packed_scales, "checkpoint")
                m._qw = None
            qc = upgrade_packed(model, self.quantization_config.to_dict())  # format version 1: repacked
            self.quantization_config.format_version = qc["format_version"]
            return model

        def is_serializable(self, safe_serialization=None):
            return True

        @property
        def is_trainable(self) -> bool:
            return False

        @property
        def is_compileable(self) -> bool:
            return True

    for cls in (LutmmConfig, LutmmHfQuantizer):
        cls.__module__ = __name__
        cls.__qualname__ = cls.__name__
    return LutmmConfig, LutmmHfQuantizer


def register() -> bool:
    """Registers quant_method "lutmm" with transformers (idempotent). False if transformers is missing."""
    global _classes
    try:
        from transformers.quantizers import auto
    except ImportError:
        return False
    if _classes is None:
        _classes = _build_classes()
    config_cls, quantizer_cls = _classes
    if auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get("lutmm") is not config_cls:
        auto.AUTO_QUANTIZATION_CONFIG_MAPPING["lutmm"] = config_cls  # (re)register, also over a stale class
    if auto.AUTO_QUANTIZER_MAPPING.get("lutmm") is not quantizer_cls:
        auto.AUTO_QUANTIZER_MAPPING["lutmm"] = quantizer_cls
    return True


def __getattr__(name):
    if name in ("LutmmConfig", "LutmmHfQuantizer"):
        if not register():
            raise ImportError(f"lutmm.hf.{name} needs transformers")
        return _classes[0] if name == "LutmmConfig" else _classes[1]
    raise AttributeError(name)


def _register_quietly():
    try:
        register()
    except Exception as e:  # never break an import of transformers
        warnings.warn(f"lutmm: could not register the transformers integration: {e}")


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """One-shot import hook: runs register() right after transformers.quantizers.auto is executed."""

    def __init__(self):
        self._busy = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _REGISTRY_MODULE or self._busy:
            return None
        self._busy = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._busy = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        loader_exec = spec.loader.exec_module

        def exec_module(module):
            loader_exec(module)
            _remove_hook()
            _register_quietly()

        spec.loader.exec_module = exec_module
        return spec


_hook = None


def _remove_hook():
    if _hook in sys.meta_path:
        sys.meta_path.remove(_hook)


def _install():
    global _hook
    if _REGISTRY_MODULE in sys.modules:
        _register_quietly()
    elif importlib.util.find_spec("transformers") is not None:
        _hook = _RegisterOnImport()
        sys.meta_path.insert(0, _hook)


_install()
