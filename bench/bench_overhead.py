"""Eager per-call overhead of lutmm.matmul (torch op dispatch + Python + launch) against a CUDA graph.

    python3 bench/bench_overhead.py            # the calls, eager and in a CUDA graph
    python3 bench/bench_overhead.py --parts    # and each step of the eager path on its own

Every eager figure is the median over 15 batches of 40 back-to-back calls (the host's noise moves a
mean of 300 calls by 2x between runs of the same code).
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import lutmm
from lutmm import _core, ops
from lutmm._api import _DTYPE_CODE, _check_x
from lutmm.nn import LUTLinear


def per_call_us(fn, batches=15, calls=40):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(times)


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


def core_args(x, qw, N, K, y):
    """gpu_lut_gemm's arguments for x @ qw^T into y, prepared once (its stream: the current one now)."""
    path, ws_bytes = ops._plan(x.shape[0], N, K, qw.bits, qw.group_size, 0, None)
    ws = ops._workspace(x.device, ws_bytes)
    return (x.data_ptr(), _DTYPE_CODE[x.dtype], x.shape[0], qw.packed.data_ptr(), qw.packed_scales.data_ptr(),
            list(qw._table_list), N, K, qw.bits, qw.group_size, 0, y.data_ptr(), ws.data_ptr(), ws.numel(),
            torch.cuda.current_stream().cuda_stream, ops._PATH_CODES[path], 0, 0, False, 0.0)


def parts(N=4096, K=4096):
    """Each step of lutmm.matmul's eager path timed alone (M = 1, 4-bit g128, bf16)."""
    dev = "cuda"
    qw = lutmm.quantize(torch.randn(N, K) * 0.02, bits=4, group_size=128).to(dev)
    mod = LUTLinear.from_quantized(qw).to(dev)
    x = torch.randn(1, K, device=dev, dtype=torch.bfloat16)
    y = torch.empty(1, N, device=dev, dtype=torch.bfloat16)
    args = core_args(x, qw, N, K, y)
    w = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
    steps = [
        ("torch.cuda.current_stream(dev).cuda_stream", lambda: torch.cuda.current_stream(x.device).cuda_stream),
        ("ops.current_stream_handle(i)", lambda: ops.current_stream_handle(0)),
        ("x.reshape(-1, K)", lambda: x.reshape(-1, K)),
        ("ops._plan(...) (cached)", lambda: ops._plan(1, N, K, 4, 128, 0, None)),
        ("ops._check_packed(...)", lambda: ops._check_packed(qw.packed, qw.packed_scales, N, K, 4, 128, "cuda")),
        ("torch.empty(1, N)", lambda: torch.empty(1, N, dtype=x.dtype, device=x.device)),
        ("ops._workspace(...)", lambda: ops._workspace(x.device, 0)),
        ("ops.eager_fast_path(x, None)", lambda: ops.eager_fast_path(x, None)),
        ("_check_x(x, qw)", lambda: _check_x(x, qw)),
        ("LUTLinear.quantized_weight()", lambda: mod.quantized_weight()),
        ("_core.gpu_lut_gemm (C++ + launch)", lambda: _core.gpu_lut_gemm(*args)),
        ("ops.cuda_lut_matmul (wrapper + C++)", lambda: ops.cuda_lut_matmul(
            x, qw.packed, qw.packed_scales, qw._table_list, N, K, 4, 128)),
        ("lutmm.matmul", lambda: lutmm.matmul(x, qw)),
        ("LUTLinear", lambda: mod(x)),
        ("F.linear bf16 (for scale)", lambda: F.linear(x, w)),
    ]
    print(f"# eager path, M = 1, {N}x{K}: each step alone, us per call (median of 15 x 40)")
    with torch.no_grad():
        for name, fn in steps:
            print(f"{name:>40} {per_call_us(fn):8.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", action="store_true", help="also time each step of the eager path alone")
    a = ap.parse_args()
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
        # The C++ entry alone (validation, plan, launch) with every argument prepared once: what the
        # Python wrapper adds is the lutmm.matmul row minus this one.
        args = core_args(x, qw, N, K, torch.empty(1, N, device=dev, dtype=torch.bfloat16))
        rows.append((f"_core.gpu_lut_gemm only {N}x{K}", lambda: _core.gpu_lut_gemm(*args)))
        with torch.no_grad():
            for name, fn in rows:
                if name.startswith("_core"):  # its stream handle is fixed: not capturable, eager only
                    print(f"{name:>34} {per_call_us(fn):14.1f} {'-':>14} {'-':>12}")
                    continue
                e, g = per_call_us(fn), graph_us(fn)
                print(f"{name:>34} {e:14.1f} {g:14.1f} {e - g:12.1f}")
    if a.parts:
        parts()


if __name__ == "__main__":
    main()
