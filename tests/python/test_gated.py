"""Gated MLPs (lutmm.gated): gate and up interleaved by 8 rows, silu(gate) * up from one call; the fused
Llama MLP that uses it (CPU; the GPU tests skip without a device and say so)."""
import pytest
import torch
import torch.nn.functional as F

import lutmm
from conftest import gpu
from lutmm import ops
from lutmm.gated import gated_matmul, interleave_gate_up, reference_gated_matmul, silu_mul_interleaved


def _interleave_rows(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Rows 16j .. 16j + 7 = gate rows 8j .. 8j + 7, rows 16j + 8 .. 16j + 15 = up rows 8j .. 8j + 7."""
    inter, K = gate.shape
    return torch.stack([gate.view(inter // 8, 8, K), up.view(inter // 8, 8, K)], 1).reshape(2 * inter, K)


def _pair(inter, K, bits, g, table="nf", seed=0):
    torch.manual_seed(seed)
    gw, uw = torch.randn(inter, K), torch.randn(inter, K) * 2
    q = lambda w: lutmm.quantize(w, bits=bits, group_size=g, table=table)  # noqa: E731
    return gw, uw, q(gw), q(uw), q(_interleave_rows(gw, uw)) if inter % 8 == 0 else None


@pytest.mark.parametrize("bits,g,table", [(4, 64, "nf"), (3, 32, "int"), (2, 128, "nf"), (4, None, "int"),
                                          (3, 64, [-1.0, -0.6, -0.3, -0.1, 0.1, 0.3, 0.6, 1.0])])
@pytest.mark.parametrize("inter,K", [(48, 256), (64, 352), (8, 128)])  # I / 16 odd, partial k-block, one block
def test_interleave_equals_quantizing_the_interleaved_weight(bits, g, table, inter, K):
    if g is not None and K % g:
        pytest.skip("K not a multiple of g")
    _, _, gq, uq, ref = _pair(inter, K, bits, g, table, seed=inter + K + bits)
    fused = interleave_gate_up(gq, uq)
    assert fused.shape == (2 * inter, K) and fused.bits == bits and fused.group_size == gq.group_size
    assert torch.equal(fused.packed, ref.packed), "codes differ from the packed form of the interleaved weight"
    assert torch.equal(fused.packed_scales, ref.packed_scales)
    assert torch.equal(lutmm.dequantize(fused), _interleave_rows(lutmm.dequantize(gq), lutmm.dequantize(uq)))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gated_matmul_cpu_is_silu_gate_times_up(bits):
    _, _, gq, uq, _ = _pair(40, 256, bits, 64, seed=bits)
    fused = interleave_gate_up(gq, uq)
    x = torch.randn(3, 5, 256)
    y = gated_matmul(x, fused)
    assert y.shape == (3, 5, 40) and y.dtype == torch.float32
    want = F.silu(lutmm.matmul(x, gq)) * lutmm.matmul(x, uq)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reference_gated_matmul(x, fused), want, rtol=1e-4, atol=1e-4)
    yb = gated_matmul(x.bfloat16(), fused)  # bf16 in, bf16 out: one rounding of the fp32 result
    z = F.linear(x.bfloat16().float(), lutmm.dequantize(fused))
    assert yb.dtype == torch.bfloat16 and torch.equal(yb, silu_mul_interleaved(z).bfloat16())


def test_row_shards_of_an_interleaved_weight_are_gated_shards():
    """Tensor parallelism: rank r of lutmm.shard(w, dim=0) holds gate and up rows [r I/n, (r+1) I/n), so its
    gated output is that slice of the full one (column-parallel gate/up, then a row-parallel down)."""
    _, _, gq, uq, _ = _pair(64, 256, 4, 64, seed=9)
    w = interleave_gate_up(gq, uq)
    x = torch.randn(3, 256)
    full = gated_matmul(x, w)
    for r in range(4):
        part = gated_matmul(x, lutmm.shard(w, dim=0, rank=r, world_size=4))
        torch.testing.assert_close(part, full[:, 16 * r:16 * (r + 1)], rtol=1e-6, atol=1e-6)


def test_lazy_submodule():
    """`import lutmm` alone gives lutmm.gated, in a fresh interpreter (imported with the package since
    `import lutmm` registers the torch ops, whose CPU kernels use it; lutmm.nn stays lazy)."""
    import subprocess
    import sys
    code = ("import sys, lutmm; assert 'lutmm.nn' not in sys.modules; "
            "print(lutmm.gated.gated_matmul.__name__, lutmm.nn.LUTLinear.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "gated_matmul LUTLinear", out.stderr[-500:]


def test_silu_mul_interleaved_pairs_rows_by_eight():
    z = torch.arange(32.0).view(1, 32)
    out = silu_mul_interleaved(z)
    want = torch.cat([F.silu(z[:, 0:8]) * z[:, 8:16], F.silu(z[:, 16:24]) * z[:, 24:32]], -1)
    assert torch.equal(out, want)
    with pytest.raises(ValueError, match="multiple of 16"):
        silu_mul_interleaved(torch.zeros(2, 24))


def test_op_registration_and_fake():
    _, _, gq, uq, _ = _pair(32, 128, 4, 64)
    w = interleave_gate_up(gq, uq)
    args = (torch.randn(2, 128), w.packed, w.packed_scales, w._table_list, 64, 128, 4, 64)
    torch.library.opcheck(torch.ops.lutmm.lut_matmul_silu_mul.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    assert torch.ops.lutmm.lut_matmul_silu_mul(*args).shape == (2, 32)


def test_gradient_to_x_matches_the_unfused_mlp():
    """Adapters / QLoRA-style training through a fused model: d/dx of silu(x gate^T) * (x up^T)."""
    _, _, gq, uq, _ = _pair(24, 128, 3, 32, seed=5)
    w = interleave_gate_up(gq, uq)
    x = torch.randn(2, 3, 128, dtype=torch.float64).float().requires_grad_()
    dy = torch.randn(2, 3, 24)
    (gated_matmul(x, w) * dy).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    (F.silu(lutmm.matmul(x2, gq)) * lutmm.matmul(x2, uq) * dy).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    args = (x.detach().requires_grad_(), w.packed, w.packed_scales, w._table_list, 48, 128, 3, 32)
    torch.library.opcheck(torch.ops.lutmm.lut_matmul_silu_mul.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def _truncated(qw):  # a corrupt weight: one packed byte short
    return lutmm.QuantizedWeight(qw.packed[:-1], qw.packed_scales, qw.table, qw.bits, qw.group_size, qw.shape)


@pytest.mark.parametrize("make,match", [
    (lambda: (_pair(32, 128, 4, 64)[2], _pair(16, 128, 4, 64)[3]), "shapes"),
    (lambda: (_pair(32, 128, 4, 64)[2], _pair(32, 128, 3, 64)[3]), "bits / group size"),
    (lambda: (_pair(32, 128, 4, 64)[2], _pair(32, 128, 4, 32)[3]), "bits / group size"),
    (lambda: (_pair(32, 128, 4, 64)[2], _pair(32, 128, 4, 64, table="int")[3]), "tables differ"),
    (lambda: (_pair(36, 128, 4, 32)[2], _pair(36, 128, 4, 32)[3]), "multiple of 8"),
    (lambda: (_pair(32, 128, 4, 64)[2], _pair(32, 128, 4, 64)[3].to("meta")), "on cpu and meta"),
    (lambda: (_pair(32, 128, 4, 64)[2], "up"), "up: expected a QuantizedWeight"),
    (lambda: (_pair(32, 128, 4, 64)[2], _truncated(_pair(32, 128, 4, 64)[3])), "up: packed torch.uint8 x 2047"),
])
def test_interleave_refuses_mismatched_weights(make, match):
    gate, up = make()
    with pytest.raises(ValueError, match=match):
        interleave_gate_up(gate, up)


def test_gated_matmul_refuses_bad_input():
    _, _, gq, uq, _ = _pair(32, 128, 4, 64)
    w = interleave_gate_up(gq, uq)
    with pytest.raises(ValueError, match="last dimension is 64, expected K = 128"):
        gated_matmul(torch.randn(2, 64), w)
    with pytest.raises(ValueError, match="multiple of 16"):
        gated_matmul(torch.randn(2, 128), lutmm.quantize(torch.randn(40, 128), bits=4, group_size=64))


# ---- on the GPU: every path, torch.compile ------------------------------------------------------------------
@gpu
@pytest.mark.parametrize("path", [None, "lut", "wgmma", "dequant"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gpu_gated_matmul_matches_reference(path, bits, monkeypatch):
    if path == "wgmma" and not lutmm._core.gpu_wgmma_supported(0):
        pytest.skip("wgmma needs an sm_90 GPU and a build with sm_90a code")
    monkeypatch.setattr(ops, "FORCE_PATH", path)
    _, _, gq, uq, _ = _pair(1368, 1024, bits, 128, seed=bits)  # I / 16 odd
    w = interleave_gate_up(gq, uq).to("cuda")
    for M in (1, 4, 16, 33, 300):
        for dt in (torch.bfloat16, torch.float16):
            x = torch.randn(M, 1024, dtype=dt, device="cuda")
            y = gated_matmul(x, w)
            assert y.shape == (M, 1368) and y.dtype == dt
            ref = reference_gated_matmul(x, w.to("cpu"))
            err = (y.float().cpu() - ref).norm() / ref.norm()
            assert err < (1e-2 if dt == torch.bfloat16 else 3e-3), (path, M, dt, float(err))


@gpu
def test_gpu_gated_matmul_compiles_and_captures():
    _, _, gq, uq, _ = _pair(256, 512, 4, 64)
    w = interleave_gate_up(gq, uq).to("cuda")
    x = torch.randn(2, 512, dtype=torch.bfloat16, device="cuda")
    eager = gated_matmul(x, w)
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: gated_matmul(t, w), fullgraph=True)
    assert torch.equal(compiled(x), eager)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = gated_matmul(x, w)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


@gpu
def test_gpu_gradient_to_x_matches_the_unfused_mlp():
    _, _, gq, uq, _ = _pair(256, 512, 4, 64, seed=6)
    w, gc, uc = interleave_gate_up(gq, uq).to("cuda"), gq.to("cuda"), uq.to("cuda")
    x = torch.randn(5, 512, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    dy = torch.randn(5, 256, dtype=torch.bfloat16, device="cuda")
    (gated_matmul(x, w).float() * dy.float()).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    ((F.silu(lutmm.matmul(x2, gc).float()) * lutmm.matmul(x2, uc).float()) * dy.float()).sum().backward()
    err = (x.grad.float() - x2.grad.float()).norm() / x2.grad.float().norm()
    assert err < 2e-2, float(err)
