"""The per-group quantizer in torch, so it runs on the GPU (the C++ one, src/quantize.cpp, is CPU-only).

Same algorithm as the C++ quantizer: absmax scale (the smallest scale mapping the group into T's range),
16 shrink factors of it, least-squares refit of the best, every candidate scale rounded to fp16, codes =
nearest entry of T (ties upward). Results match the C++ quantizer up to float rounding (tested).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

FP16_MAX = 65504.0


def quantize_codes(w: torch.Tensor, bits: int, group_size: int, table: torch.Tensor, search_scale: bool = True,
                   importance: Optional[torch.Tensor] = None, grid_points: int = 16, min_shrink: float = 0.625,
                   rows_per_chunk: int = 1024) -> Tuple[torch.Tensor, torch.Tensor]:
    """Codes (uint8 N x K) and fp16 scales (N x K/g) for weight `w` (N x K) on w's device.

    Works through `rows_per_chunk` rows at a time to bound temporary memory (about 12 floats/weight)."""
    N, K = w.shape
    g = group_size
    dev = w.device
    t_sorted, order = table.to(dev, torch.float32).sort()
    mids = ((t_sorted[1:] + t_sorted[:-1]) / 2).contiguous()
    tmin, tmax = float(t_sorted[0]), float(t_sorted[-1])
    imp = None if importance is None else importance.to(dev, torch.float32).reshape(1, K // g, g)
    codes = torch.empty(N, K, dtype=torch.uint8, device=dev)
    scales = torch.empty(N, K // g, dtype=torch.float16, device=dev)
    factors = [1.0 - (1.0 - min_shrink) * i / max(1, grid_points - 1) for i in range(grid_points)] \
        if search_scale else [1.0]

    def err_and_pos(W, s):  # W: (r, G, g), s: (r, G) fp16-representable
        inv = torch.where(s != 0, 1.0 / s, torch.zeros_like(s))
        pos = torch.bucketize(W * inv.unsqueeze(-1), mids, right=True)
        d = W - s.unsqueeze(-1) * t_sorted[pos]
        e = d * d if imp is None else imp * d * d
        return e.sum(-1, dtype=torch.float64), pos

    for r0 in range(0, N, rows_per_chunk):
        W = w[r0:r0 + rows_per_chunk].to(torch.float32).reshape(-1, K // g, g)
        if not torch.isfinite(W).all():
            bad = (~torch.isfinite(W.reshape(-1, K))).nonzero()[0].tolist()
            raise ValueError(f"weight: element [{r0 + bad[0]}, {bad[1]}] is "
                             f"{w[r0 + bad[0], bad[1]].item()}, expected finite values (no NaN/Inf)")
        wmax, wmin = W.clamp_min(0).amax(-1), W.clamp_max(0).amin(-1)
        s0 = torch.zeros_like(wmax)
        if tmax > 0:
            s0 = torch.maximum(s0, wmax / tmax)
        if tmin < 0:
            s0 = torch.maximum(s0, wmin / tmin)
        amax = W.abs().amax(-1)
        s0 = torch.where((s0 == 0) & (amax > 0), amax / max(abs(tmin), abs(tmax)), s0)
        if (s0 >= FP16_MAX).any():
            i = (s0 >= FP16_MAX).nonzero()[0].tolist()
            raise ValueError(f"weight: group {i[1]} of row {r0 + i[0]} needs scale {s0[i[0], i[1]].item():g}, "
                             "beyond the fp16 range of the format's scales (max 65504)")
        best_s = s0.half().float()
        best_e, best_pos = err_and_pos(W, best_s)
        for f in factors[1:]:
            s = (s0 * f).half().float()
            e, pos = err_and_pos(W, s)
            better = e < best_e
            best_e = torch.where(better, e, best_e)
            best_s = torch.where(better, s, best_s)
            best_pos = torch.where(better.unsqueeze(-1), pos, best_pos)
        if search_scale:  # least-squares refit of the scale for the chosen codes
            t = t_sorted[best_pos]
            wt = W * t if imp is None else imp * W * t
            tt = t * t if imp is None else imp * t * t
            num, den = wt.sum(-1), tt.sum(-1)
            ok = (den > 0) & (num > 0)
            s = torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), best_s).half().float()
            s = torch.where(s < FP16_MAX, s, best_s)
            e, pos = err_and_pos(W, s)
            better = (e < best_e) & ok
            best_s = torch.where(better, s, best_s)
            best_pos = torch.where(better.unsqueeze(-1), pos, best_pos)
        codes[r0:r0 + rows_per_chunk] = order[best_pos].reshape(-1, K).to(torch.uint8)
        scales[r0:r0 + rows_per_chunk] = best_s.half()
    return codes, scales
