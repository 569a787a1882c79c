"""Least-squares refits of a LUT-quantized layer with its codes held fixed, and the GPTQ / refit alternation
behind the "+refit" quantization methods (docs/quality.md).

With codes c (N x K), per-group scales s (N x K/g) and a table T (2^b values), W_hat[n, k] = T[c[n, k]] s[n, k/g]
is linear in T for fixed (c, s) and linear in s for fixed (c, T), so the output error tr((W - W_hat) H
(W - W_hat)^T) has closed-form minimisers in each:

    refit_table    the 2^b table values (one small normal-equation system per layer)
    refit_scales   every row's K/g scales (one K/g x K/g system per row), rounded to fp16
    gptq_refit     GPTQ onto the table, then `rounds` times: refit the table, refit the scales, re-pick the codes
                   with GPTQ at those fixed scales; returns the round with the least error (never worse than
                   plain GPTQ on the damped objective).

H here is the damped second-moment matrix GPTQ itself works with (H + damping I), which keeps the refits
from fitting the calibration sample more closely than GPTQ does.
"""
from __future__ import annotations

from typing import Tuple

import torch

from .gptq import dequant, gptq_quantize, output_error


def damped(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """H + percdamp * mean(diag H) * I (fp32)."""
    H = H.float()
    return H + percdamp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)


@torch.no_grad()
def refit_table(W: torch.Tensor, H: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                table: torch.Tensor, group_size: int) -> torch.Tensor:
    """The table minimising tr(E H E^T) for fixed codes and scales (fp32, 2^b values). Entries no weight uses
    keep their old value (a small ridge toward the old table keeps the system well posed)."""
    dev = H.device
    W, H = W.to(dev, torch.float32), H.to(dev, torch.float32)
    c = codes.to(dev).long()
    s = scales.to(dev).float().repeat_interleave(int(group_size), dim=1)
    T0 = torch.as_tensor(table, dtype=torch.float32, device=dev)
    V = T0.numel()
    A = [torch.where(c == v, s, torch.zeros_like(s)) for v in range(V)]  # W_hat = sum_v T_v A_v
    AH = [a @ H for a in A]
    G = torch.empty(V, V, dtype=torch.float64, device=dev)
    rhs = torch.empty(V, dtype=torch.float64, device=dev)
    for u in range(V):
        rhs[u] = float((AH[u] * W).sum())
        for v in range(u, V):
            G[u, v] = G[v, u] = float((AH[u] * A[v]).sum())
    ridge = 1e-6 * float(torch.diag(G).mean().clamp_min(1e-30))
    T = torch.linalg.solve(G + ridge * torch.eye(V, dtype=G.dtype, device=dev), rhs + ridge * T0.double())
    return T.float().cpu() if torch.isfinite(T).all() else T0.cpu()


@torch.no_grad()
def refit_scales(W: torch.Tensor, H: torch.Tensor, codes: torch.Tensor, table: torch.Tensor, group_size: int,
                 old_scales: torch.Tensor, rows_per_chunk: int = 16) -> torch.Tensor:
    """Per-row least-squares scales for fixed codes and table (fp16, N x K/g): row n solves
    (D^T H D) s = D^T H w with D[k, j] = T[c[n, k]] for k in group j. Rows whose system is singular keep
    `old_scales`."""
    dev = H.device
    N, K = W.shape
    g = int(group_size)
    ng = K // g
    W, H = W.to(dev, torch.float32), H.to(dev, torch.float32)
    Q = torch.as_tensor(table, dtype=torch.float32, device=dev)[codes.to(dev).long()]  # N x K
    HW = W @ H  # rows: H w_n
    out = old_scales.to(dev).float().clone()
    for r0 in range(0, N, rows_per_chunk):
        q = Q[r0:r0 + rows_per_chunk]
        n = q.shape[0]
        M = (q[:, :, None] * H[None] * q[:, None, :]).reshape(n, ng, g, ng, g).sum((2, 4)).double()
        b = (q * HW[r0:r0 + rows_per_chunk]).reshape(n, ng, g).sum(2).double()
        ridge = 1e-9 * torch.diagonal(M, dim1=1, dim2=2).mean(1).clamp_min(1e-30)
        M = M + ridge[:, None, None] * torch.eye(ng, dtype=M.dtype, device=dev)
        s, info = torch.linalg.solve_ex(M, b)
        ok = (info == 0) & torch.isfinite(s).all(1)
        out[r0:r0 + n][ok] = s[ok].float()
    return out.half().cpu()


def gptq_refit(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, table: torch.Tensor,
               percdamp: float = 0.01, rounds: int = 2, act_order: bool = False
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """GPTQ, then `rounds` of (refit table, refit scales, GPTQ with those scales fixed). Returns (codes uint8,
    scales fp16, table fp32, info) of the round with the least damped output error; info["errors"] lists the
    error of every round (round 0 = plain GPTQ)."""
    Hd = damped(H, percdamp)
    T = torch.as_tensor(table, dtype=torch.float32).cpu()
    codes, scales = gptq_quantize(W, H, bits, group_size, T, percdamp=percdamp, act_order=act_order)
    best = (output_error(W, dequant(codes, scales, T, group_size), Hd), codes, scales, T)
    errors = [best[0]]
    for _ in range(rounds):
        T = refit_table(W, Hd, codes, scales, T, group_size)
        scales = refit_scales(W, Hd, codes, T, group_size, scales)
        err = output_error(W, dequant(codes, scales, T, group_size), Hd)  # never above the last round's
        if err < best[0]:
            best = (err, codes, scales, T)
        codes, scales = gptq_quantize(W, H, bits, group_size, T, percdamp=percdamp, scales=scales,
                                      act_order=act_order)
        err = output_error(W, dequant(codes, scales, T, group_size), Hd)
        errors.append(err)
        if err < best[0]:
            best = (err, codes, scales, T)
    return best[1], best[2], best[3], {"errors": errors}
