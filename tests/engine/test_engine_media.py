"""engine.media: vLLM's own loader and the plugin's data parser, run in-process, hand MGM's processor the pixels the
official code sees — no EXIF rotation (unless opted in), alpha dropped by ``convert('RGB')``, not composited on
white. vLLM's parser alone would do both, which the last test shows (so the others can fail)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from support.official_images import official, rotated_jpeg, transparent_png

from engine.media import EXIF_ROTATE_ENV
from engine.processor import to_rgb

media_image = pytest.importorskip("vllm.multimodal.media.image")
parse = pytest.importorskip("vllm.multimodal.parse")


def processor_sees(data: bytes, parser_cls: type) -> np.ndarray:
    """vLLM's loader with its defaults (RGB mode), a parser, then the processor's first step."""
    loaded = media_image.ImageMediaIO().load_bytes(data)
    items = parser_cls(expected_hidden_size=None).parse_mm_data({"image": [loaded]})["image"]
    return np.asarray(to_rgb(items.get(0)))


@pytest.fixture
def mgm_parser(monkeypatch):  # type: ignore[no-untyped-def]
    from engine.model import MGMDataParser

    monkeypatch.delenv(EXIF_ROTATE_ENV, raising=False)
    return MGMDataParser


def test_default_is_the_official_conversion(mgm_parser):
    png, jpeg = transparent_png(), rotated_jpeg()
    seen = processor_sees(png, mgm_parser)
    assert np.array_equal(seen, official(png)) and seen[0, 30].tolist() == [255, 0, 0]  # red where transparent
    seen = processor_sees(jpeg, mgm_parser)
    assert seen.shape == (70, 40, 3) and np.array_equal(seen, official(jpeg))  # the pixels as stored


def test_exif_rotation_is_an_opt_in(mgm_parser, monkeypatch):
    monkeypatch.setenv(EXIF_ROTATE_ENV, "1")
    jpeg = rotated_jpeg()
    expected = np.asarray(Image.open(io.BytesIO(jpeg)).transpose(Image.Transpose.ROTATE_270).convert("RGB"))
    assert np.array_equal(processor_sees(jpeg, mgm_parser), expected)
    assert processor_sees(transparent_png(), mgm_parser)[0, 30].tolist() == [255, 0, 0]  # alpha still official


def test_what_vllm_alone_would_hand_over():
    assert processor_sees(transparent_png(), parse.MultiModalDataParser)[0, 30].tolist() == [255, 255, 255]
    assert processor_sees(rotated_jpeg(), parse.MultiModalDataParser).shape == (40, 70, 3)
