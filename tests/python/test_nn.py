"""LUTLinear and quantize_model (CPU; the CUDA-graph test runs only with a GPU)."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import lutmm
from lutmm.nn import LUTLinear, lut_modules, quantize_model
from conftest import gpu

transformers = pytest.importorskip("transformers")


def tiny_llama(tie=True, bias=False, seed=0, dtype=torch.bfloat16):
    """A random 2-layer Llama: hidden 128, intermediate 256, vocab 256."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tie, attention_bias=bias, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()  # (rotary buffers stay float32)


def _linear(N=96, K=256, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(K, N, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(3.0)
        if bias:
            lin.bias.normal_()
    return lin


@pytest.mark.parametrize("bits,g,table", [(4, 64, "nf"), (3, 32, "int"), (2, 128, "kmeans"), (4, None, "nf")])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_equals_linear_with_dequantized_weight(bits, g, table, bias):
    lin = _linear(bias=bias)
    m = LUTLinear.from_linear(lin, bits=bits, group_size=g, table=table)
    assert (m.in_features, m.out_features, m.bits, m.group_size) == (256, 96, bits, 256 if g is None else g)
    assert m.table_kind == table and (m.bias is not None) == bias
    w = m.dequantize(torch.float32)
    x = torch.randn(2, 5, 256)
    ref = F.linear(x, w, None if lin.bias is None else lin.bias.detach())
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)
    # bf16 activations: computed in fp32 on the CPU, returned in bf16
    yb = m(x.bfloat16())
    assert yb.dtype == torch.bfloat16 and yb.shape == (2, 5, 96)
    torch.testing.assert_close(yb.float(), F.linear(x.bfloat16().float(), w, None if not bias else lin.bias.detach()),
                               rtol=2e-2, atol=2e-2)
    # the quantized weight is close to the original
    assert (w - lin.weight).norm() / lin.weight.norm() < {4: 0.15, 3: 0.3, 2: 0.6}[bits]


def test_from_quantized_and_extra_repr():
    w = torch.randn(48, 128)
    qw = lutmm.quantize(w, bits=3, group_size=32, table="int")
    b = torch.randn(48)
    m = LUTLinear.from_quantized(qw, b)
    assert m.packed is qw.packed and torch.equal(m.bias, b)
    r = repr(m)
    for s in ("in_features=128", "out_features=48", "bits=3", "group_size=32", "table=int", "bias=True"):
        assert s in r
    torch.testing.assert_close(m(torch.eye(128)), lutmm.dequantize(qw).t() + b)
    with pytest.raises(ValueError, match="bias"):
        LUTLinear.from_quantized(qw, torch.zeros(5))
    with pytest.raises(ValueError, match="linear"):
        LUTLinear.from_linear(torch.nn.Conv1d(4, 4, 1))


def test_state_dict_round_trip():
    src = LUTLinear.from_linear(_linear(), bits=4, group_size=64, table="kmeans")
    sd = src.state_dict()
    assert set(sd) == {"packed", "packed_scales", "table", "bias"}
    assert sd["packed"].dtype == torch.uint8 and sd["packed_scales"].dtype == torch.float16
    assert sd["table"].dtype == torch.float32 and sd["table"].shape == (16,)
    dst = LUTLinear(256, 96, bits=4, group_size=64, bias=True, table_kind="kmeans")
    x = torch.randn(3, 256)
    dst(x)  # builds the cached view from the zero buffers first: load_state_dict must refresh it
    dst.load_state_dict(sd)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    with pytest.raises(RuntimeError):
        LUTLinear(256, 96, bits=4, group_size=64, bias=False).load_state_dict(sd)  # unexpected bias


def test_forward_does_not_call_tolist(monkeypatch):
    m = LUTLinear.from_linear(_linear(), bits=4, group_size=64)
    x = torch.randn(4, 256)
    y0 = m(x)

    def boom(*a, **k):
        raise AssertionError("forward called Tensor.tolist()")

    monkeypatch.setattr(torch.Tensor, "tolist", boom)
    torch.testing.assert_close(m(x), y0, rtol=0, atol=0)


def test_dtype_and_device_moves_keep_format():
    m = LUTLinear.from_linear(_linear(), bits=4, group_size=64)
    x = torch.randn(2, 256)
    y0 = m(x)
    scales = m.packed_scales.clone()
    m.to(torch.bfloat16)
    assert m.packed_scales.dtype == torch.float16 and torch.equal(m.packed_scales, scales)
    assert m.table.dtype == torch.float32 and m.table.device.type == "cpu"
    assert m.bias.dtype == torch.bfloat16
    m.half().float()
    assert torch.equal(m.packed_scales, scales) and m.table.dtype == torch.float32
    torch.testing.assert_close(m(x), y0, rtol=1e-3, atol=1e-2)  # only the bias went through bf16


def test_invalid_arguments():
    with pytest.raises(ValueError, match="bits"):
        LUTLinear(256, 64, bits=5)
    with pytest.raises(ValueError, match="group_size"):
        LUTLinear(256, 64, bits=4, group_size=48)


@pytest.mark.parametrize("tie", [True, False])
def test_quantize_model_tiny_llama(tie):
    model = tiny_llama(tie)
    x = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        ref = model(x).logits.float()
    stats = {}
    quantize_model(model, bits=4, group_size=64, table="nf", progress=False, stats=stats)
    names = [n for n, _ in lut_modules(model)]
    assert len(names) == 14 and stats["layers"] == 14 and stats["skipped"] == ["lm_head"]
    assert stats["bytes_after"] < stats["bytes_before"] / 3
    assert isinstance(model.lm_head, torch.nn.Linear)
    assert not any(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if n != "lm_head")
    qc = model.config.quantization_config
    assert qc == {"quant_method": "lutmm", "bits": 4, "group_size": 64, "table": "nf",
                  "format_version": lutmm.FORMAT_VERSION, "skip": ["lm_head"], "modules": names}
    with torch.no_grad():
        out = model(x).logits.float()
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - ref).norm() / ref.norm() < 0.2


def test_quantize_model_skips_what_it_cannot_or_should_not_quantize():
    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 64)
            self.a = torch.nn.Linear(64, 64)
            self.odd = torch.nn.Linear(48, 64)     # K not a multiple of 32
            self.head = torch.nn.Linear(64, 10, bias=False)
            self.head.weight = self.emb.weight     # tied
            self.keep = torch.nn.Linear(64, 64)

    toy = Toy()
    stats = {}
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        quantize_model(toy, bits=4, group_size=64, skip=("keep",), progress=False, stats=stats)
    msgs = " | ".join(str(m.message) for m in w)
    assert "odd" in msgs and "in_features = 48" in msgs and "head" in msgs and "tied" in msgs
    assert isinstance(toy.a, LUTLinear)
    assert all(isinstance(m, torch.nn.Linear) for m in (toy.odd, toy.head, toy.keep))
    assert stats["layers"] == 1 and sorted(stats["skipped"]) == ["head", "keep", "odd"]


@gpu
def test_lut_linear_cuda_graph():
    if not lutmm.gpu_available():
        pytest.skip("lutmm built without CUDA kernels")
    m = LUTLinear.from_linear(_linear(N=256, K=512), bits=4, group_size=64).to("cuda")
    assert m.table.device.type == "cpu" and m.packed.is_cuda
    x = torch.randn(1, 512, device="cuda", dtype=torch.bfloat16)
    y0 = m(x)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = m(x)
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(y, y0)


def test_model_group_sizes_are_the_formats():
    """lutmm.nn.MODEL_GROUP_SIZES comes from the C++ format (kGroupSizes): each one is a valid group size of a
    weight whose K it divides, and the C++ shape check names exactly these when it refuses one."""
    from lutmm import _core
    from lutmm.nn import MODEL_GROUP_SIZES
    assert MODEL_GROUP_SIZES == tuple(_core.group_sizes()) and len(MODEL_GROUP_SIZES) >= 4
    for g in MODEL_GROUP_SIZES:
        _core.validate_shape(16, 1024, 4, g)
    with pytest.raises(ValueError, match="expected " + ", ".join(map(str, MODEL_GROUP_SIZES)) + r", or K \(= 1024\)"):
        _core.validate_shape(16, 1024, 4, 48)


@pytest.mark.parametrize("g", [48, 0, -2, 512, 64.5, "64", True])
def test_quantize_model_rejects_a_group_size_no_layer_can_take(g):
    model = torch.nn.Sequential(torch.nn.Linear(128, 64))
    with pytest.raises(ValueError, match="group_size: got .*expected 32, 64, 128, 256, or None / -1"):
        quantize_model(model, group_size=g, progress=False)
    assert isinstance(model[0], torch.nn.Linear)  # untouched
    with pytest.raises(ValueError, match="model: expected a torch.nn.Module, got Tensor"):
        quantize_model(torch.randn(3), progress=False)

