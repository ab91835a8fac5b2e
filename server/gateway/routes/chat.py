"""``POST /v1/chat/completions`` (OpenAI shape, with MGM's any-to-any extension: docs/api.md §1.1–§1.2) and the
legacy ``POST /v1/completions`` (§1.11). Admission and the body cap act before these routes read their bodies
(server.gateway.middleware)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response

from server.gateway import openapi
from server.gateway.auth import require_api_key
from server.gateway.cancellation import with_cancellation
from server.gateway.middleware import request_id
from server.gateway.protocol import CHAT_STREAM_EVENT, ChatCompletion, ChatCompletionRequest, CompletionRequest
from server.gateway.state import Gateway, current

router = APIRouter(dependencies=[require_api_key])

def client_request_id(request: Request) -> str:
    """This request's id (server.gateway.middleware.RequestIdMiddleware: the client's ``x-request-id`` when it is a
    plain token): sent to the engine, named in logs and 5xx messages, and on the answer's headers."""
    return request_id(request.scope)


@router.post("/v1/chat/completions", summary="Chat completion (OpenAI)",
             responses={**openapi.ok(ChatCompletion, "The completion, or an SSE stream when stream is true",
                                     {"text/event-stream": CHAT_STREAM_EVENT}),
                        **openapi.errors(*openapi.API_ERRORS)})
@with_cancellation
async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request,
                                 gateway: Annotated[Gateway, Depends(current)]) -> Response:
    return await gateway.chat.create(request, str(raw_request.base_url), client_request_id(raw_request))


@router.post("/v1/completions", summary="Text completion (OpenAI, legacy)",
             responses={**openapi.ok(None, "The completion, or an SSE stream when stream is true",
                                     {"application/json": {"type": "object"}, "text/event-stream": CHAT_STREAM_EVENT}),
                        **openapi.errors(*openapi.API_ERRORS)})
@with_cancellation
async def create_completion(request: CompletionRequest, raw_request: Request,
                            gateway: Annotated[Gateway, Depends(current)]) -> Response:
    return await gateway.completions.create(request, client_request_id(raw_request))
