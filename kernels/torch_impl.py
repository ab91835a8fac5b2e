"""Fast PyTorch patch info mining: folded projections, stage-resolution footprints, chunked over windows.

Per window it gathers each stage's small footprint (never the upsampled C_aux-channel map) and accumulates u.h,
sum(h) and sum(h^2) of the M*M window pixels stage by stage (channels of different stages are disjoint, so the sums
split). None of them needs the resampled pixels h: the first two are linear, so the footprint pixels are reduced
over channels first and the scalars resampled; sum(h^2) is a quadratic form in products of neighbouring footprint
pixels. The aggregate sum_j w_j h_j is pushed back through the same weights onto the footprint. Windows go in chunks
so peak memory stays a few tens of MB at any size.
"""

from __future__ import annotations

import torch

from .contract import LN_EPS, MiningSpec
from .folding import (Footprint, WindowSet, compute_dtype, fold_queries, footprints, output_views,
                      project_values, window_sets)

CHUNK_BYTES = 32 << 20  # working-set budget per chunk of windows


def _chunk_windows(spec: MiningSpec, fps: list[Footprint], itemsize: int) -> int:
    per_window = sum(fp.size**2 * (c + 2) for fp, c in zip(fps, spec.stage_channels)) * itemsize
    return max(1, CHUNK_BYTES // per_window)


def _offsets(band: int) -> list[tuple[int, int]]:
    """(dy, dx) from a stage pixel to the neighbours it can share a window pixel's taps with, one of each +/- pair:
    (0, 0) first, then the rest, which the quadratic form counts twice."""
    return [(0, dx) for dx in range(band)] + [(dy, dx) for dy in range(1, band) for dx in range(1 - band, band)]


class PairMaps:
    """Per stage pixel, its channel sum and its dot products with the neighbours of ``_offsets(band)``:
    maps[k, b, y, x] = <S[y, x], S[y + dy, x + dx]> for the k-th offset, and maps[-1] = sum(S[y, x]) (offset-major,
    so each gathered map is contiguous in its pixels for the small products that resample it)

    sum_c h_c^2 at a window pixel, h = Ry P Rx^T per channel, is the quadratic form sum Ry[a,y] Ry[a,y'] Rx[b,x]
    Rx[b,x'] <P[y,x], P[y',x']>, whose weights vanish unless |y-y'|, |x-x'| < band; these dot products are computed
    once per stage pixel rather than once per window footprint holding it (footprints overlap 2-9x)."""

    def __init__(self, stage: torch.Tensor, band: int, dtype: torch.dtype) -> None:
        B, H, W, C = stage.shape  # channels-last view
        self.index = {o: k for k, o in enumerate(_offsets(band))}
        self.maps = torch.zeros(len(self.index) + 1, B, H, W, dtype=dtype, device=stage.device)
        rows = max(1, CHUNK_BYTES // (2 * B * W * C * dtype.itemsize))
        for r0 in range(0, H, rows):
            h = min(rows, H - r0)
            block = stage[:, r0:r0 + h + band - 1].to(dtype)  # the slab and the rows its offsets reach
            a = block[:, :h]
            self.maps[-1, :, r0:r0 + h] = a.sum(-1)
            for (dy, dx), k in self.index.items():
                hv, e = min(h, block.shape[1] - dy), abs(dx)
                if dx >= 0:
                    self.maps[k, :, r0:r0 + hv, : W - e] = torch.linalg.vecdot(a[:, :hv, : W - e], block[:, dy:dy + hv, e:])
                else:
                    self.maps[k, :, r0:r0 + hv, e:] = torch.linalg.vecdot(a[:, :hv, e:], block[:, dy:dy + hv, : W - e])


def _square_sums(Q: torch.Tensor, pm: PairMaps, fp: Footprint, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """sum_c h_c^2 at every window pixel from the footprint's gathered pair maps Q (K + 1, n, F, F)."""
    F_ = fp.size
    pairs = [p.to(device=Q.device, dtype=Q.dtype) for p in fp.pairs]
    s2 = None
    for dy, dx in _offsets(len(pairs)):
        e = abs(dx)
        q = Q[pm.index[(dy, dx)]]
        q = q[:, : F_ - dy, : F_ - e] if dx >= 0 else q[:, : F_ - dy, e:]
        term = pairs[dy][row] @ q @ pairs[e][col].mT
        s2 = term if s2 is None else s2.add_(term, alpha=1.0 if (dy, dx) == (0, 0) else 2.0)
    assert s2 is not None
    return s2


def _mine_windows(stages: list[torch.Tensor], pair_maps: list[PairMaps], fps: list[Footprint], u: torch.Tensor,
                  usum: torch.Tensor, ws: WindowSet, sl: slice, spec: MiningSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (agg, shift) for the windows ws[sl]; stages are channels-last (B, H, W, C).

    Products come before resampling: u.h and sum(h) are linear in the footprint pixels, so each footprint pixel is
    reduced over its channels first and only those scalars are resampled to the M*M window pixels."""
    dt = u.dtype
    b, row, col = ws.batch[sl], ws.row[sl], ws.col[sl]
    u = u[ws.token[sl]]
    n, M = b.shape[0], spec.window
    logit = torch.zeros(n, M, M, dtype=dt, device=u.device)
    s1, s2 = torch.zeros_like(logit), torch.zeros_like(logit)
    patches, resample = [], []
    off = 0
    for st, pm, fp, C_s in zip(stages, pair_maps, fps, spec.stage_channels):
        F_ = fp.size
        ar = torch.arange(F_, device=u.device)
        at = (b[:, None, None], (fp.start.to(u.device)[row][:, None] + ar)[:, :, None],
              (fp.start.to(u.device)[col][:, None] + ar)[:, None, :])
        P = st[at].to(dt)  # (n, F, F, C_s)
        Q = pm.maps[(slice(None), *at)]  # (K + 1, n, F, F)
        dots = (P.flatten(1, 2) @ u[:, off:off + C_s, None]).view(n, F_, F_)
        if fp.identity:
            Ry = Rx = None
            logit += dots
            s1 += Q[-1]
            s2 += Q[pm.index[(0, 0)]]
        else:
            wt = fp.weights.to(device=u.device, dtype=dt)
            Ry, Rx = wt[row], wt[col]  # (n, M, F)
            logit += Ry @ dots @ Rx.mT
            s1 += Ry @ Q[-1] @ Rx.mT
            s2 += _square_sums(Q, pm, fp, row, col)
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
        omega = w if Ry is None else Ry.mT @ w @ Rx  # (n, F, F): weights pushed to stage pixels
        aggs.append((omega.flatten(1)[:, None] @ P.flatten(1, 2)).squeeze(1))
    return torch.cat(aggs, -1), shift


def mine_torch(lr_feats: torch.Tensor, hr_stages: list[torch.Tensor], weights: dict[str, torch.Tensor],
               spec: MiningSpec) -> torch.Tensor:
    dt = compute_dtype(spec.dtype)
    x = output_views(lr_feats, spec).reshape(-1, spec.channels).to(dt)
    # Half inputs: the two projections run as half GEMMs (fp32 accumulation), like the official half path; on the CPU
    # only in bf16, which oneDNN runs several times faster than fp32 (fp16 it does not).
    gemm = spec.dtype if spec.dtype == torch.bfloat16 or (spec.dtype == torch.float16 and x.is_cuda) else None
    u, usum = fold_queries(x, weights, spec, gemm)
    agg = torch.empty(x.shape[0], spec.aux_channels, dtype=dt, device=x.device)
    shift = torch.empty(x.shape[0], dtype=dt, device=x.device)
    stages = [s.permute(0, 2, 3, 1) for s in hr_stages]  # gathers then read C contiguous pixels
    sets = [(ws, footprints(spec, ws.global_view)) for ws in window_sets(spec, x.device)]
    bands = [max(len(fps[s].pairs) for _, fps in sets) for s in range(len(stages))]
    pair_maps = [PairMaps(st, band, dt) for st, band in zip(stages, bands)]
    for ws, fps in sets:
        step = _chunk_windows(spec, fps, dt.itemsize)
        for i in range(0, ws.token.shape[0], step):
            sl = slice(i, i + step)
            agg[ws.token[sl]], shift[ws.token[sl]] = _mine_windows(stages, pair_maps, fps, u, usum, ws, sl, spec)
    out = x + project_values(agg, shift, weights, gemm)
    return out.to(spec.dtype).reshape(spec.batch, spec.views * spec.tokens, spec.channels)
