"""``POST /v1/chat/completions`` (OpenAI shape, with MGM's any-to-any extension: docs/api.md §1.1–§1.2). Admission
and the body cap act before this route reads its body (server.gateway.middleware)."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response

from server.gateway import openapi
from server.gateway.auth import require_api_key
from server.gateway.cancellation import with_cancellation
from server.gateway.protocol import CHAT_STREAM_EVENT, ChatCompletion, ChatCompletionRequest
from server.gateway.state import Gateway, current

router = APIRouter(dependencies=[require_api_key])

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def client_request_id(request: Request) -> str | None:
    """The client's ``x-request-id`` when it is a plain token (it is logged and sent to the engine), else None (the
    relay makes one up)."""
    value = request.headers.get("x-request-id", "")
    return value if _REQUEST_ID.fullmatch(value) else None


@router.post("/v1/chat/completions", summary="Chat completion (OpenAI)",
             responses={**openapi.ok(ChatCompletion, "The completion, or an SSE stream when stream is true",
                                     {"text/event-stream": CHAT_STREAM_EVENT}),
                        **openapi.errors(*openapi.API_ERRORS)})
@with_cancellation
async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request,
                                 gateway: Annotated[Gateway, Depends(current)]) -> Response:
    return await gateway.chat.create(request, str(raw_request.base_url), client_request_id(raw_request))
