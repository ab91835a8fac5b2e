"""engine.processor: parity with the HF CLIP processor, padding, LR/HR sizes, HD crop order, odd PIL inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from engine.config import MGMConfig, VisionGeometry
from engine.processor import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    PAD_COLOR,
    MGMImageProcessor,
    expand_to_square,
    to_rgb,
)

NORMAL = VisionGeometry(lr_size=56, patch_size=14, hr_size=128, image_grid=1, image_global=False)
HD = VisionGeometry(lr_size=56, patch_size=14, hr_size=256, image_grid=2, image_global=True)
MEAN = torch.tensor(OPENAI_CLIP_MEAN)[:, None, None]
STD = torch.tensor(OPENAI_CLIP_STD)[:, None, None]


def denorm(t: torch.Tensor) -> torch.Tensor:
    """Back to [0, 1] RGB."""
    return t * STD + MEAN


def rgb(rgb_tuple) -> torch.Tensor:
    return torch.tensor(rgb_tuple, dtype=torch.float32) / 255


def test_pad_color_is_truncated_clip_mean():
    assert PAD_COLOR == (122, 116, 104)


@pytest.mark.parametrize("size", [(40, 40), (57, 31), (31, 57)])
def test_hr_matches_hf_clip_image_processor(size):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    hf = CLIPImageProcessorPil(size={"shortest_edge": 128}, crop_size={"height": 128, "width": 128})
    # pad: HF processor applied to the official expand2square output
    ref = hf(expand_to_square(image, PAD_COLOR), return_tensors="pt")["pixel_values"][0]
    got = MGMImageProcessor(NORMAL).preprocess(image).pixel_values_aux
    assert got.dtype == torch.float32 and got.shape == (3, 128, 128)
    assert torch.allclose(got, ref, atol=1e-6)
    # any other image_aspect_ratio: no padding, shortest-edge resize + centre crop
    ref = hf(image, return_tensors="pt")["pixel_values"][0]
    got = MGMImageProcessor(NORMAL, pad=False).preprocess(image).pixel_values_aux
    assert torch.allclose(got, ref, atol=1e-6)


def test_padding_colour_and_centring():
    image = Image.new("RGB", (100, 20), (0, 0, 0))  # wide black bar → padded top and bottom
    hr = denorm(MGMImageProcessor(NORMAL).preprocess(image).pixel_values_aux)
    pad = rgb(PAD_COLOR)
    assert torch.allclose(hr[:, :10, :], pad[:, None, None].expand(3, 10, 128), atol=1e-6)  # top band
    assert torch.allclose(hr[:, -10:, :], pad[:, None, None].expand(3, 10, 128), atol=1e-6)  # bottom band
    assert hr[:, 60:68, :].abs().max() < 1e-6  # the bar sits in the middle rows
    # Odd padding: 2-px-high image in a 5-px square starts at row (5 - 2) // 2 = 1.
    small = expand_to_square(Image.new("RGB", (5, 2), (255, 255, 255)))
    column = [small.getpixel((0, y)) for y in range(5)]
    assert column == [PAD_COLOR, (255,) * 3, (255,) * 3, PAD_COLOR, PAD_COLOR]


def test_normal_sizes_and_lr_from_normalised_hr():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8))
    out = MGMImageProcessor(NORMAL)([image, image])
    assert out["pixel_values"].shape == (2, 1, 3, 56, 56)
    assert out["pixel_values_aux"].shape == (2, 3, 128, 128)
    hr = out["pixel_values_aux"][0]
    lr = F.interpolate(hr[None], size=(56, 56), mode="bilinear", align_corners=False)[0]
    assert torch.equal(out["pixel_values"][0, 0], lr)


def test_from_config_real_sizes():
    proc = MGMImageProcessor.from_config(MGMConfig(image_size_aux=1536, image_grid=2, image_global=True))
    out = proc.preprocess(Image.new("RGB", (300, 200), (10, 200, 30)))
    assert out.pixel_values.shape == (5, 3, 336, 336) and out.pixel_values_aux.shape == (3, 1536, 1536)
    assert MGMImageProcessor.from_config(MGMConfig(image_aspect_ratio="square")).pad is False


QUADRANTS = {(0, 0): (255, 0, 0), (0, 1): (0, 255, 0), (1, 0): (0, 0, 255), (1, 1): (255, 255, 0)}


def marker_image(side: int = 256) -> Image.Image:
    arr = np.zeros((side, side, 3), dtype=np.uint8)
    h = side // 2
    for (r, c), colour in QUADRANTS.items():
        arr[r * h:(r + 1) * h, c * h:(c + 1) * h] = colour
    return Image.fromarray(arr)


def test_hd_crop_order_is_row_major_then_global():
    out = MGMImageProcessor(HD).preprocess(marker_image())
    views = out.pixel_values
    assert views.shape == (5, 3, 56, 56) and out.pixel_values_aux.shape == (3, 256, 256)
    for i, (rc, colour) in enumerate(QUADRANTS.items()):
        centre = denorm(views[i])[:, 8:48, 8:48]  # away from the bilinear seam
        assert torch.allclose(centre, rgb(colour)[:, None, None].expand_as(centre), atol=1e-5), (i, rc)
    canvas = F.interpolate(out.pixel_values_aux[None], size=(112, 112), mode="bilinear", align_corners=False)
    glob = views[4]
    assert torch.equal(glob, F.interpolate(canvas, size=(56, 56), mode="bilinear", align_corners=False)[0])
    # bilinear ½ == 2×2 average pool (docs/mgm.md §2.3)
    assert torch.allclose(glob, F.avg_pool2d(canvas, 2)[0], atol=1e-6)
    # the global view sees all four quadrants, each in its own corner
    g = denorm(glob)
    for (r, c), colour in QUADRANTS.items():
        patch = g[:, r * 28 + 4:r * 28 + 24, c * 28 + 4:c * 28 + 24]
        assert torch.allclose(patch, rgb(colour)[:, None, None].expand_as(patch), atol=1e-5)


def test_global_without_grid():
    geometry = VisionGeometry(lr_size=56, patch_size=14, hr_size=128, image_grid=1, image_global=True)
    views = MGMImageProcessor(geometry).preprocess(marker_image(64)).pixel_values
    assert views.shape == (2, 3, 56, 56) and torch.allclose(views[0], views[1])


def _odd_images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(1)
    rgba = Image.fromarray(rng.integers(0, 256, (30, 20, 4), dtype=np.uint8), "RGBA")
    pal = Image.new("P", (17, 9), 3)
    pal.info["transparency"] = 3
    return {
        "1x1": Image.new("RGB", (1, 1), (255, 0, 0)),
        "10000x50": Image.new("RGB", (10000, 50), (0, 0, 255)),
        "50x10000": Image.new("L", (50, 10000), 200),
        "L": Image.fromarray(rng.integers(0, 256, (33, 21), dtype=np.uint8)),
        "P": pal,
        "RGBA": rgba,
        "LA": Image.new("LA", (8, 8), (100, 0)),
        "CMYK": Image.new("CMYK", (12, 7), (0, 255, 0, 0)),
        "I;16": Image.fromarray(np.full((9, 9), 65535, dtype=np.uint16)),
        "I": Image.fromarray(np.full((9, 9), 32768 * 257 // 257, dtype=np.int32)),
        "F": Image.fromarray(np.full((9, 9), 0.5, dtype=np.float32)),
        "1": Image.new("1", (7, 7), 1),
    }


@pytest.mark.parametrize("name", list(_odd_images()))
@pytest.mark.parametrize("geometry", [NORMAL, HD], ids=["normal", "hd"])
def test_odd_images(name, geometry):
    out = MGMImageProcessor(geometry).preprocess(_odd_images()[name])
    assert out.pixel_values.shape == (geometry.num_views, 3, 56, 56)
    assert out.pixel_values_aux.shape == (3, geometry.hr_size, geometry.hr_size)
    assert torch.isfinite(out.pixel_values).all() and torch.isfinite(out.pixel_values_aux).all()


def test_high_bit_depth_is_rescaled_not_clipped():
    white = to_rgb(Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)))
    grey = to_rgb(Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16)))  # 128 · 257
    half = to_rgb(Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)))
    assert white.getpixel((0, 0)) == (255, 255, 255)
    assert grey.getpixel((0, 0)) == (128, 128, 128)  # PIL's own convert would clip this to white
    assert half.getpixel((0, 0)) == (128, 128, 128)


def test_alpha_dropped_by_default_composited_on_request():
    # Fully transparent pixels that store red: the official convert('RGB') shows the red.
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert to_rgb(image).getpixel((0, 0)) == (255, 0, 0)
    assert to_rgb(image, background=(255, 255, 255)).getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert to_rgb(half, background=(255, 255, 255)).getpixel((0, 0)) == (127, 127, 127)
    pal = Image.new("P", (2, 2), 0)
    pal.putpalette([255, 0, 0] + [0, 0, 0] * 255)
    pal.info["transparency"] = 0
    assert to_rgb(pal, background=(0, 255, 0)).getpixel((0, 0)) == (0, 255, 0)
    assert to_rgb(pal).getpixel((0, 0)) == (255, 0, 0)
