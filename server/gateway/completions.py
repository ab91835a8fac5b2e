"""Legacy text completions (``POST /v1/completions``, docs/api.md §1.11): the prompt goes to the engine as it is —
vLLM tokenises a completion prompt with the tokenizer's special tokens, so MGM's official BOS leads it — through the
same model checks, prompt-length bound and relay (failover, streaming, cancellation) as chat."""

from __future__ import annotations

from fastapi import Response
from fastapi.responses import JSONResponse

from server.gateway.chat import ChatService
from server.gateway.protocol import ENGINE_EXTRAS, CompletionRequest
from server.gateway.relay import COMPLETIONS_PATH


class CompletionsService:
    def __init__(self, chat: ChatService) -> None:
        self.chat = chat

    async def create(self, req: CompletionRequest, request_id: str) -> Response:
        self.chat.check_model(req.model)
        self.chat.check_prompt_length(req.text_chars(), "prompt")
        body = req.model_dump(exclude_unset=True)
        for key in sorted(req.model_extra or {}):
            if key not in ENGINE_EXTRAS:
                del body[key]
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return await self.chat.relay.stream(body, include_usage, None, request_id, COMPLETIONS_PATH)
        return JSONResponse(await self.chat.relay.complete(body, request_id, COMPLETIONS_PATH))
