"""One lutmm call shape for Nsight Compute: `ncu -k regex:lut_gemm python3 bench/profile_one.py M N K BITS G`."""
import sys

import torch

import lutmm
from bench_kernel import random_qweight

M, N, K, bits, g = (int(v) for v in (sys.argv[1:] or ["1", "8192", "8192", "4", "128"]))
qw = random_qweight(N, K, bits, g, torch.device("cuda"))
x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
for _ in range(3):
    lutmm.matmul(x, qw)
torch.cuda.synchronize()
