"""The input images of ``POST /v1/images/edits``: uploads (multipart) or URLs / data URLs (JSON), read under the same
size, pixel and SSRF rules as chat images (:mod:`server.gateway.image_fetch`), PNG/JPEG/WebP only; and the mask
checks (a PNG with an alpha channel, the first image's size: OpenAI's rule, whose fully transparent pixels are the
ones to repaint)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from pydantic import ValidationError
from python_multipart.exceptions import MultipartParseError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from server.errors import APIError, validation_error
from server.gateway.config import ImagePolicy
from server.gateway.image_fetch import Resolver, decode_data_url, describe_image, fetch_bytes
from server.gateway.protocol import ImageEditRequest, ImageReference

#: What SDXL's img2img/inpainting take (and what OpenAI's edits accept).
EDIT_TYPES = ("image/png", "image/jpeg", "image/webp")


@dataclass(frozen=True)
class InputImage:
    data: bytes
    mime: str
    width: int
    height: int

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    def b64(self) -> str:
        return base64.b64encode(self.data).decode("ascii")

    def data_url(self) -> str:
        return f"data:{self.mime};base64,{self.b64()}"


def edit_policy(policy: ImagePolicy) -> ImagePolicy:
    return dataclasses.replace(policy, content_types=EDIT_TYPES)


async def load_image(value: bytes | str, param: str, policy: ImagePolicy, resolver: Resolver) -> InputImage:
    """An upload's bytes, or a ``data:`` / ``http(s)`` URL, checked under ``policy``; errors name ``param``."""
    try:
        if isinstance(value, str):
            if value[:5].lower() == "data:":
                data = await asyncio.to_thread(decode_data_url, value, policy)  # base64 of MBs: off the loop
            elif value[:7].lower() == "http://" or value[:8].lower() == "https://":
                data = await fetch_bytes(value, policy, resolver)
            else:
                raise APIError(400, "Images must be uploaded files, data: URLs or http(s) URLs.",
                               code="invalid_image")
        else:
            if len(value) > policy.max_bytes:
                raise APIError(413, f"Image is larger than {policy.max_bytes} bytes.", code="image_too_large")
            data = value
        mime, width, height = describe_image(data, policy, "The upload is not a readable image.")
    except APIError as exc:
        exc.param = param
        raise
    return InputImage(data, mime, width, height)


def check_mask(mask: InputImage, first: InputImage) -> None:
    """OpenAI's mask rule: a PNG with an alpha channel, exactly the first image's size."""
    from PIL import Image

    if mask.mime != "image/png":
        raise APIError(400, f"The mask must be a PNG with an alpha channel, got {mask.mime}.", param="mask",
                       code="invalid_image")
    with Image.open(io.BytesIO(mask.data), formats=("PNG",)) as img:
        has_alpha = img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info
    if not has_alpha:
        raise APIError(400, "The mask has no alpha channel: its fully transparent pixels mark what to change.",
                       param="mask", code="invalid_image")
    if mask.size != first.size:
        raise APIError(400, f"The mask is {mask.width}x{mask.height} but the image is {first.width}x{first.height}; "
                       "they must be the same size.", param="mask", code="invalid_value")


@dataclass
class EditBody:
    """What an edit request carries besides its fields: the raw image values (uploads or URLs) and the mask."""

    request: ImageEditRequest
    images: list[bytes | str]
    mask: bytes | str | None


async def read_edit_body(request: Request, max_images: int) -> EditBody:
    """OpenAI's multipart shape (what the SDKs send: ``image`` or ``image[]`` parts, repeated, and ``mask``; other
    parts are fields, strings the model's lax parsing turns into numbers and booleans) or a JSON object whose
    ``image`` is a URL / data URL or a list of them."""
    ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    images: list[bytes | str] = []
    mask: bytes | str | None = None
    if ctype == "multipart/form-data":
        try:  # the images and the mask; one more file part is refused while it arrives (never read whole)
            form = await request.form(max_files=max_images + 1, max_fields=64)
        except (StarletteHTTPException, MultiPartException, MultipartParseError) as exc:
            detail = str(getattr(exc, "detail", None) or getattr(exc, "message", None) or exc)
            if detail.startswith("Too many files"):  # Starlette's words for max_files: too many images
                raise too_many_images(max_images) from None
            raise APIError(400, f"Could not read the multipart body: {detail}.", code="invalid_body") from None
        fields: dict[str, Any] = {}
        for key, value in form.multi_items():
            content = await value.read() if isinstance(value, UploadFile) else value
            if key in ("image", "image[]"):
                images.append(content)
            elif key == "mask":
                mask = content
            elif isinstance(content, str) and "[" not in key:  # nested form fields (`svg[model]`) are not ours
                fields[key] = content
        await form.close()
    else:
        raw = await request.body()
        try:
            fields = json.loads(raw)
        except (ValueError, RecursionError):
            raise APIError(400, "We could not parse the JSON body of your request.", code="invalid_json") from None
        if not isinstance(fields, dict):
            raise APIError(400, "The request body must be a JSON object.", code="invalid_body")
    try:
        req = ImageEditRequest.model_validate(fields)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None
    if ctype != "multipart/form-data":
        images = [req.image] if isinstance(req.image, str) else list(req.image or [])
        images += [reference_url(ref, f"images[{i}]") for i, ref in enumerate(req.images or [])]
        mask = reference_url(req.mask, "mask") if isinstance(req.mask, ImageReference) else req.mask
    if not images:
        raise APIError(400, "Missing required parameter: 'image'.", param="image", code="missing_required_parameter")
    if len(images) > max_images:
        raise too_many_images(max_images)
    return EditBody(req, images, mask)


def reference_url(ref: ImageReference, param: str) -> str:
    """The URL of an OpenAI image reference; a ``file_id`` needs a Files API, which this server does not have."""
    if ref.image_url:
        return ref.image_url
    if ref.file_id:
        raise APIError(400, f"'{param}.file_id' is not supported: this server has no Files API; send the image as "
                            f"'{param}.image_url' (a URL or a data URL) or upload it as multipart.",
                       param=f"{param}.file_id", code="unsupported_parameter")
    raise APIError(400, f"'{param}' needs an 'image_url'.", param=param, code="missing_required_parameter")


def too_many_images(max_images: int) -> APIError:
    return APIError(400, f"At most {max_images} images per edit (and one mask).", param="image",
                    code="too_many_images")
