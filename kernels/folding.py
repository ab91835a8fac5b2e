"""The algebra the fast paths share: folded projections and bilinear footprints.

Folding (per low-res token i, window pixels j, h_j the C_aux-vector of the concatenated map):
  logit_ij = q_i . (W_k LN_k(h_j) + b_k) / sqrt(D)
           = (gamma_k * W_k^T q_i / sqrt(D)) . (h_j - mean_j) / std_j  +  terms constant in j
so the key projection becomes one (N x D) @ (D x C_aux) product per image, and the softmax only needs, per pixel,
u_i . h_j, sum(h_j) and sum(h_j^2). Since the softmax weights a_ij sum to 1,
  sum_j a_ij (W_v LN_v(h_j) + b_v) = W_v (gamma_v * (agg_i - shift_i)) + W_v beta_v + b_v,
  agg_i = sum_j (a_ij / std_j) h_j,   shift_i = sum_j a_ij mean_j / std_j,
so the value projection is one (N x C_aux) @ (C_aux x C) product instead of N*M*M of them.

Footprints: bilinear resampling (align_corners=False) is separable and linear, so window pixel (a, b) of a stage's
contribution is sum_{y,x} Ry[a, y] Rx[b, x] S[y, x] over a small footprint of stage pixels. The 1-d weights are
taken from torch's own interpolation of an identity matrix, so they are the reference's weights bit for bit.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .contract import LN_EPS, MiningSpec, weight_name

__all__ = ["Footprint", "WindowSet", "compute_dtype", "fold_queries", "footprints", "output_views",
           "project_values", "window_sets"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def output_views(lr_feats: torch.Tensor, spec: MiningSpec) -> torch.Tensor:
    """Processor order [crops..., global] -> official output order [global, crops...]."""
    if not spec.image_global:
        return lr_feats
    return torch.cat([lr_feats[:, spec.crops:], lr_feats[:, : spec.crops]], dim=1)


def _w(weights: dict[str, torch.Tensor], proj: str, idx: int, kind: str, dtype: torch.dtype) -> torch.Tensor:
    return weights[weight_name(proj, idx, kind)].to(dtype)


def fold_queries(x: torch.Tensor, weights: dict[str, torch.Tensor], spec: MiningSpec,
                 gemm_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (T, C) low-res tokens in compute dtype. Returns u (T, C_aux) with the key LayerNorm's gamma and the
    1/sqrt(D) scale folded in, and u.sum(-1) (T,), which multiplies each pixel's mean. gemm_dtype: run the two
    products in half precision on GPUs (fp32 accumulation), as the official code runs its projections."""
    dt, g = x.dtype, gemm_dtype or x.dtype
    q = F.layer_norm(x, (x.shape[-1],), _w(weights, "query", 0, "weight", dt), _w(weights, "query", 0, "bias", dt), LN_EPS)
    q = F.linear(q.to(g), _w(weights, "query", 1, "weight", g), _w(weights, "query", 1, "bias", g))
    u = (q @ _w(weights, "aux", 1, "weight", g)).to(dt) * (_w(weights, "aux", 0, "weight", dt) / spec.key_dim**0.5)
    return u.contiguous(), u.sum(-1)


def project_values(agg: torch.Tensor, shift: torch.Tensor, weights: dict[str, torch.Tensor],
                   gemm_dtype: torch.dtype | None = None) -> torch.Tensor:
    """W_v (gamma_v * (agg - shift) + beta_v) + b_v for all tokens in one GEMM."""
    dt, g = agg.dtype, gemm_dtype or agg.dtype
    w_v = _w(weights, "val", 1, "weight", dt)
    bias = w_v @ _w(weights, "val", 0, "bias", dt) + _w(weights, "val", 1, "bias", dt)
    y = ((agg - shift[:, None]) * _w(weights, "val", 0, "weight", dt)).to(g) @ w_v.to(g).t()
    return y.to(dt) + bias


@dataclass(frozen=True)
class Footprint:
    """One stage's separable resampling weights for every window row (or column) of one view kind."""

    weights: torch.Tensor  # (windows_per_axis, M, size) float64
    start: torch.Tensor  # (windows_per_axis,) int64: first stage row of each window's footprint
    size: int  # footprint side in stage pixels
    identity: bool  # window pixels are stage pixels (stage 0 of the crops): no resampling needed
    # pairs[d][w, a, y] = weights[w, a, y] * weights[w, a, y + d] for d < band, band being the most adjacent stage
    # pixels any window pixel reads (2 for an upsample, 3 for the global view's down-after-up): the weights of
    # sum_c h_c^2, which the torch path takes from products of neighbouring footprint pixels.
    pairs: tuple[torch.Tensor, ...]


def _linear_1d(n_in: int, **kwargs) -> torch.Tensor:
    """(n_out, n_in) matrix of torch's 1-d linear interpolation (align_corners=False)."""
    eye = torch.eye(n_in, dtype=torch.float64)[None]
    return F.interpolate(eye, mode="linear", align_corners=False, **kwargs)[0].t().contiguous()


@functools.lru_cache(maxsize=64)
def _footprint(stage_size: int, hr_size: int, window: int, downsample: int) -> Footprint:
    op = _linear_1d(stage_size, size=hr_size)  # stage -> stage-0 resolution, as the reference upsamples
    if downsample > 1:  # global view: the concatenated map is resized by 1/g
        op = _linear_1d(hr_size, scale_factor=1 / downsample) @ op
    n_win = op.shape[0] // window
    rows = op[: n_win * window].reshape(n_win, window, stage_size)
    nz = rows.abs().sum(1) > 0  # (n_win, stage_size): stage rows touched by each window
    first = nz.float().argmax(1)
    last = stage_size - 1 - nz.flip(1).float().argmax(1)
    size = int((last - first + 1).max())
    start = torch.clamp(first, max=stage_size - size)
    idx = start[:, None] + torch.arange(size)
    weights = torch.gather(rows, 2, idx[:, None, :].expand(n_win, window, size))
    # Every nonzero weight must lie inside the footprint, or the fast paths would drop a contribution.
    assert torch.allclose(weights.sum(-1), rows.sum(-1)), "footprint lost weight"
    identity = size == window and bool(torch.equal(weights, torch.eye(window, dtype=torch.float64).expand_as(weights)))
    taps = weights.reshape(-1, size) != 0
    cols = torch.arange(size).expand_as(taps)
    band = int((torch.where(taps, cols, -1).amax(1) - torch.where(taps, cols, size).amin(1)).max()) + 1
    pairs = tuple(weights[..., : size - d] * weights[..., d:] for d in range(band))
    return Footprint(weights=weights, start=start, size=size, identity=identity, pairs=pairs)


def footprints(spec: MiningSpec, global_view: bool) -> list[Footprint]:
    down = spec.image_grid if global_view else 1
    return [_footprint(s, spec.hr_size, spec.window, down) for s in spec.stage_sizes]


@dataclass(frozen=True)
class WindowSet:
    """The windows of one view kind: which output token, batch item, window row and column each one is."""

    global_view: bool
    token: torch.Tensor  # (n,) int64 row of the (B*V*N)-token output
    batch: torch.Tensor
    row: torch.Tensor  # window row in the map this view mines from (crops: the whole high-res map)
    col: torch.Tensor


@functools.lru_cache(maxsize=32)
def window_sets(spec: MiningSpec, device: torch.device) -> list[WindowSet]:
    B, V, G, g = spec.batch, spec.views, spec.grid, spec.image_grid
    first_crop = 1 if spec.image_global else 0
    b, r, c, wy, wx = torch.meshgrid(*(torch.arange(n) for n in (B, g, g, G, G)), indexing="ij")
    view = first_crop + r * g + c
    crop = WindowSet(False, (((b * V + view) * G + wy) * G + wx).flatten(), b.flatten(),
                     (r * G + wy).flatten(), (c * G + wx).flatten())
    sets = [crop]
    if spec.image_global:
        b, wy, wx = torch.meshgrid(*(torch.arange(n) for n in (B, G, G)), indexing="ij")
        sets.insert(0, WindowSet(True, ((b * V * G + wy) * G + wx).flatten(), b.flatten(), wy.flatten(), wx.flatten()))
    return [WindowSet(s.global_view, *(t.to(device) for t in (s.token, s.batch, s.row, s.col))) for s in sets]
