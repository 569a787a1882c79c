"""Decode-attention benchmark: lutmm's decode-attention kernel against the plain ops it replaces
(`lutmm.attention`'s decode path, compiled as the end-to-end step compiles it) and torch SDPA with
grouped-query heads, measured in the same run.

    python3 bench/bench_attention.py           # LLaMA-3 8B / 70B heads, batch 1-16, 392-8192 cached positions

One decode step of one layer: q [B, Hkv, G, D], a static KV cache [B, Hkv, S, D] of which the first
`valid` positions attend (a bool mask, as transformers gives it). K and V are rotated over enough copies
to span 3x the card's L2; each timing is the median over replays of a CUDA graph of calls. The floor is
the attended K and V bytes / the card's copy rate, measured at the start (bench_kernel.calibrate; 3.0 TB/s
on the H100): what a kernel that skips masked positions must read. The kernel
in its variants (include/lutmm/attention.h's AttnKernel: auto = kAuto, the default; mma = kMma, split +
combine; wide = kWide, a CTA of 16 warps per KV head); TB/s and "x plain" are the default's.
"""
from __future__ import annotations

import argparse
import importlib.util
import os

import torch
import torch.nn.functional as F

from lutmm.attention import gqa_decode_attention, gqa_sdpa_attention

_spec = importlib.util.spec_from_file_location("bench_kernel", os.path.join(os.path.dirname(__file__), "bench_kernel.py"))
_bk = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bk)

HEADS = {"8b": (8, 4, 128), "70b": (8, 8, 128)}  # KV heads, query heads per KV head, head dim
CASES = [(1, 392, 256), (4, 392, 256), (16, 392, 256), (1, 1024, 768), (16, 1024, 768), (1, 8192, 4096),
         (16, 2048, 2048)]  # B, S, valid


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="8b,70b")
    args = ap.parse_args()
    dev = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | bf16 | one layer's decode attention")
    print(_bk.calibrate(dev), flush=True)
    hdr = (f"{'model':>5} {'B':>3} {'S':>5} {'valid':>5} {'floor us':>8} {'plain us':>8} {'sdpa us':>8} "
           f"{'auto us':>8} {'mma us':>8} {'wide us':>8} {'TB/s':>5} {'x plain':>7} {'max |diff|':>10}")
    rows = []
    for model in args.models.split(","):
        hkv, g, d = HEADS[model]
        module = torch.nn.Module().eval()
        plain = torch.compile(lambda q, k, v, m: gqa_sdpa_attention(module, q, k, v, m)[0], dynamic=False)
        for b, s, valid in CASES:
            kv_bytes = 2 * b * hkv * s * d * 2
            sets = []
            for _ in range(_bk.n_copies(kv_bytes)):
                k = torch.randn(b, hkv, s, d, device=dev, dtype=torch.bfloat16)
                v = torch.randn(b, hkv, s, d, device=dev, dtype=torch.bfloat16)
                sets.append((k, v))
            q = torch.randn(b, hkv, g, d, device=dev, dtype=torch.bfloat16)
            mask = torch.zeros(b, s, dtype=torch.bool, device=dev)
            mask[:, :valid] = True
            q4 = q.reshape(b, hkv * g, 1, d)      # the attention function's query heads [B, Hq, 1, D]
            m4 = mask[:, None, None, :]           # transformers' [B, 1, 1, S] bool mask
            scale = d ** -0.5
            t_plain = _bk.time_graph([lambda k=k, v=v: plain(q4, k, v, m4) for k, v in sets])
            t_sdpa = _bk.time_graph([lambda k=k, v=v: F.scaled_dot_product_attention(
                q4, k, v, attn_mask=m4, enable_gqa=True) for k, v in sets])
            t_var = [_bk.time_graph([lambda k=k, v=v, var=var: gqa_decode_attention(q, k, v, mask, scale, var)
                                     for k, v in sets]) for var in (0, 1, 2)]
            k, v = sets[0]
            ref = plain(q4, k, v, m4).float().reshape(b, hkv, g, d)  # [B, 1, Hq, D] -> heads h * G + j
            diff = max((gqa_decode_attention(q, k, v, mask, scale, var).float() - ref).abs().max().item()
                       for var in (0, 1, 2))
            used = 2 * b * hkv * valid * d * 2
            floor = used / _bk.PEAK_BYTES_S * 1e6
            row = (model, b, s, valid, floor, t_plain, t_sdpa, *t_var, used / (t_var[0] * 1e-6) / 1e12,
                   t_plain / t_var[0], diff)
            rows.append(row)
            print(_fmt(row), flush=True)
    print("\n" + hdr)
    for r in rows:
        print(_fmt(r))


def _fmt(r):
    return (f"{r[0]:>5} {r[1]:>3} {r[2]:>5} {r[3]:>5} {r[4]:8.1f} {r[5]:8.1f} {r[6]:8.1f} {r[7]:8.1f} {r[8]:8.1f} "
            f"{r[9]:8.1f} {r[10]:5.2f} {r[11]:7.2f} {r[12]:10.2e}")


if __name__ == "__main__":
    main()
