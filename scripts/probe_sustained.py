"""One-off probe (session 27): are bench_kernel.py's large-M rows slower than lutmm_bench's because of
the GPU's sustained power state? Times lutmm and cuBLAS in short (20 replays) and long (300 replays,
median of the last 150) runs, in turn, while nvidia-smi samples clocks and power."""
import os, statistics, subprocess, sys, time
import torch
import torch.nn.functional as F
sys.path.insert(0, "bench")
import bench_kernel as bk  # noqa: E402
import lutmm  # noqa: E402

OUT = os.environ.get("OUT", "/tmp")
dev = torch.device("cuda")
torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = True
smi = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu",
                        "--format=csv,noheader", "-lms", "100"], stdout=open(f"{OUT}/smi.csv", "w"))
t00 = time.time()


def graph_times(fns, reps):
    for f in fns:
        f()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); b.synchronize()
        ts.append(a.elapsed_time(b) * 1000.0 / len(fns))
    return ts


for (M, N, K) in [(4096, 8192, 8192), (1024, 57344, 8192), (1024, 8192, 8192)]:
    qws = [bk.random_qweight(N, K, 4, 128, dev) for _ in range(bk.n_copies(N * K // 2))]
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
    ws = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) for _ in range(bk.n_copies(N * K * 2))]
    lut = [lambda q=q: lutmm.matmul(x, q) for q in qws]
    cub = [lambda w=w: F.linear(x, w) for w in ws]
    time.sleep(2)  # cool a little
    for rnd in range(2):
        for name, fns in (("lutmm", lut), ("cublas", cub)):
            s = graph_times(fns, 20)
            l = graph_times(fns, 300)
            print(f"{time.time() - t00:6.1f}s {N}x{K} M={M} {name:6s} short {statistics.median(s):8.1f} "
                  f"long first50 {statistics.median(l[:50]):8.1f} last150 {statistics.median(l[150:]):8.1f}", flush=True)
    del qws, ws, lut, cub
    torch.cuda.empty_cache()
smi.terminate()
