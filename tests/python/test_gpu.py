"""GPU tests of the torch op: every path against the reference, dispatch boundaries, opcheck,
torch.compile(fullgraph=True), CUDA graph replay. Skipped (and said so) without a CUDA device."""
import pytest
import torch

import lutmm
from lutmm import ops
from conftest import gpu

pytestmark = gpu


def _rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _rounded_table_ref(x, qw, bias, dtype):
    # The kernels round T to the activation dtype before multiplying: compare against that.
    t = qw.table.to(dtype).float()
    q2 = lutmm.QuantizedWeight(qw.packed.cpu(), qw.packed_scales.cpu(), t, qw.bits, qw.group_size, qw.shape)
    return lutmm.reference_matmul(x.cpu(), q2, None if bias is None else bias.cpu())


def _wgmma_ok():
    return lutmm._core.gpu_wgmma_supported(torch.cuda.current_device())


@pytest.mark.parametrize("path", ["lut", "wgmma", "dequant"])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_paths_match_reference(path, bits, dtype, monkeypatch):
    if path == "wgmma" and not _wgmma_ok():
        pytest.skip("wgmma path needs an sm_90 GPU")
    monkeypatch.setattr(ops, "FORCE_PATH", path)
    torch.manual_seed(bits)
    for M, N, K, g in [(1, 300, 512, 64), (7, 129, 256, 32), (33, 64, 1024, 128), (200, 96, 384, 128), (3, 50, 160, 160)]:
        w = torch.randn(N, K) * 0.05
        qw = lutmm.quantize(w, bits=bits, group_size=g).to("cuda")
        x = torch.randn(M, K, dtype=dtype, device="cuda")
        bias = torch.randn(N, dtype=dtype, device="cuda")
        y = lutmm.matmul(x, qw, bias)
        assert y.dtype == dtype and y.shape == (M, N)
        assert torch.isfinite(y).all()
        err = _rel(y, _rounded_table_ref(x, qw, bias, dtype))
        assert err < (6e-3 if dtype == torch.bfloat16 else 1.5e-3), (M, N, K, g, err)


def test_dispatch_boundaries_agree():
    torch.manual_seed(0)
    N, K = 256, 1024
    qw = lutmm.quantize(torch.randn(N, K), bits=4, group_size=128).to("cuda")
    for M in (1, 8, 9, 16, 17, 32, 33, 64, 65, 128, 129, 256, 257, 300):
        x = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
        ref = _rounded_table_ref(x, qw, None, torch.bfloat16)
        y = lutmm.matmul(x, qw)
        assert _rel(y, ref) < 6e-3, M
    assert ops.choose_path(1, N, K, 4, 128) == "lut"
    assert ops.choose_path(32, N, K, 4, 128) == "lut"
    assert ops.choose_path(33, N, K, 4, 128) == ("wgmma" if _wgmma_ok() else "lut")
    assert ops.choose_path(64, N, K, 4, 128) == ("wgmma" if _wgmma_ok() else "lut")
    assert ops.choose_path(65, N, K, 4, 128) == ("wgmma" if _wgmma_ok() else "dequant")
    assert ops.choose_path(3584, N, K, 4, 128) == ("wgmma" if _wgmma_ok() else "dequant")
    assert ops.choose_path(3585, N, K, 4, 128) == "dequant"


def test_forced_path_is_checked(monkeypatch):
    qw = lutmm.quantize(torch.randn(64, 256), bits=4, group_size=64).to("cuda")
    x = torch.randn(3, 256, dtype=torch.bfloat16, device="cuda")
    monkeypatch.setattr(ops, "FORCE_PATH", "fastest")
    with pytest.raises(ValueError, match="FORCE_PATH"):
        lutmm.matmul(x, qw)


def test_batched_input_shape_and_determinism():
    qw = lutmm.quantize(torch.randn(4096, 4096) * 0.02, bits=4, group_size=128).to("cuda")
    x = torch.randn(2, 3, 4096, dtype=torch.bfloat16, device="cuda")
    y0 = lutmm.matmul(x, qw)
    assert y0.shape == (2, 3, 4096)
    for _ in range(5):
        assert torch.equal(lutmm.matmul(x, qw), y0)


def test_bad_inputs_on_cuda():
    qw = lutmm.quantize(torch.randn(64, 256), bits=4, group_size=64).to("cuda")
    with pytest.raises(ValueError, match="dtype"):
        lutmm.matmul(torch.randn(2, 256, device="cuda"), qw)  # fp32 on CUDA
    with pytest.raises(ValueError, match="K = 256"):
        lutmm.matmul(torch.randn(2, 128, device="cuda", dtype=torch.half), qw)
    with pytest.raises(ValueError, match="on cpu"):
        lutmm.matmul(torch.randn(2, 256, dtype=torch.half), qw)


def test_opcheck():
    qw = lutmm.quantize(torch.randn(128, 256), bits=3, group_size=64).to("cuda")
    x = torch.randn(5, 256, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(128, dtype=torch.bfloat16, device="cuda")
    for args in [(x, qw.packed, qw.packed_scales, qw._table_list, 128, 256, 3, 64, b),
                 (x, qw.packed, qw.packed_scales, qw._table_list, 128, 256, 3, 64, None)]:
        torch.library.opcheck(torch.ops.lutmm.lut_matmul.default, args)


def test_torch_compile_fullgraph_and_cuda_graph():
    lin = torch.nn.Linear(512, 384, bias=True).cuda().bfloat16().requires_grad_(False)
    qw = lutmm.quantize(lin.weight.float(), bits=4, group_size=64).to("cuda")

    def f(x):
        return torch.nn.functional.gelu(lutmm.matmul(x, qw, lin.bias)) * 2

    x = torch.randn(4, 512, dtype=torch.bfloat16, device="cuda")
    eager = f(x)
    compiled = torch.compile(f, fullgraph=True)
    assert _rel(compiled(x), eager) < 1e-2
    # CUDA graph capture and replay with new inputs.
    static_x = x.clone()
    f(static_x)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_y = f(static_x)
    x2 = torch.randn_like(x)
    static_x.copy_(x2)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_y, f(x2))


def test_backward_on_cuda_matches_dense():
    qw = lutmm.quantize(torch.randn(256, 512) * 0.05, bits=4, group_size=64).to("cuda")
    x = torch.randn(8, 512, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    gy = torch.randn(8, 256, dtype=torch.bfloat16, device="cuda")
    (lutmm.matmul(x, qw) * gy).sum().backward()
    w = lutmm.dequantize(qw, torch.bfloat16)
    assert _rel(x.grad, gy.float() @ w.float()) < 1e-2


def test_quantized_llama_on_cuda_matches_cpu_reference():
    from transformers import LlamaConfig, LlamaForCausalLM
    from lutmm.nn import quantize_model
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512)
    model = LlamaForCausalLM(cfg).eval()
    quantize_model(model, bits=4, group_size=64, progress=False)
    ids = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        ref = model.float()(ids).logits                     # CPU: fp32 on the dequantized weights
        out = model.to("cuda", torch.bfloat16)(ids.cuda()).logits.float().cpu()  # lutmm kernels
    assert _rel(out, ref) < 3e-2


def test_quantize_model_on_the_gpu_matches_cpu_quantization():
    # quant_device="cuda": the torch quantizer runs on the GPU, one layer at a time; the packed codes and
    # scales must be those of the CPU quantizer (same search, same fp16 rounding), up to rare ties.
    from transformers import LlamaConfig, LlamaForCausalLM
    from lutmm.nn import LUTLinear, quantize_model
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512)
    base = LlamaForCausalLM(cfg).eval()
    a = LlamaForCausalLM(cfg).eval()
    a.load_state_dict(base.state_dict())
    b = LlamaForCausalLM(cfg).eval()
    b.load_state_dict(base.state_dict())
    quantize_model(a, bits=4, group_size=64, progress=False)
    quantize_model(b, bits=4, group_size=64, progress=False, quant_device="cuda")
    la = [m for m in a.modules() if isinstance(m, LUTLinear)]
    lb = [m for m in b.modules() if isinstance(m, LUTLinear)]
    assert len(la) == len(lb) == 14
    for x, y in zip(la, lb):
        assert y.packed.device.type == "cpu"  # modules stay where the model was
        same_codes = (x.packed == y.packed).float().mean().item()
        assert same_codes > 0.999, same_codes
        assert (x.packed_scales == y.packed_scales).float().mean().item() > 0.999


def test_eager_fast_path_matches_the_op():
    # lutmm.matmul skips the op dispatcher in eager mode without autograd; the result must be the op's, bitwise.
    torch.manual_seed(0)
    qw = lutmm.quantize(torch.randn(320, 256), bits=3, group_size=64).to("cuda")
    x = torch.randn(5, 256, device="cuda", dtype=torch.bfloat16)
    assert ops.eager_fast_path(x, None)
    assert not ops.eager_fast_path(x.clone().requires_grad_(), None)
    fast = lutmm.matmul(x, qw)
    op = ops.lut_matmul(x, qw.packed, qw.packed_scales, qw._table_list, qw.N, qw.K, qw.bits, qw.group_size, None)
    assert torch.equal(fast, op)
    with pytest.raises(ValueError, match="dtype"):
        ops.cuda_lut_matmul(x.float(), qw.packed, qw.packed_scales, qw._table_list, qw.N, qw.K, qw.bits,
                            qw.group_size)
    # The packed weight on another device than x: named, not launched on a host pointer.
    with pytest.raises(ValueError, match="packed: on cpu, expected cuda:0 .the device of x"):
        ops.cuda_lut_matmul(x, qw.packed.cpu(), qw.packed_scales, qw._table_list, qw.N, qw.K, qw.bits,
                            qw.group_size)
    with pytest.raises(ValueError, match="packed_scales: on cpu"):
        ops.cuda_lut_matmul(x, qw.packed, qw.packed_scales.cpu(), qw._table_list, qw.N, qw.K, qw.bits,
                            qw.group_size)


def test_calls_run_on_the_current_stream():
    # The CUDA path launches on the caller's current stream (read as a raw handle): on a side stream
    # whose input is written just before, the result must be that input's product, and the side
    # stream's work must be what the default stream waits for.
    torch.manual_seed(1)
    qw = lutmm.quantize(torch.randn(4096, 4096) * 0.02, bits=4, group_size=128).to("cuda")
    x = torch.randn(3, 4096, device="cuda", dtype=torch.bfloat16)
    ref = lutmm.matmul(x, qw)
    side = torch.cuda.Stream()
    assert ops.current_stream_handle(0) == torch.cuda.current_stream().cuda_stream
    with torch.cuda.stream(side):
        assert ops.current_stream_handle(torch.cuda.current_device()) == side.cuda_stream
        torch.cuda._sleep(20_000_000)  # ~10 ms of work queued ahead on the side stream
        xs = x * 1.0  # written on the side stream, after the sleep
        ys = lutmm.matmul(xs, qw)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(ys, ref)
