"""lutmm: fast GEMM with lookup-table (LUT) quantized weights.

    qw = lutmm.quantize(weight, bits=4, group_size=64, table="nf")
    y = lutmm.matmul(x, qw, bias)           # CUDA kernel on GPU tensors, torch fallback on the CPU
    w_hat = lutmm.dequantize(qw)

See docs/format.md for the format and the packed layout.
"""
from ._api import (QuantizedWeight, quantize, dequantize, matmul, reference_matmul, make_table, gpu_available,
                   build_info, concat_rows, FORMAT_VERSION)
from ._slicing import slice_weight, shard
from . import ops  # noqa: F401,E402 (registers the torch.ops.lutmm.* ops: `import lutmm` is enough to call them)

__version__ = "0.1.0"

try:  # transformers integration: registers quant_method "lutmm" for from_pretrained (cheap, lazy)
    from . import hf  # noqa: F401
except Exception:  # pragma: no cover - never break `import lutmm`
    pass
__all__ = ["QuantizedWeight", "quantize", "dequantize", "matmul", "reference_matmul", "make_table",
           "gpu_available", "build_info", "concat_rows", "slice_weight", "shard", "FORMAT_VERSION"]


def __getattr__(name):  # lazy submodules that import torch-heavy code only when used
    if name in ("nn", "ops", "checkpoint", "cli", "evaluate", "hf", "quality", "gptq", "quantize_torch", "fuse",
                "refit", "calib_text", "gated"):
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(name)
