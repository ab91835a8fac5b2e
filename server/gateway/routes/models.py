"""``GET /v1/models`` and ``GET /v1/models/{id}`` (OpenAI shapes), and ``POST /v1/embeddings``, which this server
does not serve: a clear 404 rather than a bare one."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from server.errors import APIError
from server.gateway import openapi
from server.gateway.auth import require_api_key
from server.gateway.protocol import ModelList
from server.gateway.state import Gateway, current

router = APIRouter(dependencies=[require_api_key])


@router.get("/v1/models", summary="Models", responses={**openapi.ok(ModelList, "The models"), **openapi.errors(401)})
async def list_models(gateway: Annotated[Gateway, Depends(current)]) -> JSONResponse:
    return JSONResponse(gateway.models.listing())


@router.get("/v1/models/{model_id:path}", summary="One model",
            responses={**openapi.ok(None, "The model", {"application/json": {"type": "object"}}),
                       **openapi.errors(401, 404)})
async def get_model(model_id: str, gateway: Annotated[Gateway, Depends(current)]) -> JSONResponse:
    entry = gateway.models.get(model_id)
    if entry is None:
        raise APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
    return JSONResponse(entry)


@router.post("/v1/embeddings", summary="Embeddings (not served)", responses=openapi.errors(401, 404))
async def embeddings() -> JSONResponse:
    raise APIError(404, "This server has no embedding model: it serves Mini-Gemini chat (/v1/chat/completions, "
                   "/v1/responses) and SDXL images (/v1/images/*).", param="model", code="model_not_found")
