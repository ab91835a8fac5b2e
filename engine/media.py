"""How images reach MGM's processor: as the official loader sees them (docs/mgm.md §3.3).

The official code opens an image and calls ``convert('RGB')``: EXIF orientation tags are ignored and alpha is
dropped (transparent pixels keep whatever colour they store). vLLM prepares images twice before a model's
processor runs — its loader and its multimodal data parser both rotate by EXIF orientation and composite
transparent images over white. So the plugin brings its own parser (``engine.model.MGMDataParser``), which passes
every image through :func:`official_image`: an image that vLLM loaded from bytes is decoded again from those
original bytes, untouched; :func:`engine.processor.to_rgb` then converts it the official way. EXIF rotation is an opt-in
(``mgm engine --exif-rotate`` → :data:`EXIF_ROTATE_ENV`), read in the process that parses requests.

Only the standard library at import time (``mgm engine`` imports the names); PIL and vLLM are imported on use.
"""

from __future__ import annotations

import io
import os
from typing import Any

#: Set (1/true/yes/on) to rotate images by their EXIF orientation before the processor, as vLLM would.
EXIF_ROTATE_ENV = "MGM_EXIF_ROTATE"


def exif_rotation_enabled() -> bool:
    return os.environ.get(EXIF_ROTATE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def official_image(item: Any, rotate: bool) -> Any:
    """One image item as the processor should see it: vLLM's ``MediaWithBytes`` is decoded again from its original
    bytes (own mode, orientation as stored); a PIL image given directly (offline API) is taken as it is."""
    from PIL import Image, ImageOps
    from vllm.multimodal.media import MediaWithBytes

    if isinstance(item, MediaWithBytes) and isinstance(item.media, Image.Image):
        image = Image.open(io.BytesIO(item.original_bytes))
        image.load()
        if rotate:
            image = ImageOps.exif_transpose(image)
        # the cache key follows what the processor sees, not what vLLM's loader made of the bytes
        return MediaWithBytes(image, item.original_bytes, {"mgm_image": "exif" if rotate else "official"})
    if isinstance(item, Image.Image) and rotate:
        return ImageOps.exif_transpose(item)
    return item
