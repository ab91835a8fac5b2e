"""``POST /v1/images/generations`` and ``POST /v1/images/edits`` (OpenAI shapes, docs/api.md §1.5–1.6) and
``GET /v1/files/images/{id}``, where ``response_format="url"`` images are served (public: the random id is the
credential)."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response

from server.errors import APIError
from server.gateway import openapi
from server.gateway.auth import require_api_key
from server.gateway.cancellation import with_cancellation
from server.gateway.image_inputs import read_edit_body
from server.gateway.image_store import FILES_PATH, MEDIA_TYPES
from server.gateway.protocol import IMAGE_STREAM_EVENT, ImageEditRequest, ImageGenerationRequest, ImagesResponse
from server.gateway.state import Gateway, current

logger = logging.getLogger("mgm.gateway")
router = APIRouter()


@router.post("/v1/images/generations", summary="Image generation (OpenAI)", dependencies=[require_api_key],
             responses={**openapi.ok(ImagesResponse, "The images (or, with stream, an SSE stream of image events)",
                                     {"text/event-stream": IMAGE_STREAM_EVENT}),
                        **openapi.errors(*openapi.API_ERRORS)})
@with_cancellation
async def create_images(request: ImageGenerationRequest, raw_request: Request,
                        gateway: Annotated[Gateway, Depends(current)]) -> Response:
    _log_unknown(request)
    return await gateway.images.generate(request, str(raw_request.base_url))


def _log_unknown(request: ImageGenerationRequest) -> None:
    if unknown := sorted(request.model_extra or {}):
        logger.info("image request has fields this gateway ignores", extra={"fields": {"fields": ",".join(unknown)}})


_EDIT_SCHEMA = ImageEditRequest.model_json_schema(ref_template="#/components/schemas/{model}")
_UPLOADS = {"oneOf": [{"type": "string", "format": "binary"},
                      {"type": "array", "items": {"type": "string", "format": "binary"}}]}
#: The images are ``image`` parts or ``image[]`` parts (what the SDKs send for several), repeated; either is required.
_EDIT_FORM = {"type": "object", "required": ["prompt"], "anyOf": [{"required": ["image"]}, {"required": ["image[]"]}],
              "properties": {
                  **{k: v for k, v in _EDIT_SCHEMA["properties"].items() if k not in ("image", "mask")},
                  "image": {**_UPLOADS, "description": "The image(s) to edit; the first is drawn from."},
                  "image[]": {**_UPLOADS, "description": "The same as `image`, the SDKs' name for several images."},
                  "mask": {"type": "string", "format": "binary"}}}


@router.post("/v1/images/edits", summary="Image edits drawn through MGM (OpenAI)", dependencies=[require_api_key],
             responses={**openapi.ok(ImagesResponse, "The images (or, with stream, an SSE stream of image events)",
                                     {"text/event-stream": IMAGE_STREAM_EVENT}),
                        **openapi.errors(*openapi.API_ERRORS)},
             openapi_extra={"requestBody": {"required": True, "content": {
                 "multipart/form-data": {"schema": _EDIT_FORM},
                 "application/json": {"schema": {k: v for k, v in _EDIT_SCHEMA.items() if k != "$defs"}}}}})
@with_cancellation
async def edit_images(raw_request: Request, gateway: Annotated[Gateway, Depends(current)]) -> Response:
    body = await read_edit_body(raw_request, gateway.config.max_edit_images)
    _log_unknown(body.request)
    return await gateway.images.edit(body, str(raw_request.base_url))


@router.get(FILES_PATH + "/{image_id}", summary="A generated image (response_format=url)",
            responses={**openapi.ok(None, "The image, in the format it was generated in",
                                     {t: {"type": "string", "format": "binary"} for t in MEDIA_TYPES.values()}),
                       **openapi.errors(404, 503)})
async def image_file(image_id: str, gateway: Annotated[Gateway, Depends(current)]) -> Response:
    blob = await gateway.files.get(image_id)
    if blob is None:
        raise APIError(404, "No such image (unknown or expired).", param="image_id", code="not_found")
    return Response(blob.data, media_type=blob.media_type, headers={"cache-control": "private, max-age=3600"})
