"""Image preprocessing of MGM (docs/mgm.md §3.3), without torchvision or a transformers image processor.

One PIL image → an HR tensor ``(3, S, S)`` for the ConvNeXt (S = ``image_size_aux``) and LR views
``(V, 3, lr, lr)`` for CLIP (V = 1, or ``image_grid² + image_global`` for HD), all float32:

1. to RGB (see :func:`to_rgb` for the modes the official ``img.convert('RGB')`` gets wrong);
2. ``image_aspect_ratio == "pad"``: pad to a centred square with the CLIP mean colour (122, 116, 104);
3. resize the shortest edge to S with PIL bicubic, centre-crop S×S (a no-op after padding);
4. /255, OpenAI-CLIP mean/std → the HR tensor;
5. LR canvas = bilinear (align_corners=False, no antialias) resize of the *normalised* HR tensor to lr·g;
6. HD: g×g crops in row-major order, then a global view = bilinear resize of the canvas to lr.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from engine.config import VisionGeometry

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: ``tuple(int(x * 255) for x in OPENAI_CLIP_MEAN)`` — truncation, as the official expand2square call.
PAD_COLOR = tuple(int(m * 255) for m in OPENAI_CLIP_MEAN)
PIL_BICUBIC = Image.Resampling.BICUBIC  # == 3, the CLIPImageProcessor default

_HIGH_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")


def to_rgb(image: Image.Image, background: tuple[int, int, int] | None = None) -> Image.Image:
    """Convert any PIL mode to RGB.

    Default = official behaviour, ``image.convert("RGB")``: alpha is dropped, not composited, so fully transparent
    pixels show whatever colour they store. That is what the models were trained on, so it stays the default; pass
    ``background`` to alpha-composite over a colour instead (a serving choice, off the training distribution).

    Deliberate deviation: 16/32-bit integer and float modes are rescaled to 8 bits first. PIL's convert clips them
    (a 16-bit PNG becomes almost all white), which no caller wants. Integers above 255 are taken as 16-bit
    (÷257); floats with max ≤ 1 are taken as [0, 1] and scaled by 255, otherwise clipped to [0, 255].
    """
    if image.mode in _HIGH_BIT_MODES:
        arr = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            arr = arr * 255.0 if arr.size and np.nanmax(arr) <= 1.0 else arr
        elif arr.size and arr.max() > 255:
            arr = arr / 257.0
        arr = np.clip(np.nan_to_num(arr), 0, 255).round().astype(np.uint8)
        image = Image.fromarray(arr)  # 2-D uint8 → mode "L"
    if background is not None and ("A" in image.getbands() or "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def expand_to_square(image: Image.Image, color: tuple[int, int, int] = PAD_COLOR) -> Image.Image:
    """Pad to a square, image centred; the odd pixel of padding goes to the bottom/right (floor offset).

    As in the official code the canvas is max(W, H)² before resizing — 300 MB for a 10000×50 image. Resizing first
    and padding after would be cheaper but not bit-exact (bicubic mixes image and pad pixels at the border), so
    callers should bound input pixels instead.
    """
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), color)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def resize_shortest_edge_and_crop(image: Image.Image, size: int) -> Image.Image:
    """CLIPImageProcessor geometry: shortest edge → size (long edge truncated), then centre crop size×size."""
    width, height = image.size
    if width == height:
        return image.resize((size, size), resample=PIL_BICUBIC)
    short, long = (width, height) if width < height else (height, width)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if width < height else (new_long, size)
    image = image.resize((new_w, new_h), resample=PIL_BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def normalize(image: Image.Image, mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD) -> torch.Tensor:
    """uint8 HWC → float32 CHW, /255 then (x - mean) / std, with the dtypes of the HF image processor."""
    arr = (np.asarray(image, dtype=np.uint8).astype(np.float64) * (1 / 255)).astype(np.float32)
    arr = (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def lr_views(hr: torch.Tensor, geometry: VisionGeometry) -> torch.Tensor:
    """LR inputs ``(V, 3, lr, lr)`` from a normalised HR tensor ``(3, S, S)``: [crop00, crop01, …, (global)]."""
    lr, g = geometry.lr_size, geometry.image_grid
    canvas = F.interpolate(hr[None].float(), size=(lr * g, lr * g), mode="bilinear", align_corners=False)
    if g == 1 and not geometry.image_global:
        return canvas
    # (1, 3, g·lr, g·lr) → (g, g, 3, lr, lr) → row-major crops, the order the official CLI reshape produces.
    crops = canvas[0].reshape(3, g, lr, g, lr).permute(1, 3, 0, 2, 4).reshape(g * g, 3, lr, lr)
    views = [crops]
    if geometry.image_global:
        views.append(F.interpolate(canvas, size=(lr, lr), mode="bilinear", align_corners=False))
    return torch.cat(views, dim=0)


@dataclass(frozen=True)
class ProcessedImage:
    pixel_values: torch.Tensor  # (V, 3, lr, lr) CLIP views
    pixel_values_aux: torch.Tensor  # (3, S, S) ConvNeXt input


class MGMImageProcessor:
    """Callable preprocessing for one geometry; pure CPU, thread-safe (no state besides constants)."""

    def __init__(
        self,
        geometry: VisionGeometry,
        *,
        pad: bool = True,
        mean: Sequence[float] = OPENAI_CLIP_MEAN,
        std: Sequence[float] = OPENAI_CLIP_STD,
        background: tuple[int, int, int] | None = None,
    ) -> None:
        self.geometry = geometry
        self.pad = pad
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.background = background
        # The pad colour is derived from the mean, exactly as the official call does.
        self.pad_color = tuple(int(m * 255) for m in self.mean)

    @classmethod
    def from_config(cls, config, **kwargs) -> MGMImageProcessor:  # type: ignore[no-untyped-def]
        # Official: "pad" pads; every other value goes straight to the CLIP processor (resize + centre crop).
        return cls(VisionGeometry.from_config(config), pad=config.image_aspect_ratio == "pad", **kwargs)

    def preprocess(self, image: Image.Image) -> ProcessedImage:
        image = to_rgb(image, self.background)
        if self.pad:
            image = expand_to_square(image, self.pad_color)  # type: ignore[arg-type]
        image = resize_shortest_edge_and_crop(image, self.geometry.hr_size)
        hr = normalize(image, self.mean, self.std)
        return ProcessedImage(pixel_values=lr_views(hr, self.geometry), pixel_values_aux=hr)

    def __call__(self, images: Image.Image | Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """Batch: ``pixel_values (B, V, 3, lr, lr)``, ``pixel_values_aux (B, 3, S, S)``."""
        if isinstance(images, Image.Image):
            images = [images]
        done = [self.preprocess(im) for im in images]
        return {
            "pixel_values": torch.stack([d.pixel_values for d in done]),
            "pixel_values_aux": torch.stack([d.pixel_values_aux for d in done]),
        }
