"""Calibrated per-layer quantizers onto a LUT grid (the algorithms behind `lutmm.quality`).

Every function here works on one N x K weight W and the K x K input second-moment matrix H = sum_x x x^T
of its calibration activations, so that the output error of a dense layer is

    ||X W^T - X W_hat^T||^2 = tr((W - W_hat) H (W - W_hat)^T)          (`output_error`)

and returns logical (codes uint8 N x K, fp16 scales N x K/g) for `lutmm._api.pack`:

    gptq_quantize   GPTQ (Frantar et al. 2022) onto the table: columns left to right, each group's scale
                    chosen (scale search weighted by diag H) right before its columns are quantized, nearest
                    table entry per weight, the rounding error spread onto the columns not yet quantized
                    through the upper Cholesky factor of H^-1 (lazy batch updates, no act-order).
    learn_scales    "learned NormalFloat": the fp16 scales trained with Adam to minimise the output error,
                    codes re-picked (nearest) as the scales move, straight-through gradient; never worse
                    than its initialisation.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _core
from ._api import _DTYPE_CODE, _ptr, make_table, pack, quantize


def sorted_table(table: torch.Tensor, device=None):
    """(sorted values, decision midpoints, index of each sorted value in `table`) for nearest-entry search."""
    t = torch.as_tensor(table, dtype=torch.float32, device=device)
    vals, order = torch.sort(t)
    return vals, (vals[1:] + vals[:-1]) / 2, order


def nearest_codes(u: torch.Tensor, st) -> torch.Tensor:
    """Index into the table of the entry nearest to each element of u (st from `sorted_table`)."""
    vals, mids, order = st
    return order[torch.bucketize(u.contiguous(), mids)]


def output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W - W_hat) H (W - W_hat)^T), the summed squared output error over the calibration inputs."""
    E = W.float().to(H.device) - W_hat.float().to(H.device)  # W may be on the GPU, W_hat on the CPU
    return float(((E @ H) * E).sum())


def dequant(codes: torch.Tensor, scales: torch.Tensor, table: torch.Tensor, group_size: int) -> torch.Tensor:
    """W_hat = T[codes] * scales (fp32) from logical codes / scales."""
    t = torch.as_tensor(table, dtype=torch.float32, device=codes.device)
    return t[codes.long()] * scales.float().repeat_interleave(group_size, dim=1)


def rtn_codes(W: torch.Tensor, scales: torch.Tensor, table: torch.Tensor, group_size: int) -> torch.Tensor:
    """Nearest-entry codes of W for the given scales (uint8 N x K)."""
    s = scales.float().repeat_interleave(group_size, dim=1)
    s = torch.where(s == 0, torch.ones_like(s), s)
    return nearest_codes(W.float() / s, sorted_table(table, W.device)).to(torch.uint8)


def searched_scales(W: torch.Tensor, bits: int, group_size: int, table: torch.Tensor,
                    importance: Optional[torch.Tensor] = None, search: bool = True) -> torch.Tensor:
    """The C++ quantizer's per-group fp16 scales (search over shrink factors + refit, error weighted by
    `importance` per column), as fp32 on W's device."""
    qw = quantize(W.detach().float().cpu().contiguous(), bits, group_size, make_table(table, bits),
                  search_scale=search, importance=None if importance is None else importance.float().cpu())
    return qw.scales().float().to(W.device)


def weighted_kmeans(W: torch.Tensor, bits: int, group_size: int, importance: Optional[torch.Tensor] = None,
                    iterations: int = 8, inits=("nf", "int")):
    """Per-layer k-means table (Lloyd with the scale search, error weighted by `importance` per column) from
    each initial table in `inits`; returns the QuantizedWeight (table_kind "kmeans") with the least weighted
    squared error, so the learned table is never worse than the NF or the uniform grid it started from."""
    w = W.detach().float().cpu().contiguous()
    N, K = w.shape
    imp = None if importance is None else importance.detach().float().cpu().contiguous()
    wimp = torch.ones(K) if imp is None else imp
    best, best_err = None, float("inf")
    for init in inits:
        t = torch.tensor(_core.kmeans_table(_ptr(w, "weight"), _DTYPE_CODE[w.dtype], N, K, bits, group_size,
                                            make_table(init, bits).tolist(), iterations,
                                            0 if imp is None else _ptr(imp, "importance")), dtype=torch.float32)
        qw = quantize(w, bits, group_size, t, importance=imp)
        err = float(((dequant(qw.codes(), qw.scales(), qw.table, group_size) - w).pow(2) * wimp).sum())
        if err < best_err:
            best, best_err = qw, err
    return pack(best.codes(), best.scales(), best.table, bits, group_size, "kmeans")


def _damped_inverse_factor(H: torch.Tensor, percdamp: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(upper Cholesky factor of (H + damping)^-1, mask of dead columns with zero input energy)."""
    H = H.clone().double()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    damp = percdamp * torch.mean(torch.diag(H))
    H += damp * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for _ in range(6):  # increase the damping until H is numerically positive definite
        L, info = torch.linalg.cholesky_ex(H)
        if int(info) == 0:
            break
        H += damp * 9 * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
        damp *= 10
    Hinv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(Hinv, upper=True).float(), dead


@torch.no_grad()
def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, table: torch.Tensor,
                  percdamp: float = 0.01, blocksize: int = 128, scales: Optional[torch.Tensor] = None,
                  search: bool = True, act_order: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """GPTQ onto the LUT grid `table`. Returns (codes uint8 N x K, scales fp16 N x K/g) on the CPU.

    scales: optional fixed per-group scales (N x K/g); else each group's scale is searched (weighted by
    diag H) on the error-updated weights just before its columns are quantized.
    act_order: quantize columns in order of decreasing H_kk, with "static groups": every scale is chosen
    up front on the original W (scales or the weighted scale search)."""
    flush = torch.set_flush_denormal(True)  # denormal error updates make the column loop ~10x slower on CPUs
    try:
        return _gptq(W, H, bits, group_size, table, percdamp, blocksize, scales, search, act_order)
    finally:
        if flush:
            torch.set_flush_denormal(False)


def _gptq(W, H, bits, group_size, table, percdamp, blocksize, scales, search, act_order):
    N, K = W.shape
    g = int(group_size)
    dev = H.device
    W = W.detach().to(dev, torch.float32).clone()
    perm = torch.arange(K, device=dev)
    if act_order:
        if scales is None:
            scales = searched_scales(W, bits, g, table, torch.diag(H).float(), search)
        perm = torch.argsort(torch.diag(H), descending=True).to(dev)
        W, H = W[:, perm], H.to(dev)[perm][:, perm]
    group_of = perm // g
    U, dead = _damped_inverse_factor(H.to(dev), percdamp)
    W[:, dead] = 0
    hdiag = torch.diag(H).float().to(dev)
    st = sorted_table(table, dev)
    tvals = torch.as_tensor(table, dtype=torch.float32, device=dev)
    codes = torch.zeros(N, K, dtype=torch.long, device=dev)
    S = torch.zeros(N, K // g, dtype=torch.float32, device=dev)
    if scales is not None:
        S.copy_(scales.to(dev).half().float())
    B = max(blocksize // g, 1) * g  # blocks hold whole groups, so a group's scale sees all earlier updates
    for i1 in range(0, K, B):
        i2 = min(i1 + B, K)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            j = int(group_of[col])
            if col % g == 0 and scales is None:
                S[:, j] = searched_scales(W1[:, i:i + g], bits, g, tvals.cpu(), hdiag[col:col + g], search)[:, 0]
            s = S[:, j]
            s_safe = torch.where(s == 0, torch.ones_like(s), s)
            w = W1[:, i]
            c = nearest_codes(w / s_safe, st)
            codes[:, col] = c
            err = (w - tvals[c] * s) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    out = torch.empty_like(codes)
    out[:, perm] = codes
    return out.to(torch.uint8).cpu(), S.half().cpu()


def learn_scales(W: torch.Tensor, H: torch.Tensor, table: torch.Tensor, scales: torch.Tensor, group_size: int,
                 steps: int = 200, lr: float = 2e-3) -> Tuple[torch.Tensor, torch.Tensor, dict]:
    """Adam on log-scales minimising tr(E H E^T), E = W - T[nearest(W/s)] s; the codes are re-picked every
    step and the gradient goes straight through the code choice (d W_hat / d s = T[q]). Keeps the best step;
    returns (codes uint8, scales fp16, info) on the CPU, the initial scales' whenever training does not lower
    the error of the fp16-rounded scales."""
    dev = H.device
    g = int(group_size)
    W = W.detach().to(dev, torch.float32)
    Hn = H.to(dev).float() / max(float(torch.diag(H).mean()), 1e-30)
    st = sorted_table(table, dev)
    tvals = st[0][torch.argsort(st[2])]
    s0 = scales.to(dev).half().float().clamp_min(1e-8)

    def w_hat(s):
        se = s.repeat_interleave(g, dim=1)
        return tvals[nearest_codes((W / se).detach(), st)] * se

    def loss(Wh):
        E = W - Wh
        return ((E @ Hn) * E).sum()

    theta = torch.zeros_like(s0, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    best, best_theta = float("inf"), theta.detach().clone()
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            lval = loss(w_hat(s0 * torch.exp(theta)))
            if float(lval.detach()) < best:
                best, best_theta = float(lval.detach()), theta.detach().clone()
            lval.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        l0 = float(loss(w_hat(s0)))
        s1 = (s0 * torch.exp(best_theta)).half().float()
        l1 = float(loss(w_hat(s1)))
        s = s1 if l1 < l0 else s0
        codes = rtn_codes(W, s, tvals, g)
    return codes.cpu(), s.half().cpu(), {"loss_init": l0, "loss_final": min(l0, l1)}
