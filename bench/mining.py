"""Random patch-info-mining inputs for the benchmarks and the kernel tests: the weight names are
`kernels.contract`'s, the sizes those of real MGM layouts (or any given ones)."""

from __future__ import annotations

import torch

from kernels.contract import PROJECTORS, weight_name

# name -> (B, image_grid, image_global, G, M, C, D, stage channels); ConvNeXt-L at 768 px and the HD 1536 px layout.
LAYOUTS = {
    "768px": (1, 1, False, 24, 8, 1024, 1024, (192, 384, 768, 1536)),
    "HD 1536px": (1, 2, True, 24, 8, 1024, 1024, (192, 384, 768, 1536)),
}


def mining_weights(channels: int, aux_channels: int, key_dim: int, *, generator: torch.Generator | None = None,
                   spread: float = 0.1, gain: float = 1.0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The twelve ``vlm_uni_*`` tensors: LayerNorms near identity (1 ± ``spread``), Linear weights of scale
    ``gain / sqrt(fan-in)`` (a larger gain makes the softmax sharper, so wrong logits show), small biases."""

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=dtype)

    out_widths = {"query": (channels, key_dim), "aux": (aux_channels, key_dim), "val": (aux_channels, channels)}
    w = {}
    for projector in PROJECTORS:
        width, out = out_widths[projector]
        w[weight_name(projector, 0, "weight")] = rnd(width) * spread + 1.0
        w[weight_name(projector, 0, "bias")] = rnd(width) * spread
        w[weight_name(projector, 1, "weight")] = rnd(out, width) * (gain / width**0.5)
        w[weight_name(projector, 1, "bias")] = rnd(out) * spread
    return w


def real_inputs(layout: str, dtype: torch.dtype, device: str, seed: int = 0, batch: int | None = None):  # type: ignore[no-untyped-def]
    """(lr_feats, hr_stages, weights, layout kwargs) of random values at a :data:`LAYOUTS` size; stage s at
    H0 / 2^s (the ConvNeXt strides) with growing scale and offset, like ConvNeXt's maps."""
    B, g, glob, G, M, C, D, chans = LAYOUTS[layout]
    B = batch or B
    gen = torch.Generator(device="cpu").manual_seed(seed)
    H0 = g * G * M
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731

    lr = cast(torch.randn(B, g * g + int(glob), G * G, C, generator=gen))
    stages = [cast(torch.randn(B, c, H0 >> s, H0 >> s, generator=gen) * (1 + s) + 0.1 * s) for s, c in enumerate(chans)]
    w = mining_weights(C, sum(chans), D, generator=gen, gain=2.0)
    return lr, stages, {k: cast(v) for k, v in w.items()}, dict(image_grid=g, image_global=glob)
