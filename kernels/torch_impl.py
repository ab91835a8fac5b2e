"""Fast PyTorch patch info mining: folded projections, stage-resolution footprints, chunked over windows.

Per window it gathers each stage's small footprint (never the upsampled C_aux-channel map), resamples it to the
M*M window pixels with the separable bilinear weights, and accumulates u.h, sum(h) and sum(h^2) stage by stage
(channels of different stages are disjoint, so the sums split). The aggregate sum_j w_j h_j is pushed back through
the same weights onto the footprint. Windows go in chunks so peak memory stays a few tens of MB at any size.
"""

from __future__ import annotations

import torch

from .contract import LN_EPS, MiningSpec
from .folding import (Footprint, WindowSet, compute_dtype, fold_queries, footprints, output_views,
                      project_values, window_sets)

CHUNK_BYTES = 32 << 20  # working-set budget per chunk of windows


def _chunk_windows(spec: MiningSpec, fps: list[Footprint], itemsize: int) -> int:
    M2 = spec.window**2
    per_window = sum(fp.size**2 * c + 2 * M2 * c for fp, c in zip(fps, spec.stage_channels)) * itemsize
    return max(1, CHUNK_BYTES // per_window)


def _mine_windows(stages: list[torch.Tensor], fps: list[Footprint], u: torch.Tensor, usum: torch.Tensor,
                  ws: WindowSet, sl: slice, spec: MiningSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (agg, shift) for the windows ws[sl]; stages are channels-last (B, H, W, C)."""
    dt = u.dtype
    b, row, col = ws.batch[sl], ws.row[sl], ws.col[sl]
    u = u[ws.token[sl]]
    n, M = b.shape[0], spec.window
    logit = torch.zeros(n, M, M, dtype=dt, device=u.device)
    s1, s2 = torch.zeros_like(logit), torch.zeros_like(logit)
    patches, resample = [], []
    off = 0
    for st, fp, C_s in zip(stages, fps, spec.stage_channels):
        ar = torch.arange(fp.size, device=u.device)
        ys = fp.start.to(u.device)[row][:, None] + ar
        xs = fp.start.to(u.device)[col][:, None] + ar
        P = st[b[:, None, None], ys[:, :, None], xs[:, None, :]].to(dt)  # (n, F, F, C_s)
        if fp.identity:
            h = P  # window pixels are stage pixels
            Ry = Rx = None
        else:
            wt = fp.weights.to(device=u.device, dtype=dt)
            Ry, Rx = wt[row], wt[col]  # (n, M, F)
            # Resample only this window: h[a, b] = sum_y,x Ry[a, y] Rx[b, x] P[y, x]
            h = torch.einsum("nay,nyxc->naxc", Ry, P)
            h = torch.einsum("nbx,naxc->nabc", Rx, h)
        us = u[:, off:off + C_s]
        logit += torch.einsum("nabc,nc->nab", h, us)
        s1 += h.sum(-1)
        s2 += (h * h).sum(-1)
        patches.append(P)
        resample.append((Ry, Rx))
        off += C_s
    C_aux = spec.aux_channels
    mean = s1 / C_aux
    rstd = torch.rsqrt((s2 / C_aux - mean * mean).clamp_min(0) + LN_EPS)
    logits = (rstd * (logit - mean * usum[ws.token[sl]][:, None, None])).reshape(n, M * M)
    a = logits.nan_to_num().softmax(-1).reshape(n, M, M)  # nan_to_num as the official code does
    w = a * rstd
    shift = (w * mean).sum((1, 2))
    aggs = []
    for P, (Ry, Rx) in zip(patches, resample):
        omega = w if Ry is None else Ry.transpose(1, 2) @ w @ Rx  # (n, F, F): weights pushed to stage pixels
        aggs.append(torch.einsum("nyx,nyxc->nc", omega, P))
    return torch.cat(aggs, -1), shift


def mine_torch(lr_feats: torch.Tensor, hr_stages: list[torch.Tensor], weights: dict[str, torch.Tensor],
               spec: MiningSpec) -> torch.Tensor:
    dt = compute_dtype(spec.dtype)
    x = output_views(lr_feats, spec).reshape(-1, spec.channels).to(dt)
    u, usum = fold_queries(x, weights, spec)
    agg = torch.empty(x.shape[0], spec.aux_channels, dtype=dt, device=x.device)
    shift = torch.empty(x.shape[0], dtype=dt, device=x.device)
    stages = [s.permute(0, 2, 3, 1) for s in hr_stages]  # gathers then read C contiguous pixels
    for ws in window_sets(spec, x.device):
        fps = footprints(spec, ws.global_view)
        step = _chunk_windows(spec, fps, torch.finfo(dt).bits // 8)
        for i in range(0, ws.token.shape[0], step):
            sl = slice(i, i + step)
            agg[ws.token[sl]], shift[ws.token[sl]] = _mine_windows(stages, fps, u, usum, ws, sl, spec)
    out = x + project_values(agg, shift, weights)
    return out.to(spec.dtype).reshape(spec.batch, spec.views * spec.tokens, spec.channels)
