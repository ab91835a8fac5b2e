"""Images whose loading differs between the official code and vLLM's defaults (alpha, EXIF orientation), and the
official conversion of mgm/serve/cli.py ``load_image``."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def transparent_png() -> bytes:
    """Left half opaque blue; right half fully transparent but storing red (what convert('RGB') shows)."""
    arr = np.zeros((70, 40, 4), dtype=np.uint8)
    arr[:, :20] = (30, 60, 200, 255)
    arr[:, 20:] = (255, 0, 0, 0)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGBA").save(buf, format="PNG")
    return buf.getvalue()


def rotated_jpeg() -> bytes:
    """A 40x70 JPEG whose EXIF says "rotate 90° clockwise to display" (orientation 6)."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (70, 40, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    return buf.getvalue()


def official(data: bytes) -> np.ndarray:
    """mgm/serve/cli.py load_image: Image.open(...).convert('RGB')."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
