"""CPU tests of the Python API: quantize / dequantize / matmul / pack, and bad input."""
import pytest
import torch

import lutmm
from lutmm import _api


def test_quantize_dequantize_error_small():
    torch.manual_seed(0)
    w = torch.randn(96, 256)
    for bits, bound in [(4, 0.11), (3, 0.21), (2, 0.42)]:
        qw = lutmm.quantize(w, bits=bits, group_size=64)
        err = ((lutmm.dequantize(qw) - w).norm() / w.norm()).item()
        assert err < bound, (bits, err)
        assert qw.shape == (96, 256) and qw.bits == bits and qw.table.numel() == 1 << bits


def test_pack_roundtrip_through_quantized_weight():
    codes = torch.randint(0, 8, (40, 160), dtype=torch.uint8)
    scales = torch.rand(40, 5).half() + 0.01
    qw = _api.pack(codes, scales, lutmm.make_table("nf", 3), 3, 32)
    assert torch.equal(qw.codes(), codes)
    assert torch.equal(qw.scales(), scales)


def test_matmul_cpu_matches_reference_and_bias():
    torch.manual_seed(1)
    qw = lutmm.quantize(torch.randn(50, 128), bits=4, group_size=32, table="int")
    x = torch.randn(3, 7, 128)
    b = torch.randn(50)
    y = lutmm.matmul(x, qw, b)
    assert y.shape == (3, 7, 50)
    ref = lutmm.reference_matmul(x, qw, b)
    assert torch.allclose(y, ref, atol=1e-4, rtol=1e-4)
    # bf16 input keeps its dtype
    assert lutmm.matmul(x.bfloat16(), qw).dtype == torch.bfloat16


def test_custom_table_and_kmeans():
    torch.manual_seed(2)
    w = torch.distributions.StudentT(4.0).sample((64, 256))
    t = [-3.0, 5.0, -0.5, 0.25]  # non-monotone, arbitrary
    qw = lutmm.quantize(w, bits=2, group_size=128, table=t)
    assert set(qw.codes().unique().tolist()) <= {0, 1, 2, 3}
    nf = lutmm.quantize(w, bits=3, group_size=64, table="nf")
    km = lutmm.quantize(w, bits=3, group_size=64, table="kmeans")
    e = lambda q: (lutmm.dequantize(q) - w).norm().item()
    assert e(km) <= e(nf)


def test_group_size_k_and_importance():
    w = torch.randn(8, 96)
    qw = lutmm.quantize(w, bits=4, group_size=None)
    assert qw.group_size == 96 and qw.scales().shape == (8, 1)
    imp = torch.ones(96)
    imp[:16] = 50
    lutmm.quantize(w, bits=2, group_size=32, importance=imp)


@pytest.mark.parametrize("kwargs, match", [
    (dict(bits=5), "bits: got 5"),
    (dict(bits=4, group_size=48), "group_size: got 48"),
    (dict(bits=4, group_size=128), "multiple of group_size 128"),
    (dict(bits=4, group_size=32, table="foo"), "table: got 'foo'"),
    (dict(bits=4, group_size=32, table=[0.0, 1.0]), "table: got 2 entries, expected 2\\^bits = 16"),
    (dict(bits=2, group_size=32, table=[0.0, float("nan"), 1.0, 2.0]), "finite"),
    (dict(bits=4, group_size=32, importance=torch.ones(3)), "importance: got 3 values"),
    (dict(bits=2, group_size=32, table=[0.0] * 4), "table: all 4 entries equal 0.0"),
    (dict(bits=2, group_size=32, table=[1.0] * 4), "table: all 4 entries equal 1.0"),
])
def test_quantize_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lutmm.quantize(torch.randn(16, 96), **kwargs)


def test_quantize_bad_weight():
    with pytest.raises(ValueError, match="2-D"):
        lutmm.quantize(torch.randn(4, 4, 32))
    with pytest.raises(ValueError, match="dtype torch.int32"):
        lutmm.quantize(torch.ones(4, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="K \\(in_features\\): got 100"):
        lutmm.quantize(torch.randn(4, 100))
    w = torch.randn(4, 64)
    w[1, 7] = float("inf")
    with pytest.raises(ValueError, match=r"element \[1, 7\] is inf"):
        lutmm.quantize(w)
    with pytest.raises(ValueError, match="torch.Tensor"):
        lutmm.quantize([[1.0] * 32])


def test_matmul_bad_input():
    qw = lutmm.quantize(torch.randn(16, 64), bits=4, group_size=32)
    with pytest.raises(ValueError, match="K = 64"):
        lutmm.matmul(torch.randn(2, 32), qw)
    with pytest.raises(ValueError, match="dtype torch.int64"):
        lutmm.matmul(torch.ones(2, 64, dtype=torch.long), qw)
    with pytest.raises(ValueError, match="bias"):
        lutmm.matmul(torch.randn(2, 64), qw, torch.randn(15))


def test_not_a_quantized_weight_or_bad_fields():
    qw = lutmm.quantize(torch.randn(16, 64), bits=4, group_size=32)
    x = torch.randn(2, 64)
    for call in (lambda: lutmm.matmul(x, torch.randn(16, 64)), lambda: lutmm.dequantize(torch.randn(3, 3)),
                 lambda: lutmm.reference_matmul(x, torch.randn(16, 64)),
                 lambda: lutmm.nn.LUTLinear.from_quantized(torch.randn(16, 64))):
        with pytest.raises(ValueError, match="expected a lutmm.QuantizedWeight"):
            call()
    with pytest.raises(ValueError, match="bias: expected a torch.Tensor or None, got list"):
        lutmm.matmul(x, qw, [0.0] * 16)
    with pytest.raises(ValueError, match="dtype: got torch.int8, expected a floating-point"):
        lutmm.dequantize(qw, torch.int8)
    fields = (qw.packed, qw.packed_scales, qw.table, 4, 32, (16, 64))
    for i, bad, match in ((3, "4", "bits"), (4, 0, "group_size 0 >= 1"), (4, 32.5, "must be integers"),
                          (5, (16, 64, 1), r"shape \(16, 64, 1\) must be \(N, K\)"),
                          (0, [0] * 8, "QuantizedWeight.packed: expected a torch.Tensor, got list")):
        args = list(fields)
        args[i] = bad
        with pytest.raises(ValueError, match=match):
            lutmm.QuantizedWeight(*args)
    same = lutmm.QuantizedWeight(*fields[:5], torch.Size([16, 64]))  # any pair of integers is a shape
    assert same.shape == (16, 64) and torch.equal(lutmm.dequantize(same), lutmm.dequantize(qw))


def test_shapes_beyond_the_format_limits_are_refused():
    # 2^40 x 2^40 made the packed byte count wrap to 0, which an empty tensor then matched
    empty_b, empty_s = torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.float16)
    qw = lutmm.QuantizedWeight(empty_b, empty_s, lutmm.make_table("nf", 4), 4, 32, (2 ** 40, 2 ** 40))
    with pytest.raises(ValueError, match="beyond the format's limits"):
        lutmm.matmul(torch.zeros(1, 1).expand(1, 2 ** 40), qw)  # a view: nothing allocated
    with pytest.raises(ValueError, match="beyond the format's limits"):
        lutmm.concat_rows([qw, qw])


def test_make_table_kmeans_names_where_it_comes_from():
    with pytest.raises(ValueError, match="expected 'nf', 'int' or 2\\^bits values \\('kmeans' is learned"):
        lutmm.make_table("kmeans", 4)


def test_op_is_registered_and_fake_works():
    qw = lutmm.quantize(torch.randn(32, 64), bits=4, group_size=32)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        x = torch.empty(5, 64)
        p = mode.from_tensor(qw.packed)
        s = mode.from_tensor(qw.packed_scales)
        y = torch.ops.lutmm.lut_matmul(x, p, s, qw._table_list, 32, 64, 4, 32, None)
        assert y.shape == (5, 32)
    torch.library.opcheck(torch.ops.lutmm.lut_matmul.default,
                          (torch.randn(3, 64), qw.packed, qw.packed_scales, qw._table_list, 32, 64, 4, 32, None))


def test_raw_cpu_ops_check_x_and_bias():
    qw = lutmm.quantize(torch.randn(32, 64), bits=4, group_size=32)
    args = (qw.packed, qw.packed_scales, qw._table_list, 32, 64, 4, 32)
    ops = torch.ops.lutmm
    for x, bias, match in ((torch.randn(3, 64).int(), None, "x: dtype torch.int32"),
                           (torch.randn(3, 64) > 0, None, "x: dtype torch.bool"),
                           (torch.randn(3, 48), None, r"x: shape \(3, 48\), expected \(..., K = 64\)"),
                           (torch.randn(3, 64), torch.randn(31), r"bias: shape \(31,\), expected \(32,\)")):
        with pytest.raises(ValueError, match=match):
            ops.lut_matmul(x, *args, bias)
    with pytest.raises(ValueError, match="x: dtype torch.int32"):
        ops.lut_matmul_silu_mul(torch.randn(3, 64).int(), *args)
    with pytest.raises(ValueError, match="x: dtype torch.int32"):
        ops.lut_matmul_layer(torch.randn(3, 64).int(), *args, None, 1e-5, False)


def test_build_info_and_gpu_flag():
    assert "CUDA" in lutmm.build_info() or "without" in lutmm.build_info()
    # the flag agrees with what the build and the machine say: kernels built and a CUDA device present
    info = lutmm.build_info()
    assert isinstance(lutmm.gpu_available(), bool)
    assert lutmm.gpu_available() == ("CUDA kernels built" in info and torch.cuda.is_available())
    assert lutmm.quality.__name__ == "lutmm.quality" and lutmm.gptq.__name__ == "lutmm.gptq"


def test_gradients_flow_to_x_and_bias():
    torch.manual_seed(3)
    qw = lutmm.quantize(torch.randn(24, 64), bits=4, group_size=32)
    x = torch.randn(5, 64, requires_grad=True)
    b = torch.randn(24, requires_grad=True)
    gy = torch.randn(5, 24)
    (lutmm.matmul(x, qw, b) * gy).sum().backward()
    w = lutmm.dequantize(qw)
    assert torch.allclose(x.grad, gy @ w, atol=1e-4)
    assert torch.allclose(b.grad, gy.sum(0), atol=1e-5)


def test_per_shape_facts_are_cached_and_forced_path_wins(monkeypatch):
    from lutmm import ops
    ops._sizes.cache_clear()
    assert ops._sizes(64, 256, 4, 128) == (lutmm._core.packed_bytes(64, 256, 4, 128),
                                          lutmm._core.packed_scale_count(64, 256, 4, 128))
    assert ops._sizes.cache_info().misses == 1
    ops._sizes(64, 256, 4, 128)
    assert ops._sizes.cache_info().hits == 1
    with pytest.raises(ValueError, match="bits: got 5"):
        ops._sizes(64, 256, 5, 128)
    monkeypatch.setattr(ops, "FORCE_PATH", "dequant")
    assert ops.choose_path(1, 64, 256, 4, 128) == "dequant"
    monkeypatch.setattr(ops, "FORCE_PATH", "fastest")
    with pytest.raises(ValueError, match="FORCE_PATH: got 'fastest'"):
        ops.choose_path(1, 64, 256, 4, 128)
