"""lutmm.slice_weight / lutmm.shard (tensor parallelism): whole packed blocks selected without unpacking
give exactly the sliced weight, the same bytes as the C++ slice_packed, on the CPU and the GPU."""
import pytest
import torch

import lutmm
from lutmm import _core


def _qw(N=72, K=640, bits=3, g=64, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=gen)
    return lutmm.quantize(w, bits=bits, group_size=g, table="nf").to(device)


def _cpp_slice(qw, n0, n1, k0, k1):
    packed, scales, g = _core.slice_packed(qw.packed.data_ptr(), qw.packed_scales.data_ptr(), qw.N, qw.K, qw.bits,
                                           qw.group_size, n0, n1 - n0, k0, k1 - k0)
    return (torch.frombuffer(bytearray(packed), dtype=torch.uint8),
            torch.frombuffer(bytearray(scales), dtype=torch.float16), g)


@pytest.mark.parametrize("bits,g", [(2, 32), (3, 64), (4, 128), (3, 640)])  # 640 = K: one group per row
@pytest.mark.parametrize("rows,cols", [((16, 48), (0, 640)), ((64, 72), (128, 384)), ((0, 72), (512, 640)),
                                        ((0, 16), (256, 640))])
def test_slice_is_the_sliced_weight_and_the_cpp_bytes(bits, g, rows, cols):
    qw = _qw(bits=bits, g=g)
    (n0, n1), (k0, k1) = rows, cols
    kq = max(128, g)
    if k0 % kq or (k1 % kq and k1 != qw.K) or (g == qw.K and (k0, k1) != (0, qw.K)):
        with pytest.raises(ValueError, match="cols"):
            lutmm.slice_weight(qw, rows=slice(n0, n1), cols=slice(k0, k1))
        return
    sub = lutmm.slice_weight(qw, rows=slice(n0, n1), cols=(k0, k1))
    assert sub.shape == (n1 - n0, k1 - k0) and sub.bits == bits
    packed, scales, sub_g = _cpp_slice(qw, n0, n1, k0, k1)
    assert sub.group_size == sub_g
    assert torch.equal(sub.packed, packed) and torch.equal(sub.packed_scales, scales)
    assert torch.equal(lutmm.dequantize(sub), lutmm.dequantize(qw)[n0:n1, k0:k1])
    assert torch.equal(sub.codes(), qw.codes()[n0:n1, k0:k1])
    assert torch.equal(sub.scales(), qw.scales()[n0:n1, k0 // g:k1 // g])
    assert torch.equal(sub.table, qw.table) and sub.table_kind == qw.table_kind


def test_whole_slice_is_the_weight():
    qw = _qw()
    sub = lutmm.slice_weight(qw)
    assert torch.equal(sub.packed, qw.packed) and torch.equal(sub.packed_scales, qw.packed_scales)
    assert sub.packed.data_ptr() != qw.packed.data_ptr()  # a copy, not a view into qw


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_shards_reassemble_the_weight_and_its_product(bits):
    qw = _qw(N=128, K=1024, bits=bits, g=128)
    rows = [lutmm.shard(qw, 0, r, 4) for r in range(4)]  # 32 rows each
    whole = lutmm.concat_rows(rows)
    assert torch.equal(whole.packed, qw.packed) and torch.equal(whole.packed_scales, qw.packed_scales)
    x = torch.randn(3, 1024, generator=torch.Generator().manual_seed(1))
    cols = [lutmm.shard(qw, 1, r, 2) for r in range(2)]  # 512 columns each: partial products summed
    y = sum(lutmm.reference_matmul(x[:, r * 512:(r + 1) * 512], cols[r]) for r in range(2))
    torch.testing.assert_close(y, lutmm.reference_matmul(x, qw), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("call,match", [
    (lambda q: lutmm.slice_weight(q, rows=slice(8, 40)), "multiple of 16"),
    (lambda q: lutmm.slice_weight(q, rows=slice(16, 40)), "multiple of 16"),
    (lambda q: lutmm.slice_weight(q, rows=slice(0, 64, 2)), "step 2"),
    (lambda q: lutmm.slice_weight(q, rows=slice(32, 16)), "empty"),
    (lambda q: lutmm.slice_weight(q, cols=slice(64, 640)), "multiple of 128"),
    (lambda q: lutmm.slice_weight(q, cols=[0, 128, 256]), "expected a slice"),
    (lambda q: lutmm.slice_weight(q.packed), "expected a QuantizedWeight"),
    (lambda q: lutmm.shard(q, 2, 0, 2), "dim"),
    (lambda q: lutmm.shard(q, 0, 2, 2), "rank"),
    (lambda q: lutmm.shard(q, 0, 0, 5), "not divisible"),
    (lambda q: lutmm.shard(q, 0, 0, 3), "multiple of 16"),   # 72 / 3 = 24 rows
    (lambda q: lutmm.shard(q, 1, 0, 10), "multiple of 128"),  # 640 / 10 = 64 columns
])
def test_bad_slices_name_the_problem(call, match):
    qw = _qw()  # 72 x 640, g = 64
    with pytest.raises(ValueError, match=match):
        call(qw)


def test_slice_on_the_gpu_matches_the_cpu_and_multiplies():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: GPU test skipped")
    qw = _qw(N=256, K=1024, bits=4, g=128)
    sub_cpu = lutmm.shard(qw, 1, 1, 2)
    sub_gpu = lutmm.shard(qw.to("cuda"), 1, 1, 2)
    assert sub_gpu.device.type == "cuda"
    assert torch.equal(sub_gpu.packed.cpu(), sub_cpu.packed) and torch.equal(sub_gpu.packed_scales.cpu(), sub_cpu.packed_scales)
    x = torch.randn(4, 512, device="cuda", dtype=torch.bfloat16)
    got, want = lutmm.matmul(x, sub_gpu).float().cpu(), lutmm.reference_matmul(x.cpu().float(), sub_cpu)
    assert ((got - want).norm() / want.norm()).item() < 1e-2  # bf16 output rounding (values ~20: steps of 0.125)
