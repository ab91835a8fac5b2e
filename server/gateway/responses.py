"""The Responses API (docs/api.md §1.10): OpenAI's ``POST /v1/responses`` on top of the chat path, stored responses
in the shared blob store (any replica answers for any response), and the ``image_generation`` tool, which runs the
turn in MGM's generation mode and draws the model's ``<h>…</h>`` caption with the SDXL pool.

A request becomes a chat body: ``instructions`` as the system turn, the stored conversation of
``previous_response_id`` (its images inlined), then ``input``; consecutive turns of one role are merged (MGM's
template wants user and assistant turns alternating). It then goes through the chat service's checks and the relay
(failover, cancellation), and the answer is re-shaped into a response object — or, streamed, into OpenAI's event
sequence. A follow-up turn with the tool gives MGM the previous image as an input image and draws the next one
img2img from it, so "make it night" edits the last picture."""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from server.errors import APIError, validation_error
from server.gateway import sse
from server.gateway.any_to_any import NO_USER_RESPONSES, add_gen_suffix
from server.gateway.chat import ChatService, merge_turns
from server.gateway.image_fetch import inline_images
from server.gateway.image_generation import extract_caption
from server.gateway.protocol import ENGINE_EXTRAS, ChatCompletionRequest, ImageOptions
from server.gateway.streaming import respond_holding
from server.gateway.responses_protocol import ImageGenerationTool, InputMessage, ResponsesRequest
from server.store import Blob, BlobStore, StoreUnavailable

logger = logging.getLogger("mgm.gateway")

_PART_TYPES = {"input_text": "text", "output_text": "text"}


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"


def _usage(payload: dict[str, Any] | None) -> dict[str, Any]:
    u = (payload or {}).get("usage") or {}
    prompt, completion = int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0)
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + completion}


@dataclass
class Turn:
    """One request, prepared: the chat body for the engine, what is stored for follow-ups, the tool to run."""

    req: ResponsesRequest
    body: dict[str, Any]
    conversation: list[dict[str, Any]]  # the turns stored for a follow-up: all but this turn's instructions
    input_items: list[dict[str, Any]]
    tool: ImageGenerationTool | None
    forced: bool  # tool_choice asks for an image even when MGM writes no caption
    previous_image: str | None  # base64 of the last image of the conversation (edits draw from it)
    id: str = field(default_factory=lambda: new_id("resp"))
    created_at: int = field(default_factory=lambda: int(time.time()))

    def last_user_text(self) -> str:
        for message in reversed(self.body["messages"]):
            if message["role"] == "user":
                content = message["content"]
                if isinstance(content, str):
                    return content
                return " ".join(p["text"] for p in content if p.get("type") == "text")
        return ""


class ResponsesService:
    def __init__(self, chat: ChatService, store: BlobStore, ttl_s: float, retry_after_s: int) -> None:
        self.chat, self.store, self.ttl_s, self.retry_after_s = chat, store, ttl_s, retry_after_s

    # --- the store ---------------------------------------------------------------------------------------------

    def _store_down(self, exc: StoreUnavailable) -> APIError:
        logger.warning("response store unavailable", extra={"fields": {"error": str(exc)}})
        return APIError(503, "The response store is unavailable right now; retry later, or send store=false "
                        "without previous_response_id.", code="response_store_unavailable",
                        headers={"retry-after": str(self.retry_after_s)})

    async def load(self, response_id: str) -> dict[str, Any]:
        try:
            blob = await self.store.get(response_id) if response_id.startswith("resp_") else None
        except StoreUnavailable as exc:
            raise self._store_down(exc) from None
        if blob is None:
            raise APIError(404, f"No response found with id '{response_id}'.", param="response_id",
                           code="not_found")
        return json.loads(blob.data)

    async def _save(self, record: dict[str, Any]) -> None:
        try:
            await self.store.put(record["response"]["id"], Blob(json.dumps(record).encode(), "application/json"),
                                 self.ttl_s)
        except StoreUnavailable as exc:
            raise self._store_down(exc) from None

    async def delete(self, response_id: str) -> dict[str, Any]:
        await self.load(response_id)  # 404 for an unknown id
        try:
            await self.store.delete(response_id)
        except StoreUnavailable as exc:
            raise self._store_down(exc) from None
        return {"id": response_id, "object": "response", "deleted": True}

    async def input_items(self, response_id: str) -> dict[str, Any]:
        items = (await self.load(response_id))["input_items"]
        return {"object": "list", "data": items, "first_id": items[0]["id"] if items else None,
                "last_id": items[-1]["id"] if items else None, "has_more": False}

    # --- preparing a turn --------------------------------------------------------------------------------------

    def _tool(self, req: ResponsesRequest) -> tuple[ImageGenerationTool | None, bool]:
        tool = None
        for i, spec in enumerate(req.tools or []):
            if not isinstance(spec, dict) or spec.get("type") != "image_generation":
                kind = spec.get("type") if isinstance(spec, dict) else None
                raise APIError(400, f"Tool type {kind!r} is not supported: this server runs the 'image_generation' "
                               "tool only (MGM decides to draw in its generation mode).", param=f"tools[{i}].type",
                               code="unsupported_tool")
            try:
                tool = ImageGenerationTool.model_validate(spec)
                tool.image_options()
            except ValidationError as exc:
                raise validation_error([{**e, "loc": ("tools", i, *e.get("loc", ()))} for e in exc.errors()]) from None
        choice = req.tool_choice
        if isinstance(choice, dict):
            if choice.get("type") != "image_generation":
                raise APIError(400, "tool_choice may name the 'image_generation' tool only.", param="tool_choice",
                               code="invalid_value")
            forced = True
        elif choice in (None, "auto", "required", "none"):
            forced = choice == "required"
        else:
            raise APIError(400, "tool_choice must be 'auto', 'required', 'none' or {\"type\": \"image_generation\"}.",
                           param="tool_choice", code="invalid_value")
        if tool is None and (forced or isinstance(choice, dict)):
            raise APIError(400, "tool_choice asks for the image_generation tool, but tools does not list it.",
                           param="tool_choice", code="invalid_value")
        if choice == "none":
            return None, False
        return tool, forced

    @staticmethod
    def _message(item: InputMessage, index: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """(chat message, stored input item) of one input message."""
        role = "system" if item.role == "developer" else item.role
        stored = {"id": item.id or new_id("msg"), "type": "message", "role": item.role, "status": "completed",
                  "content": [{"type": "input_text", "text": item.content}] if isinstance(item.content, str)
                  else [p.model_dump(exclude_none=True) for p in item.content]}
        if isinstance(item.content, str):
            return {"role": role, "content": item.content}, stored
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(item.content):
            if part.type == "input_image":
                if part.image_url is None:
                    raise APIError(400, "input_image needs image_url (an http(s) URL or a data URL); this server has "
                                   "no Files API for file_id.", param=f"input[{index}].content[{j}].image_url",
                                   code="invalid_value")
                parts.append({"type": "image_url", "image_url": {"url": part.image_url}})
            else:
                parts.append({"type": "text", "text": part.text})
        return {"role": role, "content": parts}, stored

    async def prepare(self, req: ResponsesRequest) -> Turn:
        if req.background:
            raise APIError(400, "background responses are not supported; stream instead.", param="background",
                           code="unsupported_parameter")
        self.chat.check_model(req.model)
        tool, forced = self._tool(req)
        history: list[dict[str, Any]] = []
        previous_image = None
        if req.previous_response_id is not None:
            try:
                record = await self.load(req.previous_response_id)
            except APIError as exc:
                if exc.status == 404:
                    exc.param = "previous_response_id"
                raise
            history, previous_image = record["messages"], record.get("image")
        items = [InputMessage(role="user", content=req.input)] if isinstance(req.input, str) else req.input
        converted = [self._message(item, i) for i, item in enumerate(items)]
        new = [m for m, _ in converted]
        if tool is not None and previous_image is not None:  # MGM sees the picture it is asked to change
            first_user = next((m for m in new if m["role"] == "user"), None)
            if first_user is not None:
                content = first_user["content"]
                parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
                first_user["content"] = [{"type": "image_url", "image_url": {
                    "url": "data:image/png;base64," + previous_image}}, *parts]
        # instructions are this turn's only: the stored conversation leaves them out (as OpenAI's does), so a
        # follow-up's own instructions replace them instead of stacking
        system = [{"role": "system", "content": req.instructions}] if req.instructions else []
        conversation = merge_turns(history + new)
        body: dict[str, Any] = {"model": req.model, "messages": merge_turns(system + conversation)}
        for src, dst in (("max_output_tokens", "max_tokens"), ("temperature", "temperature"), ("top_p", "top_p"),
                         ("seed", "seed"), ("stop", "stop"), ("user", "user")):
            if (value := getattr(req, src)) is not None:
                body[dst] = value
        # vLLM's sampling extras pass through as on chat (e.g. ignore_eos for a fixed output length); the rest of the
        # unknown fields are dropped
        body.update({k: v for k, v in (req.model_extra or {}).items() if k in ENGINE_EXTRAS})
        fmt = req.text.format if req.text else None
        if fmt is not None and fmt.type == "json_schema":
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": fmt.name or "response", "schema": fmt.schema_ or {}, "strict": bool(fmt.strict)}}
        elif fmt is not None and fmt.type == "json_object":
            body["response_format"] = {"type": "json_object"}
        try:
            checked = ChatCompletionRequest.model_validate(body)
        except ValidationError as exc:
            raise validation_error(exc.errors()) from None
        self.chat.check_prompt_length(checked.text_chars())
        if tool is not None:
            add_gen_suffix(conversation, NO_USER_RESPONSES)
            body["messages"] = merge_turns(system + conversation)
        body["add_special_tokens"] = True
        try:
            await inline_images(body, self.chat.config.images, self.chat.resolver, self.chat.metrics)
        except APIError as exc:
            exc.param = "input" if exc.param and exc.param.startswith("messages") else exc.param
            raise
        # the image parts are shared with the conversation, which is stored with them inlined
        return Turn(req, body, conversation, [s for _, s in converted], tool, forced, previous_image)

    # --- the response object -----------------------------------------------------------------------------------

    def _response(self, turn: Turn, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None,
                  incomplete: str | None = None, error: dict[str, Any] | None = None) -> dict[str, Any]:
        req = turn.req
        tools = [t.model_dump(exclude_none=True) for t in ([turn.tool] if turn.tool else [])]
        fmt = req.text.format.model_dump(by_alias=True, exclude_none=True) if req.text and req.text.format else {
            "type": "text"}
        return {"id": turn.id, "object": "response", "created_at": turn.created_at, "status": status,
                "error": error, "incomplete_details": {"reason": incomplete} if incomplete else None,
                "instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "model": req.model,
                "output": output, "parallel_tool_calls": bool(req.parallel_tool_calls
                                                              if req.parallel_tool_calls is not None else True),
                "previous_response_id": req.previous_response_id, "store": req.store,
                "temperature": req.temperature, "top_p": req.top_p, "text": {"format": fmt},
                "tool_choice": req.tool_choice or "auto", "tools": tools, "truncation": req.truncation or "disabled",
                "usage": usage, "user": req.user, "metadata": req.metadata or {}}

    @staticmethod
    def _message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
        return {"id": item_id, "type": "message", "status": status, "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}

    async def _finish(self, turn: Turn, response: dict[str, Any], answer: str, image: str | None) -> None:
        """Store the turn (when asked): the response, its input items, the conversation and its last image."""
        if not turn.req.store:
            return
        history = [*turn.conversation, {"role": "assistant", "content": answer}]
        await self._save({"response": response, "input_items": turn.input_items, "messages": history,
                          "image": image or turn.previous_image})

    # --- the image ---------------------------------------------------------------------------------------------

    def _caption(self, turn: Turn, answer: str) -> str | None:
        caption = extract_caption(answer)
        if caption is None and turn.forced:
            caption = turn.last_user_text().replace(" <GEN>", "").strip() or None
        return caption

    def _image_payload(self, turn: Turn, caption: str) -> tuple[dict[str, Any], ImageOptions, tuple[int, int]]:
        assert turn.tool is not None
        options = turn.tool.image_options()
        size = self.chat.images.size(options.size, "tools[0].size")
        payload = options.worker_payload(caption, 1, *size)
        if turn.previous_image is not None:  # a follow-up edits the last picture (img2img from it)
            payload["image"] = turn.previous_image
        return payload, options, size

    @staticmethod
    def _image_item(item_id: str, status: str, caption: str | None, options: ImageOptions | None,
                    size: tuple[int, int] | None, result: str | None) -> dict[str, Any]:
        item: dict[str, Any] = {"id": item_id, "type": "image_generation_call", "status": status, "result": result}
        if caption is not None and options is not None and size is not None:
            item.update(revised_prompt=caption, size=f"{size[0]}x{size[1]}", output_format=options.format,
                        quality=options.quality or "auto", background=options.background or "auto")
        return item

    # --- non-streaming -----------------------------------------------------------------------------------------

    async def create(self, req: ResponsesRequest, request_id: str | None) -> Response:
        turn = await self.prepare(req)
        if turn.tool is None:
            return await self._create(turn, request_id)
        # the tool's image: its SDXL place is reserved up front (as the images API does), so a full pool is a 429
        # before any engine time is spent, and given back when the response (or its stream) is done
        return await respond_holding(self.chat.images.pool("tools").reserve(1), lambda: self._create(turn, request_id))

    async def _create(self, turn: Turn, request_id: str | None) -> Response:
        req = turn.req
        if req.stream:
            return await self._stream(turn, request_id)
        payload = await self.chat.relay.complete(turn.body, request_id)
        choice = (payload.get("choices") or [{}])[0]
        answer = (choice.get("message") or {}).get("content") or ""
        output = [self._message_item(new_id("msg"), answer)]
        image = None
        if turn.tool is not None and (caption := self._caption(turn, answer)):
            body, options, size = self._image_payload(turn, caption)
            items = await self.chat.images.pool("tools").generate(body, reserved=True)
            image = items[0]["b64_json"]
            output.append(self._image_item(new_id("ig"), "completed", caption, options, size, image))
        incomplete = "max_output_tokens" if choice.get("finish_reason") == "length" else None
        response = self._response(turn, "incomplete" if incomplete else "completed", output, _usage(payload),
                                  incomplete)
        await self._finish(turn, response, answer, image)
        return JSONResponse(response)

    # --- streaming ---------------------------------------------------------------------------------------------

    async def _stream(self, turn: Turn, request_id: str | None) -> Response:
        body = {**turn.body, "stream": True}
        return await self.chat.relay.stream(body, True, lambda chunks: self._events(turn, chunks), request_id)

    async def _events(self, turn: Turn, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """OpenAI's Responses event sequence from the engine's chat chunks (docs/api.md §1.10)."""
        seq = 0

        def event(kind: str, **fields: Any) -> bytes:
            nonlocal seq
            seq += 1
            return sse.encode({"type": kind, "sequence_number": seq - 1, **fields}, kind)

        msg_id = new_id("msg")
        yield event("response.created", response=self._response(turn, "in_progress", [], None))
        yield event("response.in_progress", response=self._response(turn, "in_progress", [], None))
        yield event("response.output_item.added", output_index=0, item={**self._message_item(msg_id, "", "in_progress"),
                                                                        "content": []})
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        yield event("response.content_part.added", item_id=msg_id, output_index=0, content_index=0, part=part)
        answer, finish, usage = "", None, None
        try:
            async for raw in chunks:
                if sse.name(raw) == "error":
                    err = (sse.json_data(raw) or {}).get("error") or {}
                    failed = {"code": err.get("code") or "server_error", "message": err.get("message") or "failed"}
                    yield event("response.failed", response=self._response(turn, "failed", [], None, error=failed))
                    return
                chunk = sse.json_data(raw)
                if not isinstance(chunk, dict):
                    continue
                if chunk.get("usage"):
                    usage = chunk
                for choice in chunk.get("choices") or []:
                    if choice.get("index", 0):
                        continue
                    delta = (choice.get("delta") or {}).get("content")
                    if delta:
                        answer += delta
                        yield event("response.output_text.delta", item_id=msg_id, output_index=0, content_index=0,
                                    delta=delta, logprobs=[])
                    finish = choice.get("finish_reason") or finish
        except APIError as exc:
            yield event("response.failed", response=self._response(turn, "failed", [], None, error={
                "code": exc.code or "server_error", "message": exc.message}))
            return
        yield event("response.output_text.done", item_id=msg_id, output_index=0, content_index=0, text=answer,
                    logprobs=[])
        yield event("response.content_part.done", item_id=msg_id, output_index=0, content_index=0,
                    part={**part, "text": answer})
        message = self._message_item(msg_id, answer)
        yield event("response.output_item.done", output_index=0, item=message)
        output, image = [message], None
        caption = self._caption(turn, answer) if turn.tool is not None else None
        if caption is not None:
            ig_id = new_id("ig")
            try:
                body, options, size = self._image_payload(turn, caption)
                body["partial_images"] = turn.tool.partial_images or 0  # type: ignore[union-attr]
                yield event("response.output_item.added", output_index=1,
                            item=self._image_item(ig_id, "in_progress", None, None, None, None))
                yield event("response.image_generation_call.in_progress", output_index=1, item_id=ig_id)
                yield event("response.image_generation_call.generating", output_index=1, item_id=ig_id)
                stream = self.chat.images.pool("tools").generate_stream(body, reserved=True)
                async for got in sse.with_keepalive(stream, self.chat.config.stream_keepalive_s):
                    if got is None:
                        yield sse.KEEPALIVE
                    elif got.get("type") == "partial_image":
                        yield event("response.image_generation_call.partial_image", output_index=1, item_id=ig_id,
                                    partial_image_index=got.get("partial_image_index", 0),
                                    partial_image_b64=got["b64_json"], size=f"{size[0]}x{size[1]}",
                                    output_format=options.format)
                    elif got.get("type") == "image":
                        image = got["b64_json"]
            except APIError as exc:
                yield event("response.failed", response=self._response(turn, "failed", output, None, error={
                    "code": exc.code or "image_generation_failed", "message": exc.message}))
                return
            yield event("response.image_generation_call.completed", output_index=1, item_id=ig_id)
            item = self._image_item(ig_id, "completed", caption, options, size, image)
            yield event("response.output_item.done", output_index=1, item=item)
            output.append(item)
        incomplete = "max_output_tokens" if finish == "length" else None
        response = self._response(turn, "incomplete" if incomplete else "completed", output, _usage(usage), incomplete)
        try:
            await self._finish(turn, response, answer, image)
        except APIError as exc:
            yield event("response.failed", response=self._response(turn, "failed", output, None, error={
                "code": exc.code or "server_error", "message": exc.message}))
            return
        yield event("response.incomplete" if incomplete else "response.completed", response=response)

