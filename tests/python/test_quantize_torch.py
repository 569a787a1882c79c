"""The torch quantizer (used on the GPU) against the C++ quantizer, on the CPU."""
import pytest
import torch

import lutmm
from lutmm.quantize_torch import quantize_codes
from conftest import gpu


def _cpp(w, bits, g, table, search=True, imp=None):
    qw = lutmm.quantize(w, bits=bits, group_size=g, table=table, search_scale=search, importance=imp)
    return qw.codes(), qw.scales()


@pytest.mark.parametrize("bits, g, table, search", [(4, 64, "nf", True), (3, 128, "int", True), (2, 32, "nf", True),
                                                    (4, 128, "nf", False), (3, 64, [0.5, -2, 1, 3, -1, 0, 2, -0.25], True)])
def test_matches_cpp_quantizer(bits, g, table, search):
    torch.manual_seed(bits * 7 + g)
    w = torch.distributions.StudentT(5.0).sample((96, 512)) * 0.02
    t = lutmm.make_table(table, bits)
    c_ref, s_ref = _cpp(w, bits, g, table, search)
    c, s = quantize_codes(w, bits, g, t, search)
    agree = (c == c_ref).float().mean().item()
    assert agree > 0.999, agree
    assert (s.float() - s_ref.float()).abs().max().item() <= 1e-3 * s_ref.float().abs().max().item()
    deq = lambda c_, s_: t[c_.long()] * s_.float().repeat_interleave(g, dim=1)
    e_ref, e = (deq(c_ref, s_ref) - w).norm().item(), (deq(c, s) - w).norm().item()
    assert e <= e_ref * (1 + 1e-4)


def test_importance_and_errors():
    w = torch.randn(16, 128)
    imp = torch.rand(128) + 0.1
    t = lutmm.make_table("nf", 2)
    c_ref, _ = _cpp(w, 2, 64, "nf", True, imp)
    c, _ = quantize_codes(w, 2, 64, t, True, imp)
    assert (c == c_ref).float().mean().item() > 0.999
    w[3, 9] = float("nan")
    with pytest.raises(ValueError, match=r"element \[3, 9\] is nan"):
        quantize_codes(w, 2, 64, t)
    with pytest.raises(ValueError, match="beyond the fp16 range"):
        quantize_codes(torch.full((1, 32), 1e6), 4, 32, lutmm.make_table("nf", 4))


@gpu
def test_gpu_quantization_matches_cpu():
    torch.manual_seed(0)
    w = torch.randn(512, 1024) * 0.02
    a = lutmm.quantize(w, bits=4, group_size=128)
    b = lutmm.quantize(w.cuda(), bits=4, group_size=128)
    assert (a.codes() == b.codes()).float().mean().item() > 0.999
    assert b.packed.device.type == "cpu"
