"""ConvNeXt high-resolution ("aux") tower of MGM as a plain, deterministic torch module.

The official tower is timm ``convnext_large`` built through open_clip, of which MGM keeps only ``stem`` and
``stages`` (docs/mgm.md §3.1). It is re-implemented here so that (a) no timm/open_clip is needed, (b) parameter names
equal the checkpoint keys after ``model.vision_tower_aux.`` and load with a plain ``load_state_dict``, and (c) it is
always the eval-mode network: the official code leaves DropPath active at inference (docs/mgm.md §3.4); its
expectation is exactly this module without drop path.

``forward`` returns the four stage outputs separately. The official code upsamples and concatenates them into one
2880-channel map (849 MB per HD image in fp16); the patch-info-mining kernels consume the stages directly instead.

On the CPU (float32, and bfloat16 where oneDNN has it) the blocks run channels-last through oneDNN's fused
linear + GELU, the op PyTorch's own compiler emits for this pattern, and write the layer-scaled residual in place
of a separate multiply, add and two permute copies: same math, ~2.5x less time at stage 0 in bf16 (BENCHMARKS.md).
Elsewhere (CUDA, float64) they run the plain formulation, which ``use_onednn(False)`` also forces.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

LN_EPS = 1e-6  # timm ConvNeXt uses 1e-6 for every norm
# The block MLP is pointwise, so it runs in slabs of rows: its 4x-wide hidden activations would otherwise set the
# tower's peak memory (768 x 384 x 384 values per HD image at stage 0). 4096 rows keep a stage-0 slab's hidden
# activations near the CPU's L2 for fc2 to read back: the HD tower ~10 % faster than 16384 rows in bf16, 768 px ~5 %.
PIXELS_PER_SLAB = 4096


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of an NCHW tensor (timm ``LayerNorm2d``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf) GELU, as timm
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def onednn_fusable(x: torch.Tensor) -> bool:
    """Whether oneDNN's fused linear-pointwise ops serve this tensor: CPU, float32, or bfloat16 on a CPU oneDNN runs
    bf16 on (AVX-512 or AMX), with autograd off (the ops have no backward; inference always runs without grad);
    float64 and CUDA tensors take the plain path."""
    if x.device.type != "cpu" or torch.is_grad_enabled() or not torch.backends.mkldnn.is_available():
        return False
    if x.dtype == torch.float32:
        return True
    return x.dtype == torch.bfloat16 and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class ConvNeXtBlock(nn.Module):
    """dw7×7 conv → channels-last LN → MLP(4×) → layer scale → residual. No drop path (eval semantics)."""

    def __init__(self, dim: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.onednn = True  # fused CPU path where onednn_fusable (not a parameter: the state_dict is the checkpoint's)
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, mlp_ratio * dim)
        # Layer scale; the checkpoint key is a bare "gamma" (timm stores it as a parameter, not a module).
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.onednn and onednn_fusable(x):
            return self._forward_onednn(x)
        shortcut = x
        y = self.conv_dw(x).permute(0, 2, 3, 1)  # NHWC so LN and the MLP act on channels
        B, H, W, _ = y.shape
        rows = max(1, PIXELS_PER_SLAB // (B * W))
        if rows >= H:
            out = self.mlp(self.norm(y)) * self.gamma
        else:
            out = torch.empty(y.shape, dtype=y.dtype, device=y.device)
            for r in range(0, H, rows):
                out[:, r:r + rows] = self.mlp(self.norm(y[:, r:r + rows])) * self.gamma
        return out.permute(0, 3, 1, 2) + shortcut

    def _forward_onednn(self, x: torch.Tensor) -> torch.Tensor:
        """The same block on channels-last maps, whose pixels are rows of one (P, C) matrix: LN, fc1 with GELU fused
        by oneDNN, fc2, and ``shortcut + gamma * y`` written straight into the output, slab by slab of rows."""
        x = x.contiguous(memory_format=torch.channels_last)
        C = x.shape[1]
        y = self.conv_dw(x).contiguous(memory_format=torch.channels_last)
        pixels = y.numel() // C
        rows = y.permute(0, 2, 3, 1).reshape(pixels, C)  # views: channels-last memory is (P, C) row-major
        shortcut = x.permute(0, 2, 3, 1).reshape(pixels, C)
        out = torch.empty_like(x, memory_format=torch.channels_last)
        out_rows = out.permute(0, 2, 3, 1).reshape(pixels, C)
        fc1, fc2, norm = self.mlp.fc1, self.mlp.fc2, self.norm
        for r in range(0, pixels, PIXELS_PER_SLAB):
            sl = slice(r, r + PIXELS_PER_SLAB)
            h = F.layer_norm(rows[sl], norm.normalized_shape, norm.weight, norm.bias, norm.eps)
            h = torch.ops.mkldnn._linear_pointwise(h, fc1.weight, fc1.bias, "gelu", [], "none")  # exact (erf) GELU
            torch.addcmul(shortcut[sl], F.linear(h, fc2.weight, fc2.bias), self.gamma, out=out_rows[sl])
        return out


class ConvNeXtStage(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, depth: int, downsample: bool) -> None:
        super().__init__()
        # Stage 0 keeps the stem resolution; later stages halve it. timm puts an Identity there, which has no
        # parameters, so leaving the attribute out keeps the state_dict identical to the checkpoint.
        self.downsample: nn.Module | None = (
            nn.Sequential(LayerNorm2d(in_dim, eps=LN_EPS), nn.Conv2d(in_dim, out_dim, kernel_size=2, stride=2))
            if downsample
            else None
        )
        self.blocks = nn.Sequential(*(ConvNeXtBlock(out_dim) for _ in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        return self.blocks(x)


class ConvNeXtTower(nn.Module):
    """Stem + stages of ConvNeXt; ``forward`` → list of stage outputs ``(B, C_s, H/2^(s+2), W/2^(s+2))``."""

    def __init__(self, depths: Sequence[int], dims: Sequence[int], in_chans: int = 3) -> None:
        super().__init__()
        if len(depths) != len(dims) or not depths:
            raise ValueError(f"depths {list(depths)} and dims {list(dims)} must be non-empty and of equal length")
        self.depths = tuple(depths)
        self.dims = tuple(dims)
        self.vision_stem = nn.Sequential(
            nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0], eps=LN_EPS)
        )
        self.vision_stages = nn.ModuleList(
            ConvNeXtStage(dims[max(s - 1, 0)], dims[s], depths[s], downsample=s > 0) for s in range(len(dims))
        )
        self.onednn = True  # see use_onednn
        self.eval()  # inference-only module; there is no stochastic layer, but keep the contract explicit

    def use_onednn(self, enabled: bool) -> ConvNeXtTower:
        """Turn the fused CPU block path on (the default) or off (the plain formulation, as timm computes it)."""
        self.onednn = enabled
        for module in self.modules():
            if isinstance(module, ConvNeXtBlock):
                module.onednn = enabled
        return self

    @classmethod
    def from_config(cls, config) -> ConvNeXtTower:  # type: ignore[no-untyped-def]
        """Build from an MGM config (``vision_aux_config`` or ConvNeXt-L)."""
        spec = config.convnext_spec()
        return cls(spec.depths, spec.dims)

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        x = pixels.to(self.vision_stem[0].weight.dtype)
        if self.onednn and onednn_fusable(x):
            x = x.contiguous(memory_format=torch.channels_last)  # so stem, norms and downsamples stay channels-last
        x = self.vision_stem(x)
        outputs = []
        for stage in self.vision_stages:
            x = stage(x)
            outputs.append(x)
        return outputs
