"""Probe (session 27, docs/performance-log.md item 79): how the card's power state moves large-M timings.

    OUT=/tmp python3 scripts/probe_sustained.py     # on the GPU machine, from the repository root

Times lutmm and cuBLAS bf16 on three prefill shapes in a short run (20 graph replays) and a long one
(300 replays: medians of the first 50 and the last 150), lutmm then cuBLAS, twice, while nvidia-smi
writes the SM clock, power and temperature every 100 ms to $OUT/smi.csv. On the H100 (2026-11-28) a
short timing reflected the state the previous work left (8192x8192 M = 4096 lutmm 747 us cool, 858 us
after cuBLAS); the long runs' last 150 replays give each kernel's own steady state, which
bench_kernel.py now times (time_settled).
"""
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
import bench_kernel as bk  # noqa: E402


def main():
    out = os.environ.get("OUT", "/tmp")
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = True
    print(bk.calibrate(dev), flush=True)  # the card's L2 sets how many weight copies rotate
    with open(f"{out}/smi.csv", "w") as smi_log:
        smi = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu",
                                "--format=csv,noheader", "-lms", "100"], stdout=smi_log)
        t0 = time.time()
        try:
            for (M, N, K) in [(4096, 8192, 8192), (1024, 57344, 8192), (1024, 8192, 8192)]:
                x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
                copies, _ = bk.lutmm_copies(N, K, 4, 128, dev)
                timers = {"lutmm": bk.lutmm_timer(x, copies), "cublas": bk.cublas_timer(x, N, K, dev)}
                time.sleep(2)  # cool a little
                for _ in range(2):
                    for name, t in timers.items():
                        short = [t.once() for _ in range(20)]
                        long_run = [t.once() for _ in range(300)]
                        print(f"{time.time() - t0:6.1f}s {N}x{K} M={M} {name:6s} short {statistics.median(short):8.1f}"
                              f" long first50 {statistics.median(long_run[:50]):8.1f}"
                              f" last150 {statistics.median(long_run[150:]):8.1f}", flush=True)
                del timers, copies
                torch.cuda.empty_cache()
        finally:
            smi.terminate()


if __name__ == "__main__":
    main()
