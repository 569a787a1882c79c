"""Eager per-call overhead of lutmm.matmul (torch op dispatch + Python + launch) against a CUDA graph.

    python3 bench/bench_overhead.py
"""
import time

import torch
import torch.nn.functional as F

import lutmm
from lutmm.nn import LUTLinear


def per_call_us(fn, n=300):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def graph_us(fn, n=300):
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(20):
            fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n // 20):
        g.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / (n // 20 * 20) * 1e6


def main():
    dev = "cuda"
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__}")
    print(f"{'what':>34} {'eager us/call':>14} {'graph us/call':>14} {'overhead us':>12}")
    for N, K in [(4096, 4096), (512, 512)]:
        lin = torch.nn.Linear(K, N, bias=False, device=dev, dtype=torch.bfloat16)
        qw = lutmm.quantize(lin.weight.float(), bits=4, group_size=128).to(dev)
        mod = LUTLinear.from_quantized(qw).to(dev)
        x = torch.randn(1, K, device=dev, dtype=torch.bfloat16)
        rows = [(f"lutmm.matmul M=1 {N}x{K}", lambda: lutmm.matmul(x, qw)),
                (f"LUTLinear M=1 {N}x{K}", lambda: mod(x)),
                (f"torch.ops.lutmm.lut_matmul {N}x{K}", lambda: torch.ops.lutmm.lut_matmul(
                    x, qw.packed, qw.packed_scales, qw._table_list, N, K, 4, 128, None)),
                (f"F.linear bf16 M=1 {N}x{K}", lambda: F.linear(x, lin.weight))]
        with torch.no_grad():
            for name, fn in rows:
                e, g = per_call_us(fn), graph_us(fn)
                print(f"{name:>34} {e:14.1f} {g:14.1f} {e - g:12.1f}")


if __name__ == "__main__":
    main()
