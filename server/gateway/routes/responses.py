"""``POST /v1/responses``, ``GET`` / ``DELETE /v1/responses/{id}`` and ``GET /v1/responses/{id}/input_items``
(OpenAI's Responses API with MGM's ``image_generation`` tool: docs/api.md §1.10)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from server.gateway import openapi
from server.gateway.auth import require_api_key
from server.gateway.cancellation import with_cancellation
from server.gateway.responses_protocol import ResponsesRequest
from server.gateway.routes.chat import client_request_id
from server.gateway.state import Gateway, current

router = APIRouter(dependencies=[require_api_key])

#: The stream's events (OpenAI's names), each a JSON object with ``type`` and ``sequence_number``.
RESPONSE_STREAM_EVENT: dict[str, Any] = {
    "type": "object", "required": ["event", "data"],
    "properties": {"event": {"type": "string", "pattern": "^(response\\.|error$)"},
                   "data": {"type": "string", "pattern": "^\\{"}}}
_OBJECT = {"type": "object", "required": ["id", "object"], "properties": {"id": {"type": "string"},
                                                                        "object": {"type": "string"}}}


@router.post("/v1/responses", summary="Create a response (OpenAI Responses API)",
             responses={**openapi.ok(None, "The response, or an SSE stream of response events when stream is true",
                                     {"application/json": _OBJECT, "text/event-stream": RESPONSE_STREAM_EVENT}),
                        **openapi.errors(*openapi.API_ERRORS)})
@with_cancellation
async def create_response(request: ResponsesRequest, raw_request: Request,
                          gateway: Annotated[Gateway, Depends(current)]) -> Response:
    return await gateway.responses.create(request, client_request_id(raw_request))


@router.get("/v1/responses/{response_id}", summary="A stored response",
            responses={**openapi.ok(None, "The response", {"application/json": _OBJECT}),
                       **openapi.errors(401, 404, 503)})
async def get_response(response_id: str, gateway: Annotated[Gateway, Depends(current)]) -> Response:
    return JSONResponse((await gateway.responses.load(response_id))["response"])


@router.delete("/v1/responses/{response_id}", summary="Delete a stored response",
               responses={**openapi.ok(None, "Deleted", {"application/json": _OBJECT}),
                          **openapi.errors(401, 404, 503)})
async def delete_response(response_id: str, gateway: Annotated[Gateway, Depends(current)]) -> Response:
    return JSONResponse(await gateway.responses.delete(response_id))


@router.get("/v1/responses/{response_id}/input_items", summary="The input items of a stored response",
            responses={**openapi.ok(None, "A list of input items", {"application/json": {"type": "object"}}),
                       **openapi.errors(401, 404, 503)})
async def input_items(response_id: str, gateway: Annotated[Gateway, Depends(current)]) -> Response:
    return JSONResponse(await gateway.responses.input_items(response_id))

