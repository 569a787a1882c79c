"""Kernel benchmark: lutmm against cuBLAS bf16 and torch's int4 kernel, measured in the same run.

    python3 bench/bench_kernel.py            # full table (issue 3/4 shapes, M, bits, g)
    python3 bench/bench_kernel.py --quick    # a subset for iteration

Weights are random (speed does not depend on values) and rotated over enough copies to span 3x the
card's L2. The floors come from the card itself, measured at the start of the run (`calibrate`): its
device-to-device copy rate (bytes read + written) and its bf16 matrix rate on random data; the header
prints both (the issues' 3.0 TB/s and ~790 TFLOP/s are the H100's). Each timing is the median over
replays of a CUDA graph of calls (launch gaps removed), divided by the calls per graph.

lutmm (every timed path) and cuBLAS are each timed in their own steady state: 0.5 s of replays of
the graph alone, then 20 timed replays. At large M both run power-bound (~690 W, the clock 1.5 GHz
instead of 1.98) and the clock follows the last ~0.1-1 s of work, so a short timing measures whatever
ran before it (H100, 2026-11-28, scripts/probe_sustained.py: 8192x8192 M = 4096 lutmm 747 us timed
cool, 858-863 us right after cuBLAS or sustained; 57344x8192 M = 1024 cuBLAS 1297 us cool, 1499-1521
sustained). Timed in turn with each other, the cooler kernel lends the hotter one clock (cuBLAS at
57344x8192 M = 1024: 1310-1395 us interleaved with lutmm). torch int4 (6-20x slower at M > 16) is
timed without the settling.
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import lutmm
from lutmm import _core, ops

SHAPES_8B = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
SHAPES_70B = [(10240, 8192), (8192, 8192), (57344, 8192), (8192, 28672)]
# The card's ceilings. These defaults are the H100's (issues 3 and 4); calibrate() replaces them with the
# running card's own: L2 size from its properties, the copy and matrix rates measured.
PEAK_BYTES_S = 3.0e12     # device-to-device copy, bytes read + written per second
PEAK_FLOPS = 790e12       # bf16 dense matrix product on random data
L2_BYTES = 50 << 20


def n_copies(nbytes: int) -> int:
    return max(1, min(16, math.ceil(3 * L2_BYTES / max(nbytes, 1))))


class GraphTimer:
    """A CUDA graph of zero-arg callables, captured once; once() replays it and returns us per call.
    It keeps the callables (and the tensors they hold: weights, activations) alive as long as the graph,
    which reads their memory at every replay."""

    def __init__(self, fn_list):
        self.fns = list(fn_list)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for f in fn_list:  # warm-up (also grows workspaces outside capture)
                f()
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        self.calls = len(fn_list)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            for f in fn_list:
                f()
        self.graph.replay()
        torch.cuda.synchronize()

    def once(self) -> float:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        self.graph.replay()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) * 1000.0 / self.calls


def time_graph(fn_list, reps: int = 20) -> float:
    """Median microseconds per call of a list of zero-arg callables, replayed in one CUDA graph."""
    t = GraphTimer(fn_list)
    return statistics.median(t.once() for _ in range(reps))


def time_settled(timers, reps: int = 20, settle_s: float = 0.5):
    """Median us per call of each GraphTimer in its own steady state: replayed alone for settle_s
    seconds untimed, then reps timed replays."""
    meds = []
    for t in timers:
        t_end = time.perf_counter() + settle_s
        while time.perf_counter() < t_end:
            for _ in range(8):
                t.graph.replay()
            torch.cuda.synchronize()
        meds.append(statistics.median(t.once() for _ in range(reps)))
    return meds


COPY_BYTES = 1 << 30  # calibrate()'s copy: this many bytes read and as many written


def _copy_and_matmul_us(dev):
    """Median us of a COPY_BYTES device-to-device copy by a kernel and of an 8192^3 bf16 product (random
    data). The copy is an elementwise kernel (x * 1): a plain copy_ captured in a graph becomes a memcpy node
    on the copy engines, which moved 2.70 TB/s on the H200 against 4.25 for the kernel (2026-11-28)."""
    src = torch.randn(COPY_BYTES // 2, device=dev, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    return time_settled([GraphTimer([lambda: torch.mul(src, 1.0, out=dst)]), GraphTimer([lambda: a @ b])],
                        settle_s=0.3)


def use_card_l2(dev):
    """Set L2_BYTES (and so n_copies' rotation) from the running card; return its properties."""
    global L2_BYTES
    props = torch.cuda.get_device_properties(dev)
    L2_BYTES = int(props.L2_cache_size)
    return props


def calibrate(dev) -> str:
    """Set L2_BYTES, PEAK_BYTES_S and PEAK_FLOPS from the running card; return a header line. The copy
    rate counts bytes read + written; both are medians of graph replays in steady state."""
    global PEAK_BYTES_S, PEAK_FLOPS
    props = use_card_l2(dev)
    copy_us, mm_us = _copy_and_matmul_us(dev)
    torch.cuda.empty_cache()
    PEAK_BYTES_S = 2 * COPY_BYTES / (copy_us * 1e-6)
    PEAK_FLOPS = 2 * 8192 ** 3 / (mm_us * 1e-6)
    return (f"# card: {props.name}, {props.multi_processor_count} SMs, L2 {L2_BYTES / 2**20:.0f} MiB, "
            f"copy {PEAK_BYTES_S / 1e12:.2f} TB/s, bf16 {PEAK_FLOPS / 1e12:.0f} TFLOP/s (floors use these)")


def random_qweight(N, K, bits, g, dev):
    nbytes = _core.packed_bytes(N, K, bits, g)
    packed = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=dev)
    ps = (torch.rand(_core.packed_scale_count(N, K, bits, g), device=dev) * 0.02 + 0.001).half()
    return lutmm.QuantizedWeight(packed, ps, lutmm.make_table("nf", bits), bits, g, (N, K), "nf")


def lutmm_copies(N, K, bits, g, dev):
    """Random quantized weights, enough copies to span 3x the L2; and the bytes of one."""
    qw0 = random_qweight(N, K, bits, g, dev)
    wbytes = qw0.packed.numel() + 2 * qw0.packed_scales.numel()
    return [qw0] + [random_qweight(N, K, bits, g, dev) for _ in range(n_copies(wbytes) - 1)], wbytes


def lutmm_timer(x, copies, path=None):
    """A GraphTimer of lutmm.matmul over the copies, on `path` (None: the dispatched one)."""
    old = ops.FORCE_PATH
    ops.FORCE_PATH = path
    try:
        return GraphTimer([lambda q=q: lutmm.matmul(x, q) for q in copies])
    finally:
        ops.FORCE_PATH = old


def cublas_timer(x, N, K, dev):
    """A GraphTimer of F.linear (cuBLAS bf16) over enough N x K weights to span 3x the L2."""
    ws = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) for _ in range(n_copies(N * K * 2))]
    return GraphTimer([lambda w=w: F.linear(x, w) for w in ws])


def bench_int4(M, N, K, g, dev):
    try:
        wbytes = N * K // 2
        mats = []
        for _ in range(n_copies(wbytes)):
            w_u8 = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device=dev)
            packed = torch.ops.aten._convert_weight_to_int4pack(w_u8, 8)
            sz = torch.rand(K // g, N, 2, device=dev, dtype=torch.bfloat16)
            mats.append((packed, sz))
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        return time_graph([lambda p=p, s=s: torch.ops.aten._weight_int4pack_mm(x, p, g, s) for p, s in mats])
    except Exception as e:  # noqa: BLE001 - report, don't die
        print(f"# torch int4 failed for {N}x{K} g{g}: {e}", file=sys.stderr)
        return float("nan")


def forced_paths(M):
    """Paths worth timing at M: the LUT kernel re-reads the weights per 32 tokens, so not past M = 256."""
    paths = ["lut"] if M <= 256 else []
    if _core.gpu_wgmma_supported(torch.cuda.current_device()):
        paths.append("wgmma")
    return paths + ["dequant"]


# --quick times these (the 8B model's q/k/v and down projections) at decode sizes only.
QUICK_DECODE_ONLY = [(6144, 4096), (4096, 14336)]


def main():
    faulthandler.enable()
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true",
                    help="4 shapes, fewer M; the 8B model's other two shapes at M = 1 and 16")
    ap.add_argument("--standard", action="store_true",
                    help="all shapes and M for 4-bit g128; 3/2-bit g128 and 4-bit g64 at M <= 16")
    ap.add_argument("--json", default=None, help="write all rows here")
    ap.add_argument("--paths", action="store_true", help="also time every forced path (dispatch check)")
    ap.add_argument("--ms", type=int, nargs="+", default=None, help="only these M")
    ap.add_argument("--shapes", nargs="+", default=None, help="only these NxK shapes, e.g. 8192x8192")
    ap.add_argument("--configs", nargs="+", default=None, help="only these bits:group, e.g. 4:128")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = True
    if args.standard:
        Ms, shapes, configs = [1, 4, 16, 64, 256, 1024, 4096], SHAPES_8B + SHAPES_70B, [(4, 128), (3, 128), (2, 128), (4, 64)]
    elif args.quick:
        Ms, shapes, configs = [1, 16, 64, 256, 1024, 4096], [(8192, 8192), (4096, 4096), (28672, 4096), (57344, 8192),
                                                             *QUICK_DECODE_ONLY], [(4, 128), (3, 128), (2, 128), (4, 64)]
    else:
        Ms, shapes, configs = [1, 4, 16, 64, 256, 1024, 4096], SHAPES_8B + SHAPES_70B, \
            [(b, g) for b in (4, 3, 2) for g in (128, 64)]
    if args.ms:
        Ms = args.ms
    if args.shapes:
        shapes = [tuple(int(v) for v in sh.lower().split("x")) for sh in args.shapes]
    if args.configs:
        configs = [tuple(int(v) for v in c.split(":")) for c in args.configs]
    rows = []
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | {lutmm.build_info()}")
    print(calibrate(dev), flush=True)
    hdr = f"{'N x K':>13} {'M':>5} {'b':>2} {'g':>4} {'path':>7} {'lutmm us':>9} {'TB/s':>6} {'%floor':>6} " \
          f"{'cuBLAS us':>9} {'x cuBLAS':>8} {'int4 us':>8} {'x int4':>7}"
    for (N, K) in shapes:
        for M in Ms:
            if args.quick and not args.ms and (N, K) in QUICK_DECODE_ONLY and M > 16:
                continue
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            cub_timer = cublas_timer(x, N, K, dev)
            int4_by_g = {}
            for bits, g in configs:
                if (bits, g) != (4, 128) and M > 16 and (args.quick or args.standard):
                    continue
                path = ops.choose_path(M, N, K, bits, g)
                copies, wbytes = lutmm_copies(N, K, bits, g, dev)
                extra = forced_paths(M) if args.paths else []
                timers = [lutmm_timer(x, copies), cub_timer] + [lutmm_timer(x, copies, p) for p in extra]
                us, cub, *forced_us = time_settled(timers)
                del timers, copies
                floor_us = max(wbytes / PEAK_BYTES_S, 2.0 * M * N * K / PEAK_FLOPS) * 1e6
                if bits == 4 and g not in int4_by_g:
                    int4_by_g[g] = bench_int4(M, N, K, g, dev)
                i4 = int4_by_g.get(g, float("nan")) if bits == 4 else float("nan")
                row = dict(N=N, K=K, M=M, bits=bits, g=g, path=path, us=us, tbs=wbytes / us / 1e6,
                           pct_floor=100 * floor_us / us, cublas_us=cub, x_cublas=cub / us, int4_us=i4,
                           x_int4=i4 / us if i4 == i4 else float("nan"))
                for p, t in zip(extra, forced_us):
                    row[f"{p}_us"] = t
                rows.append(row)
                print(f"{N:>6}x{K:<6} {M:>5} {bits:>2} {g:>4} {path:>7} {us:9.1f} {row['tbs']:6.2f} "
                      f"{row['pct_floor']:6.1f} {cub:9.1f} {row['x_cublas']:8.2f} {i4:8.1f} {row['x_int4']:7.2f}"
                      + "".join(f"  {p} {row[p + '_us']:.1f}" for p in forced_paths(M) if args.paths), flush=True)
            del cub_timer
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print("\n" + hdr)
    for r in rows:
        if r["bits"] == 4 and r["g"] == 128 or r["M"] == 1:
            print(f"{r['N']:>6}x{r['K']:<6} {r['M']:>5} {r['bits']:>2} {r['g']:>4} {r['path']:>7} {r['us']:9.1f} "
                  f"{r['tbs']:6.2f} {r['pct_floor']:6.1f} {r['cublas_us']:9.1f} {r['x_cublas']:8.2f} "
                  f"{r['int4_us']:8.1f} {r['x_int4']:7.2f}")


if __name__ == "__main__":
    main()
