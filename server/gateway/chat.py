"""Chat completions (docs/api.md §1.1): the request checked against the models this gateway serves, prepared for the
engine (official BOS, generation mode, remote images inlined), then relayed streamed or not."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Response
from fastapi.responses import JSONResponse

from server.errors import APIError
from server.gateway.any_to_any import Generation
from server.gateway.config import GatewayConfig
from server.gateway.image_fetch import Resolver, inline_images
from server.gateway.image_generation import ImagesService
from server.gateway.metrics import GatewayMetrics
from server.gateway.models import ModelCatalog
from server.gateway.protocol import ENGINE_EXTRAS, GATEWAY_EXTRAS, ChatCompletionRequest
from server.gateway.relay import ChatRelay
from server.gateway.streaming import EventStream, respond_holding
from server.gateway.tools import ToolPlan

logger = logging.getLogger("mgm.gateway")


def merge_turns(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI accepts any order of turns; MGM's chat template wants user and assistant alternating after one system
    turn. ``developer`` turns count as ``system``, and consecutive turns of one role become one: their contents in
    order, texts separated by a blank line (docs/api.md §1.1)."""
    out: list[dict[str, Any]] = []
    for message in messages:
        m = {**message, "role": "system" if message.get("role") == "developer" else message.get("role")}
        if out and out[-1]["role"] == m["role"] and m["role"] in ("system", "user", "assistant") \
                and not out[-1].get("tool_calls") and not m.get("tool_calls"):
            prev = out[-1]
            a, b = prev.get("content") or "", m.get("content") or ""
            if isinstance(a, str) and isinstance(b, str):
                prev["content"] = f"{a}\n\n{b}" if a and b else a or b
            else:
                pa = a if isinstance(a, list) else [{"type": "text", "text": a}] if a else []
                pb = b if isinstance(b, list) else [{"type": "text", "text": b}] if b else []
                prev["content"] = pa + ([{"type": "text", "text": "\n\n"}] if pa and pb else []) + pb
        else:
            out.append(m)
    return out

async def _replay(events: list[bytes]) -> AsyncIterator[bytes]:
    for event in events:
        yield event


class ChatService:
    def __init__(self, config: GatewayConfig, relay: ChatRelay, images: ImagesService, models: ModelCatalog,
                 resolver: Resolver, metrics: GatewayMetrics) -> None:
        self.config, self.relay, self.images, self.models = config, relay, images, models
        self.resolver, self.metrics = resolver, metrics

    def check_model(self, model: str) -> None:
        if self.config.sdxl_workers and model == self.config.image_model_name:
            raise APIError(400, f"'{model}' is an image model; use /v1/images/generations.", param="model",
                           code="invalid_model")
        known = self.models.chat_ids()
        if known and model not in known:
            raise APIError(404, f"The model '{model}' does not exist.", param="model", code="model_not_found")

    def check_prompt_length(self, chars: int, param: str = "messages") -> None:
        """A cheap bound before the engine spends time tokenising: ``chars`` characters of text that cannot fit the
        context at any tokenizer's rate are refused here (config.max_prompt_chars_per_token); the engine checks the
        exact count."""
        context = self.relay.pool.max_model_len()
        if context is None:
            return
        limit = context * self.config.max_prompt_chars_per_token
        if chars > limit:
            raise APIError(400, f"'{param}' holds {chars} characters of text: more than this model's context of "
                           f"{context} tokens can hold (at most {limit} characters are accepted).", param=param,
                           code="context_length_exceeded")

    async def create(self, req: ChatCompletionRequest, base_url: str, request_id: str | None = None) -> Response:
        # 1. The model must be one of ours (unknown while no engine has answered yet: then the engine decides).
        unknown = req.unknown_fields()
        if unknown:
            logger.info("request has fields outside the OpenAI schema", extra={"fields": {"fields": ",".join(unknown)}})
        self.check_model(req.model)
        self.check_prompt_length(req.text_chars())
        # 2. The engine's body: only the extras the engine may see (protocol.ENGINE_EXTRAS). vLLM's chat path
        #    tokenises without special tokens, but the official MGM prompt ids start with BOS: ask for it (image
        #    prompts get the official ids either way; the processor rebuilds them).
        body = req.model_dump(exclude_unset=True)
        if dropped := [k for k in unknown if k not in ENGINE_EXTRAS and k not in GATEWAY_EXTRAS]:
            for key in dropped:
                del body[key]
            logger.info("fields not passed to the engine", extra={"fields": {"fields": ",".join(dropped)}})
        body.setdefault("add_special_tokens", True)
        tools = ToolPlan.prepare(body)  # before merging: tool results become user turns
        body["messages"] = merge_turns(body["messages"])
        generation = Generation.prepare(self.images, body, base_url)
        if generation is None:
            return await self._relay(req, body, tools, None, request_id)
        # its SDXL places, held until the answer (or its stream) is done
        return await respond_holding(generation.reserve(),
                                     lambda: self._relay(req, body, tools, generation, request_id))

    async def _relay(self, req: ChatCompletionRequest, body: dict[str, Any], tools: ToolPlan | None,
                     generation: Generation | None, request_id: str | None) -> Response:
        await inline_images(body, self.config.images, self.resolver, self.metrics)
        # 3. Relay: a stream passes through (with the images chunk in generation mode); a completion gets its images.
        if tools is not None:  # the answer is one constrained call: asked unstreamed, shaped, streamed if asked
            payload = tools.shape(await self.relay.complete(
                {k: v for k, v in body.items() if k not in ("stream", "stream_options")}, request_id))
            if not req.stream:
                return JSONResponse(payload)
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return EventStream(_replay(tools.stream(payload, include_usage)))
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return await self.relay.stream(body, include_usage, None if generation is None
                                           else generation.wrap_stream, request_id)
        payload = await self.relay.complete(body, request_id)
        if generation is not None:
            payload = await generation.add_images(payload)
        return JSONResponse(payload)
