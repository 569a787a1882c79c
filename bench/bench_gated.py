"""The gated MLP's gate/up call three ways, on the GPU (lutmm.gated; docs/performance.md item 60):

  plain      lutmm.matmul on the interleaved [2 I, K] weight (what the epilogue replaces)
  plain+act  the same, then silu(gate) * up as a separate kernel (torch.compile'd: one Triton kernel, as
             inductor makes of the unfused MLP's split, SiLU and product)
  gated      lutmm.gated.gated_matmul: the kernel writes silu(gate) * up, [M, I]

Each timed unit is one CUDA-graph replay of `--calls` calls cycling over enough weights to defeat the 50 MB
L2; medians of `--reps` replays, per call. Usage: python3 bench/bench_gated.py [--shapes 28672x4096 ...]
"""
import argparse
import statistics

import torch

import lutmm
from lutmm.gated import gated_matmul, silu_mul_interleaved


def random_weight(n: int, k: int, bits: int, g: int, dev) -> lutmm.QuantizedWeight:
    """Random codes and scales in the packed layout (throughput does not depend on the values)."""
    nbytes, nscales = lutmm._core.packed_bytes(n, k, bits, g), lutmm._core.packed_scale_count(n, k, bits, g)
    packed = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=dev)
    scales = (torch.rand(nscales, device=dev) * 0.02 + 0.001).half()
    return lutmm.QuantizedWeight(packed, scales, lutmm.make_table("nf", bits), bits, g, (n, k), "nf")


def time_graph(fn, calls: int, reps: int) -> float:
    """Median us per call of `calls` calls of fn(i) captured in one CUDA graph."""
    for i in range(calls):  # warm up (workspace, plans) outside capture
        fn(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(i)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1000 / calls)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["28672x4096", "57344x8192"], help="2I x K of the fused weight")
    ap.add_argument("--ms", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--configs", nargs="+", default=["4:128", "3:128"], help="bits:group")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    dev = torch.device("cuda")
    act_fn = torch.compile(silu_mul_interleaved, dynamic=False)
    print(f"# {torch.cuda.get_device_name()} | bf16 activations | us per call, CUDA graph of {args.calls} calls")
    print(f"{'2I x K':>12} {'M':>3} {'b':>2} {'plain':>8} {'plain+act':>10} {'gated':>8} {'saved':>7}")
    for shape in args.shapes:
        n, k = (int(v) for v in shape.split("x"))
        for cfg in args.configs:
            bits, g = (int(v) for v in cfg.split(":"))
            per_weight = n * k * bits / 8
            ws = [random_weight(n, k, bits, g, dev) for _ in range(max(2, int(200e6 // per_weight) + 1))]
            for m in args.ms:
                x = torch.randn(m, k, dtype=torch.bfloat16, device=dev)
                nw = len(ws)
                plain = time_graph(lambda i: lutmm.matmul(x, ws[i % nw]), args.calls, args.reps)
                act = time_graph(lambda i: act_fn(lutmm.matmul(x, ws[i % nw])), args.calls, args.reps)
                gated = time_graph(lambda i: gated_matmul(x, ws[i % nw]), args.calls, args.reps)
                print(f"{shape:>12} {m:>3} {bits:>2} {plain:8.1f} {act:10.1f} {gated:8.1f} {act - gated:7.1f}",
                      flush=True)
            del ws
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
