"""``GET /v1/models`` (OpenAI shape)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from server.gateway import openapi
from server.gateway.auth import require_api_key
from server.gateway.protocol import ModelList
from server.gateway.state import Gateway, current

router = APIRouter(dependencies=[require_api_key])


@router.get("/v1/models", summary="Models", responses={**openapi.ok(ModelList, "The models"), **openapi.errors(401)})
async def list_models(gateway: Annotated[Gateway, Depends(current)]) -> JSONResponse:
    return JSONResponse(gateway.models.listing())
