"""The argument contract of `mine_patches`, checked once for every implementation.

Shapes (see docs/mgm.md §2): `lr_feats` (B, V, N, C) with N = G² CLIP patches per low-res view, V = g² (+1 with a
global view); `hr_stages` four ConvNeXt maps (B, C_s, H_s, H_s) of one high-res image whose stage-0 side is
H0 = g·G·M (M×M high-res pixels per low-res patch); `weights` the official `vlm_uni_*` tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PROJECTORS = ("query", "aux", "val")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LN_EPS = 1e-5  # nn.LayerNorm default, used by all three vlm_uni projectors


@dataclass(frozen=True)
class MiningSpec:
    """Sizes derived from validated arguments."""

    batch: int
    views: int  # V: crops (+ global) per image, in processor order
    tokens: int  # N = G*G per view
    grid: int  # G
    window: int  # M: high-res pixels per low-res patch side
    channels: int  # C: CLIP width (and output width)
    key_dim: int  # D: width of projected queries and keys; the logit scale is 1/sqrt(D)
    stage_channels: tuple[int, ...]
    stage_sizes: tuple[int, ...]
    image_grid: int  # g
    image_global: bool
    dtype: torch.dtype

    @property
    def aux_channels(self) -> int:
        return sum(self.stage_channels)

    @property
    def hr_size(self) -> int:
        return self.stage_sizes[0]

    @property
    def crops(self) -> int:
        return self.image_grid * self.image_grid


def weight_name(projector: str, index: int, kind: str) -> str:
    return f"vlm_uni_{projector}_projector.{index}.{kind}"


def _fail(msg: str) -> None:
    raise ValueError(msg)


def validate(
    lr_feats: torch.Tensor,
    hr_stages: list[torch.Tensor] | tuple[torch.Tensor, ...],
    weights: dict[str, torch.Tensor],
    image_grid: int,
    image_global: bool,
) -> MiningSpec:
    if not isinstance(lr_feats, torch.Tensor) or lr_feats.dim() != 4:
        _fail(f"lr_feats: expected a 4-d tensor (B, V, N, C), got {getattr(lr_feats, 'shape', type(lr_feats))}")
    if lr_feats.dtype not in FLOAT_DTYPES:
        _fail(f"lr_feats: dtype {lr_feats.dtype} is not a floating type (fp16, bf16, fp32, fp64)")
    B, V, N, C = lr_feats.shape
    if not isinstance(image_grid, int) or image_grid < 1:
        _fail(f"image_grid: expected a positive int, got {image_grid!r}")
    if image_global and image_grid < 2:
        _fail("image_global: a global view needs image_grid >= 2 (it is the whole image next to the crops)")
    expected_views = image_grid * image_grid + int(bool(image_global))
    if V != expected_views:
        _fail(
            f"lr_feats: dim 1 (views) is {V}, expected {expected_views} for image_grid={image_grid}, "
            f"image_global={image_global}"
        )
    G = math.isqrt(N)
    if N < 1 or G * G != N:
        _fail(f"lr_feats: dim 2 (patches per view) is {N}, which is not a square grid")

    if not isinstance(hr_stages, (list, tuple)) or len(hr_stages) != 4:
        _fail(f"hr_stages: expected a list of the 4 ConvNeXt stage outputs, got {type(hr_stages).__name__} "
              f"of length {len(hr_stages) if isinstance(hr_stages, (list, tuple)) else 'n/a'}")
    stage_channels, stage_sizes = [], []
    for s, st in enumerate(hr_stages):
        name = f"hr_stages[{s}]"
        if not isinstance(st, torch.Tensor) or st.dim() != 4:
            _fail(f"{name}: expected a 4-d tensor (B, C, H, W), got {getattr(st, 'shape', type(st))}")
        if st.dtype != lr_feats.dtype:
            _fail(f"{name}: dtype {st.dtype} differs from lr_feats dtype {lr_feats.dtype}")
        if st.device != lr_feats.device:
            _fail(f"{name}: device {st.device} differs from lr_feats device {lr_feats.device}")
        if st.shape[0] != B:
            _fail(f"{name}: dim 0 (batch) is {st.shape[0]}, expected {B} as in lr_feats")
        if st.shape[2] != st.shape[3]:
            _fail(f"{name}: dims 2, 3 are {st.shape[2]}x{st.shape[3]}; stage maps must be square (padded images)")
        stage_channels.append(int(st.shape[1]))
        stage_sizes.append(int(st.shape[2]))
    H0 = stage_sizes[0]
    if H0 % (image_grid * G) != 0:
        _fail(
            f"hr_stages[0]: dim 2 (height) is {H0}, not a multiple of image_grid*sqrt(N) = {image_grid * G}; "
            "each low-res patch must cover a whole M x M high-res window"
        )
    M = H0 // (image_grid * G)
    C_aux = sum(stage_channels)

    def check(projector: str, index: int, kind: str, shape: tuple[int, ...]) -> torch.Tensor:
        key = weight_name(projector, index, kind)
        if key not in weights:
            _fail(f"weights: missing key {key!r}")
        w = weights[key]
        if not isinstance(w, torch.Tensor):
            _fail(f"weights[{key!r}]: expected a tensor, got {type(w).__name__}")
        if tuple(w.shape) != shape:
            _fail(f"weights[{key!r}]: shape {tuple(w.shape)}, expected {shape}")
        if w.dtype not in FLOAT_DTYPES:
            _fail(f"weights[{key!r}]: dtype {w.dtype} is not a floating type")
        if w.device != lr_feats.device:
            _fail(f"weights[{key!r}]: device {w.device} differs from lr_feats device {lr_feats.device}")
        return w

    wq = weights.get(weight_name("query", 1, "weight"))
    if not isinstance(wq, torch.Tensor) or wq.dim() != 2:
        _fail(f"weights: {weight_name('query', 1, 'weight')!r} must be a 2-d Linear weight (D, C)")
    D = int(wq.shape[0])
    for proj, width, out in (("query", C, D), ("aux", C_aux, D), ("val", C_aux, C)):
        check(proj, 0, "weight", (width,))
        check(proj, 0, "bias", (width,))
        check(proj, 1, "weight", (out, width))
        check(proj, 1, "bias", (out,))

    return MiningSpec(
        batch=B, views=V, tokens=N, grid=G, window=M, channels=C, key_dim=D,
        stage_channels=tuple(stage_channels), stage_sizes=tuple(stage_sizes),
        image_grid=image_grid, image_global=bool(image_global), dtype=lr_feats.dtype,
    )
