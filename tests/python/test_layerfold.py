"""Folded decoder layers (lutmm.layerfold): RMSNorm weights in the projections, the norm and the residual add
inside the matmul calls (CPU; the GPU tests skip without a device and say so)."""
import pytest
import torch
import torch.nn.functional as F

import lutmm
from conftest import gpu
from lutmm import ops

transformers = pytest.importorskip("transformers")
from lutmm.layerfold import FoldedLlamaDecoderLayer, fold_layers, fold_norm_weights  # noqa: E402
from lutmm.nn import fuse_projections, quantize_model  # noqa: E402
from test_fuse import assert_compiles_fullgraph, randomize_params, tiny_llama  # noqa: E402


def _with_norm_weights(model):
    """HF initialises RMSNorm weights to 1: make them matter."""
    return randomize_params(model, "layernorm.weight", lambda p: p.uniform_(0.5, 1.5))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def test_fold_norm_weights_keeps_the_model():
    model = _with_norm_weights(tiny_llama(dtype=torch.float32))
    ids = torch.randint(0, 256, (2, 7))
    ref = _logits(model, ids)
    assert fold_norm_weights(model) == 2
    assert torch.all(model.model.layers[0].input_layernorm.weight == 1)
    torch.testing.assert_close(_logits(model, ids), ref, rtol=1e-4, atol=1e-4)
    quantize_model(model, bits=4, group_size=64, progress=False)
    with pytest.raises(ValueError, match="fold before quantizing"):
        fold_norm_weights(model)


@pytest.mark.parametrize("bits", [4, 3])
def test_folded_layers_match_the_fused_model(bits):
    model = _with_norm_weights(tiny_llama(dtype=torch.float32))
    fold_norm_weights(model)
    quantize_model(model, bits=bits, group_size=64, progress=False)
    fuse_projections(model)
    ids = torch.randint(0, 256, (2, 9))
    ref = _logits(model, ids)
    assert fold_layers(model) == 2
    assert all(type(layer) is FoldedLlamaDecoderLayer for layer in model.model.layers)
    got = _logits(model, ids)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    with torch.no_grad():  # greedy decoding with a static cache, token for token
        a = model.generate(ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation="static")
    for layer in model.model.layers:
        layer.__class__ = transformers.models.llama.modeling_llama.LlamaDecoderLayer
    with torch.no_grad():
        b = model.generate(ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation="static")
    assert torch.equal(a, b)


def test_fold_layers_refuses_what_it_cannot_fold():
    model = quantize_model(_with_norm_weights(tiny_llama()), bits=4, group_size=64, progress=False)
    with pytest.raises(ValueError, match="not fused"):
        fold_layers(model)
    fuse_projections(model)
    with pytest.raises(ValueError, match="norm weights are not folded"):
        fold_layers(model)
    model = tiny_llama()
    fold_norm_weights(model)
    quantize_model(model, bits=4, group_size=64, progress=False)
    fuse_projections(model, gated=False)
    with pytest.raises(ValueError, match="not gated"):
        fold_layers(model)
    assert not any(type(m) is FoldedLlamaDecoderLayer for m in model.modules())  # all or nothing


def test_layer_op_cpu_and_registration():
    torch.manual_seed(0)
    qw = lutmm.quantize(torch.randn(64, 128), bits=4, group_size=64)
    x, res = torch.randn(3, 128), torch.randn(3, 64)
    args = (x, qw.packed, qw.packed_scales, qw._table_list, 64, 128, 4, 64)
    z = F.linear(x, lutmm.dequantize(qw))
    r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(torch.ops.lutmm.lut_matmul_layer(*args, res, 1e-5, False), z * r + res)
    torch.testing.assert_close(torch.ops.lutmm.lut_matmul_layer(*args, None, -1.0, False), z)
    from lutmm.gated import silu_mul_interleaved
    torch.testing.assert_close(torch.ops.lutmm.lut_matmul_layer(*args, None, 1e-5, True), silu_mul_interleaved(z * r))
    torch.library.opcheck(torch.ops.lutmm.lut_matmul_layer.default, (*args, res, 1e-5, False),
                          test_utils=("test_schema", "test_faketensor"))
    xg = x.clone().requires_grad_()
    torch.library.opcheck(torch.ops.lutmm.lut_matmul_layer.default, (xg, *args[1:], res, 1e-5, False),
                          test_utils=("test_autograd_registration",))


def test_layer_matmul_normalizes_before_the_call_above_the_token_limit(monkeypatch):
    from lutmm import layerfold
    torch.manual_seed(2)
    model = tiny_llama(dtype=torch.float32)
    fold_norm_weights(model)
    quantize_model(model, bits=4, group_size=64, progress=False)
    fuse_projections(model)
    mod = model.model.layers[0].self_attn.qkv_proj
    calls, orig = [], layerfold.rms_norm_rows

    def spy(x, eps):
        calls.append(tuple(x.shape))
        return orig(x, eps)

    monkeypatch.setattr(layerfold, "rms_norm_rows", spy)
    limit = layerfold.RMS_IN_KERNEL_MAX_TOKENS
    for tokens in (1, limit, limit + 1, 3 * limit):
        x = torch.randn(1, tokens, model.config.hidden_size)
        want = mod(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
        got = layerfold.layer_matmul(mod, x, rms_eps=1e-6)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert calls == [(1, limit + 1, model.config.hidden_size), (1, 3 * limit, model.config.hidden_size)]
    x = torch.randn(5, 64, dtype=torch.bfloat16)  # rounded once, as LlamaRMSNorm with weight 1
    norm = transformers.models.llama.modeling_llama.LlamaRMSNorm(64, eps=1e-5)
    assert torch.equal(orig(x, 1e-5), norm(x))


@pytest.mark.parametrize("eps,silu,with_res", [(1e-5, False, True), (1e-5, True, False), (-1.0, False, True),
                                              (-1.0, True, False)])
def test_layer_op_gradients_match_autograd_of_the_reference(eps, silu, with_res):
    torch.manual_seed(3)
    qw = lutmm.quantize(torch.randn(64, 128), bits=4, group_size=64)
    w = lutmm.dequantize(qw).double()
    x = torch.randn(2, 3, 128, dtype=torch.float64) * 2
    n_out = 32 if silu else 64
    res = torch.randn(2, 3, n_out, dtype=torch.float64) if with_res else None
    gy = torch.randn(2, 3, n_out, dtype=torch.float64)
    from lutmm.gated import silu_mul_interleaved

    def reference(x, res):
        y = x @ w.t()
        if eps >= 0:
            y = y * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        if silu:
            y = silu_mul_interleaved(y)
        return y if res is None else y + res

    xa, ra = x.clone().requires_grad_(), None if res is None else res.clone().requires_grad_()
    reference(xa, ra).backward(gy)
    xb, rb = x.clone().requires_grad_(), None if res is None else res.clone().requires_grad_()
    y = torch.ops.lutmm.lut_matmul_layer(xb, qw.packed, qw.packed_scales, qw._table_list, 64, 128, 4, 64, rb, eps,
                                         silu)
    y.backward(gy)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-4)  # float32 inside the backward
    if res is not None:
        torch.testing.assert_close(rb.grad, ra.grad)


def test_layer_op_rejects_bad_arguments():
    qw = lutmm.quantize(torch.randn(64, 128), bits=4, group_size=64)
    x = torch.randn(3, 128)
    args = (x, qw.packed, qw.packed_scales, qw._table_list, 64, 128, 4, 64)
    op = torch.ops.lutmm.lut_matmul_layer
    for res, eps, silu, msg in ((torch.randn(64), -1.0, False, r"residual: shape \(64,\), expected \(3, 64\)"),
                                (torch.randn(64, 3), -1.0, False, "residual: shape"),
                                (torch.randn(3, 64, dtype=torch.float64), -1.0, False, "residual: torch.float64"),
                                (torch.randn(3, 32), -1.0, True, "residual: not with silu_mul"),
                                (None, 1.5, False, "rms_eps: expected 0 <= eps < 1"),
                                (None, float("nan"), False, "rms_eps")):
        with pytest.raises(ValueError, match=msg):
            op(*args, res, eps, silu)


def test_folded_model_compiles_fullgraph():
    model = tiny_llama(dtype=torch.float32)
    fold_norm_weights(model)
    quantize_model(model, bits=4, group_size=64, progress=False)
    fuse_projections(model)
    fold_layers(model)
    assert_compiles_fullgraph(model, torch.randint(0, 256, (2, 6)))


# ---- on the GPU ---------------------------------------------------------------------------------------------
@gpu
@pytest.mark.parametrize("path", [None, "wgmma", "dequant"])
def test_gpu_layer_op_matches_cpu(path, monkeypatch):
    if path == "wgmma" and not lutmm._core.gpu_wgmma_supported(0):
        pytest.skip("wgmma needs an sm_90 GPU and a build with sm_90a code")
    monkeypatch.setattr(ops, "FORCE_PATH", path)
    torch.manual_seed(1)
    for bits in (2, 3, 4):
        qw = lutmm.quantize(torch.randn(2048, 1024), bits=bits, group_size=128)
        qc = qw.to("cuda")
        for M in (1, 4, 9, 16, 40):
            x = torch.randn(M, 1024, dtype=torch.bfloat16) * 3
            res = torch.randn(M, 2048, dtype=torch.bfloat16)
            for residual, eps, silu in ((res, 1e-5, False), (None, 1e-6, True), (res, -1.0, False), (None, 1e-5, False)):
                a = (x, qw.packed, qw.packed_scales, qw._table_list, 2048, 1024, bits, 128, residual, eps, silu)
                want = torch.ops.lutmm.lut_matmul_layer(*a).float()
                ac = (x.cuda(), qc.packed, qc.packed_scales, qc._table_list, 2048, 1024, bits, 128,
                      None if residual is None else residual.cuda(), eps, silu)
                got = torch.ops.lutmm.lut_matmul_layer(*ac).float().cpu()
                err = (got - want).norm() / want.norm()
                assert err < 1e-2, (path, bits, M, residual is not None, eps, silu, float(err))


@gpu
def test_gpu_folded_decode_step_matches_unfolded():
    from lutmm.attention import use_gqa_attention
    from test_fuse import prefilled

    model = _with_norm_weights(tiny_llama())
    fold_norm_weights(model)
    quantize_model(model, bits=4, group_size=64, progress=False)
    model = model.cuda()
    fuse_projections(model)
    use_gqa_attention(model)
    ids = torch.randint(0, 256, (2, 8), device="cuda")

    def decode_logits():
        with torch.no_grad():
            cache, token, pos = prefilled(model, ids)
            return model(token, past_key_values=cache, cache_position=pos, use_cache=True).logits.float()

    ref = decode_logits()
    fold_layers(model)
    got = decode_logits()
    assert (got - ref).abs().max() <= 2e-2 * ref.abs().max()


@gpu
def test_gpu_layer_op_gradient_matches_cpu():
    torch.manual_seed(4)
    qw = lutmm.quantize(torch.randn(256, 512), bits=4, group_size=128)
    qc = qw.to("cuda")
    x = torch.randn(3, 512)
    res = torch.randn(3, 256)
    gy = torch.randn(3, 256)
    grads = []
    for q, dev in ((qw, "cpu"), (qc, "cuda")):
        # detach(): on the CPU .to() returns x itself, which must not stay a leaf that the CUDA copy derives from
        xd = x.to(dev, torch.bfloat16 if dev == "cuda" else torch.float32).detach().requires_grad_()
        rd = res.to(dev, xd.dtype).detach().requires_grad_()
        y = torch.ops.lutmm.lut_matmul_layer(xd, q.packed, q.packed_scales, q._table_list, 256, 512, 4, 128, rd, 1e-5,
                                             False)
        y.backward(gy.to(dev, xd.dtype))
        grads.append((xd.grad.float().cpu(), rd.grad.float().cpu()))
    (gx_cpu, gr_cpu), (gx_gpu, gr_gpu) = grads
    assert (gx_gpu - gx_cpu).norm() / gx_cpu.norm() < 2e-2
    torch.testing.assert_close(gr_gpu, gr_cpu, rtol=1e-2, atol=1e-2)


def test_layer_matmul_works_without_importing_lutmm_ops():
    # A fresh process that never imports lutmm.ops itself nor calls lutmm.matmul (which imported it lazily
    # before `import lutmm` registered the ops).
    import subprocess
    import sys
    code = ("import torch, lutmm.nn, lutmm.layerfold as F\n"
            "m = lutmm.nn.LUTLinear.from_linear(torch.nn.Linear(128, 64), 4, 64)\n"
            "y = F.layer_matmul(m, torch.randn(2, 128), 1e-5)\n"
            "print(tuple(y.shape))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "(2, 64)" in r.stdout, r.stderr[-2000:]

