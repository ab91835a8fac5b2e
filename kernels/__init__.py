"""Patch info mining (Mini-Gemini §3.2, eq. 1): one contract, three implementations.

`mine_patches` returns x + mined for every low-res token, before the MLP projector, in the official token order
[global, crop(0,0), crop(0,1), ...]. impl: "reference" (the official formulation), "torch" (folded, chunked),
"triton" (fused kernel), "auto" (triton on CUDA, torch elsewhere).
"""

from __future__ import annotations

import torch

from .contract import MiningSpec, validate

IMPLS = ("auto", "reference", "torch", "triton")

__all__ = ["IMPLS", "MiningSpec", "mine_patches"]


def mine_patches(
    lr_feats: torch.Tensor,
    hr_stages: list[torch.Tensor],
    weights: dict[str, torch.Tensor],
    *,
    image_grid: int = 1,
    image_global: bool = False,
    impl: str = "auto",
) -> torch.Tensor:
    """lr_feats (B, V, N, C) in processor order [crops..., global]; hr_stages the 4 ConvNeXt stage maps
    (B, C_s, H_s, H_s); weights the `vlm_uni_{query,aux,val}_projector.{0,1}.{weight,bias}` tensors.
    Returns (B, V*N, C) in lr_feats' dtype."""
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    spec = validate(lr_feats, hr_stages, weights, image_grid, image_global)
    if impl == "auto":
        impl = "triton" if lr_feats.is_cuda else "torch"
    if impl == "reference":
        from .reference import mine_reference
        return mine_reference(lr_feats, list(hr_stages), weights, spec)
    if impl == "torch":
        from .torch_impl import mine_torch
        return mine_torch(lr_feats, list(hr_stages), weights, spec)
    from .triton_impl import mine_triton
    return mine_triton(lr_feats, list(hr_stages), weights, spec)
