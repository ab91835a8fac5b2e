"""Patch info mining exactly as the official code writes it (mgm_arch.py `encode_images` + `unified_resampler`).

Every step is the official one: upsample stages 1-3 to stage 0's size, concatenate into the C_aux-channel map,
cut it into N windows of M*M candidates, project *every* candidate to keys and values, softmax(q.k/sqrt(D)),
weighted sum. It materialises the full map and N*M*M keys and values: this is the yardstick, not a fast path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .contract import LN_EPS, MiningSpec, weight_name


def _upcast(x: torch.Tensor) -> torch.Tensor:
    # The official code interpolates in float32 (`x.float()`); float64 inputs stay float64 for exact tests.
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _projector(x: torch.Tensor, weights: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """Sequential(LayerNorm, Linear) with the official parameter names."""
    x = F.layer_norm(x, (x.shape[-1],), weights[weight_name(name, 0, "weight")].to(x.dtype),
                     weights[weight_name(name, 0, "bias")].to(x.dtype), LN_EPS)
    return F.linear(x, weights[weight_name(name, 1, "weight")].to(x.dtype),
                    weights[weight_name(name, 1, "bias")].to(x.dtype))


def concat_stages(hr_stages: list[torch.Tensor]) -> torch.Tensor:
    """The official multi-stage map: cat([s0, up(s1), up(s2), up(s3)]) at stage 0's resolution."""
    size = hr_stages[0].shape[-2:]
    ups = [hr_stages[0]] + [
        F.interpolate(_upcast(s), size=size, mode="bilinear", align_corners=False).to(s.dtype) for s in hr_stages[1:]
    ]
    return torch.cat(ups, dim=1)


def unified_resampler(x: torch.Tensor, aux: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """x: (n, N, C) low-res patches; aux: (n, C_aux, G*M, G*M) high-res map. Returns x + mined, (n, N, C)."""
    n, N, _ = x.shape
    G = int(N**0.5)
    M = aux.shape[-1] // G
    C_aux = aux.shape[1]
    # (n, C_aux, G*M, G*M) -> (n, G*G, M*M, C_aux): row-major windows, row-major pixels inside each window.
    win = aux.permute(0, 2, 3, 1).reshape(n, G, M, G, M, C_aux).permute(0, 1, 3, 2, 4, 5).reshape(n, G * G, M * M, C_aux)
    q = _projector(x, weights, "query")
    k = _projector(win, weights, "aux")
    v = _projector(win, weights, "val")
    att = q[:, :, None] @ (k.transpose(-1, -2) / k.shape[-1] ** 0.5)  # (n, N, 1, M*M)
    att = att.nan_to_num()
    mined = (att.softmax(-1) @ v).mean(2)
    return x + mined


def mine_reference(lr_feats: torch.Tensor, hr_stages: list[torch.Tensor], weights: dict[str, torch.Tensor],
                   spec: MiningSpec) -> torch.Tensor:
    B, V, N, C = lr_feats.shape
    g = spec.image_grid
    aux = concat_stages(hr_stages)
    if g == 1:
        return unified_resampler(lr_feats[:, 0], aux, weights)
    tile = spec.hr_size // g
    C_aux = aux.shape[1]
    # 2x2 (g x g) tiles of the high-res map, in the same row-major order as the low-res crops.
    tiles = aux.reshape(B, C_aux, g, tile, g, tile).permute(0, 2, 4, 1, 3, 5).reshape(B * g * g, C_aux, tile, tile)
    crops = unified_resampler(lr_feats[:, : g * g].reshape(B * g * g, N, C), tiles, weights).reshape(B, g * g * N, C)
    if not spec.image_global:
        return crops
    # The global view mines from the downsampled *feature map* (ConvNeXt is not re-run).
    aux_global = F.interpolate(_upcast(aux), scale_factor=1 / g, mode="bilinear", align_corners=False).to(aux.dtype)
    glob = unified_resampler(lr_feats[:, g * g], aux_global, weights)
    return torch.cat([glob, crops], dim=1)
