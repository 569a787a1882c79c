"""Smoke test of the end-to-end harness (bench/bench_e2e.py) on a tiny Llama, CPU, no CUDA graph."""
import importlib.util
import os

import torch

from conftest import REPO


def _load():
    spec = importlib.util.spec_from_file_location("bench_e2e", os.path.join(REPO, "bench", "bench_e2e.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_model_swaps_every_decoder_linear_and_decodes():
    e2e = _load()
    model = e2e.build("tiny", "cpu")
    assert e2e.swap_to_lutmm(model, 4, 64) == 2 * 7  # q, k, v, o, gate, up, down per layer
    from lutmm.nn import LUTLinear
    assert sum(isinstance(m, LUTLinear) for m in model.modules()) == 14
    assert isinstance(model.lm_head, torch.nn.Linear)
    tps = e2e.decode_tokens_per_s(model, batch=2, prompt=8, gen=3, graph=False)
    assert tps > 0
