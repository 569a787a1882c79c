"""The gated MLP's gate/up call three ways, on the GPU (lutmm.gated; docs/performance-log.md item 60):

  plain      lutmm.matmul on the interleaved [2 I, K] weight (what the epilogue replaces)
  plain+act  the same, then silu(gate) * up as a separate kernel (torch.compile'd: one Triton kernel, as
             inductor makes of the unfused MLP's split, SiLU and product)
  gated      lutmm.gated.gated_matmul: the kernel writes silu(gate) * up, [M, I]

Each timed unit is one CUDA-graph replay of `--calls` calls cycling over enough weights to span 4x the card's
L2; medians of `--reps` replays, per call. Usage: python3 bench/bench_gated.py [--shapes 28672x4096 ...]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_kernel as bk  # noqa: E402
from lutmm.gated import gated_matmul, silu_mul_interleaved  # noqa: E402

import lutmm  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["28672x4096", "57344x8192"], help="2I x K of the fused weight")
    ap.add_argument("--ms", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--configs", nargs="+", default=["4:128", "3:128"], help="bits:group")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    dev = torch.device("cuda")
    bk.use_card_l2(dev)
    act_fn = torch.compile(silu_mul_interleaved, dynamic=False)
    print(f"# {torch.cuda.get_device_name()} | bf16 activations | us per call, CUDA graph of {args.calls} calls")
    print(f"{'2I x K':>12} {'M':>3} {'b':>2} {'plain':>8} {'plain+act':>10} {'gated':>8} {'saved':>7}")
    for shape in args.shapes:
        n, k = (int(v) for v in shape.split("x"))
        for cfg in args.configs:
            bits, g = (int(v) for v in cfg.split(":"))
            per_weight = n * k * bits / 8
            ws = [bk.random_qweight(n, k, bits, g, dev) for _ in range(max(2, int(4 * bk.L2_BYTES // per_weight) + 1))]
            for m in args.ms:
                x = torch.randn(m, k, dtype=torch.bfloat16, device=dev)
                nw = len(ws)
                calls = range(args.calls)
                plain = bk.time_graph([lambda i=i, ws=ws: lutmm.matmul(x, ws[i % nw]) for i in calls], args.reps)
                act = bk.time_graph([lambda i=i, ws=ws: act_fn(lutmm.matmul(x, ws[i % nw])) for i in calls], args.reps)
                gated = bk.time_graph([lambda i=i, ws=ws: gated_matmul(x, ws[i % nw]) for i in calls], args.reps)
                print(f"{shape:>12} {m:>3} {bits:>2} {plain:8.1f} {act:10.1f} {gated:8.1f} {act - gated:7.1f}",
                      flush=True)
            del ws
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
