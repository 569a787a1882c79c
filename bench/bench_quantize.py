"""CPU quantizer speed: one LLaMA-3-70B MLP-sized matrix (8192 x 28672 by default).

    python3 bench/bench_quantize.py [N K]
"""
import sys
import time

import torch

import lutmm


def main():
    N, K = (int(v) for v in (sys.argv[1:3] or ["8192", "28672"]))
    w = torch.randn(N, K, dtype=torch.bfloat16) * 0.02
    print(f"# {N} x {K} = {N * K / 1e6:.0f}M weights, bf16, {torch.get_num_threads()} torch threads")
    print(f"{'method':>28} {'seconds':>8} {'ns/weight':>10}")
    for label, kw in [("4-bit g128 nf, searched", dict(bits=4, group_size=128)),
                      ("4-bit g128 nf, absmax", dict(bits=4, group_size=128, search_scale=False)),
                      ("3-bit g64 int, searched", dict(bits=3, group_size=64, table="int")),
                      ("2-bit g64 nf, searched", dict(bits=2, group_size=64))]:
        t0 = time.perf_counter()
        lutmm.quantize(w, **kw)
        dt = time.perf_counter() - t0
        print(f"{label:>28} {dt:8.1f} {dt / (N * K) * 1e9:10.1f}", flush=True)


if __name__ == "__main__":
    main()
