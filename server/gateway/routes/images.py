"""``POST /v1/images/generations`` (OpenAI shape, docs/api.md §1.5) and ``GET /v1/files/images/{id}``, where
``response_format="url"`` images are served (public: the random id is the credential)."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from server.errors import APIError
from server.gateway import openapi
from server.gateway.auth import require_api_key
from server.gateway.cancellation import with_cancellation
from server.gateway.image_store import FILES_PATH
from server.gateway.protocol import ImageGenerationRequest, ImagesResponse
from server.gateway.state import Gateway, current

logger = logging.getLogger("mgm.gateway")
router = APIRouter()


@router.post("/v1/images/generations", summary="Image generation (OpenAI)", dependencies=[require_api_key],
             responses={**openapi.ok(ImagesResponse, "The images"), **openapi.errors(*openapi.API_ERRORS)})
@with_cancellation
async def create_images(request: ImageGenerationRequest, raw_request: Request,
                        gateway: Annotated[Gateway, Depends(current)]) -> JSONResponse:
    if unknown := sorted(request.model_extra or {}):
        logger.info("image request has fields this gateway ignores", extra={"fields": {"fields": ",".join(unknown)}})
    return JSONResponse(await gateway.images.generate(request, str(raw_request.base_url)))


@router.get(FILES_PATH + "/{image_id}", summary="A generated image (response_format=url)",
            responses={**openapi.ok(None, "PNG", {"image/png": {"type": "string", "format": "binary"}}),
                       **openapi.errors(404)})
async def image_file(image_id: str, gateway: Annotated[Gateway, Depends(current)]) -> Response:
    data = gateway.store.get(image_id)
    if data is None:
        raise APIError(404, "No such image (unknown or expired).", param="image_id", code="not_found")
    return Response(data, media_type="image/png", headers={"cache-control": "private, max-age=3600"})
