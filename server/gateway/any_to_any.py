"""Any-to-any chat: MGM's generation mode behind ``"modalities": ["text", "image"]`` (docs/api.md §1.2,
docs/mgm.md §7).

The official `` <GEN>`` suffix goes onto every user turn (as the official CLI's ``--gen``); the model answers in text; the last complete
``<h>…</h>`` span of each choice is drawn by the SDXL pool and returned next to ``content`` as ``message.images``
(streaming: one extra chunk with ``delta.images`` before the ``finish_reason`` chunk and the usage chunk). The gateway never makes the model write a
caption: what the engine returns is what is used.

While the images are drawn a stream sends an SSE comment (:data:`server.gateway.sse.KEEPALIVE`) every
``stream_keepalive_s`` seconds (``--stream-keepalive``), so proxies with idle timeouts do not cut it; if drawing fails for any reason the stream
ends with an ``error`` event (an unexpected failure: a generic message with the request's chat id, details logged).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from engine.names import GEN_SUFFIX
from server.errors import APIError, validation_error
from server.gateway import sse
from server.gateway.image_generation import ImagesService, extract_caption
from server.gateway.protocol import ImageOptions

logger = logging.getLogger("mgm.gateway")

#: The 400 for a generating conversation without a user turn: on chat (``modalities``) and on Responses (the tool).
NO_USER_CHAT = ("Generation mode (\"modalities\" with \"image\") needs a user message.", "messages")
NO_USER_RESPONSES = ("The image_generation tool needs a user message in 'input'.", "input")


def add_gen_suffix(messages: list[dict[str, Any]], no_user: tuple[str, str] = NO_USER_CHAT) -> None:
    """Append the official `` <GEN>`` suffix to the text of every user turn that lacks it (in place): the official
    CLI's ``--gen`` marks every input of a generating conversation, so the history carries it. Without a user turn:
    400 with ``no_user`` (message, param)."""
    users = [m for m in messages if m.get("role") == "user"]
    if not users:
        raise APIError(400, no_user[0], param=no_user[1], code="invalid_value")
    for message in users:
        content = message.get("content")
        if isinstance(content, str) or content is None:
            if not (content or "").endswith(GEN_SUFFIX):
                message["content"] = (content or "") + GEN_SUFFIX
            continue
        texts = [p for p in content if p.get("type") == "text"]
        if not texts:
            content.append({"type": "text", "text": GEN_SUFFIX.strip()})
        elif not texts[-1]["text"].endswith(GEN_SUFFIX):
            texts[-1]["text"] += GEN_SUFFIX


def generation_options(body: dict[str, Any]) -> ImageOptions | None:
    """Pops ``modalities`` and ``image_options`` from the body; the image options when an image is asked for."""
    modalities = body.pop("modalities", None)
    options = body.pop("image_options", None)
    if modalities is None:
        if options is not None:
            raise APIError(400, "'image_options' needs \"modalities\": [\"text\", \"image\"].",
                           param="image_options", code="invalid_value")
        return None
    if not isinstance(modalities, list) or not all(m in ("text", "image") for m in modalities) or not modalities:
        raise APIError(400, "Invalid value for 'modalities': a list of \"text\" and \"image\".", param="modalities",
                       code="invalid_value")
    if "image" not in modalities:
        return None
    try:
        return ImageOptions.model_validate(options or {})
    except ValidationError as exc:
        err = validation_error(exc.errors())
        if err.param:
            err.message = err.message.replace(f"'{err.param}'", f"'image_options.{err.param}'")
            err.param = "image_options." + err.param
        raise err from None


@dataclass
class Generation:
    """One any-to-any request: its image options and size, where stored images are served from, and how many
    images it may draw (one per choice)."""

    images: ImagesService
    options: ImageOptions
    size: tuple[int, int]
    base_url: str
    places: int

    @classmethod
    def prepare(cls, images: ImagesService, body: dict[str, Any], base_url: str) -> Generation | None:
        """Read the generation fields off ``body`` and add the ``<GEN>`` suffix; None for a plain chat request."""
        options = generation_options(body)
        if options is None:
            return None
        images.pool("modalities")
        add_gen_suffix(body["messages"])
        return cls(images, options, images.size(options.size, "image_options.size"), base_url,
                   max(1, int(body.get("n") or 1)))

    def reserve(self) -> contextlib.AbstractContextManager[None]:
        """Its places in the SDXL pool, reserved up front as the images API does (429/503 on entry), so that a full
        pool costs no engine time; the drawing then runs ``reserved``."""
        return self.images.pool("modalities").reserve(self.places)

    async def add_images(self, payload: dict[str, Any]) -> dict[str, Any]:
        """A non-streamed completion with ``message.images`` added to each choice that has a caption."""
        captions: dict[int, str] = {}
        for choice in payload.get("choices") or []:
            text = (choice.get("message") or {}).get("content")
            if isinstance(text, str) and (caption := extract_caption(text)):
                captions[int(choice.get("index") or 0)] = caption
        if captions:
            images = await self.images.draw_captions(captions, self.options, self.size, self.base_url, reserved=True)
            for choice in payload["choices"]:
                if (index := int(choice.get("index") or 0)) in images:
                    choice["message"]["images"] = images[index]
        return payload

    async def wrap_stream(self, events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """Passes a chat stream on while collecting each choice's text. The chunks that carry a ``finish_reason`` and
        the usage chunk are held back: at the end comes one chunk with the images (or an ``error`` event when drawing
        failed), then those, then ``[DONE]`` — clients stop reading at the finish chunk, or treat usage as last."""
        texts: dict[int, str] = {}
        meta: dict[str, Any] = {}
        held: list[bytes] = []
        async for event in events:
            if sse.data(event) == sse.DONE:
                captions = {i: c for i, t in texts.items() if (c := extract_caption(t))}
                if captions:
                    drawing = self.images.draw_captions(captions, self.options, self.size, self.base_url,
                                                        reserved=True)
                    images: dict[int, list[dict[str, Any]]] = {}
                    try:  # closing the stream (the client left) cancels the drawing
                        async for got in sse.with_keepalive(sse.once(drawing), self.images.config.stream_keepalive_s):
                            if got is None:
                                yield sse.KEEPALIVE
                            else:
                                images = got
                    except APIError as exc:
                        yield sse.encode(exc.body(), "error")
                        return
                    except Exception:
                        logger.exception("drawing the images of a chat stream failed",
                                         extra={"fields": {"chat_id": meta.get("id")}})
                        err = APIError(500, f"Drawing the images failed (chat {meta.get('id')}).",
                                       type_="server_error", code="image_generation_failed")
                        yield sse.encode(err.body(), "error")
                        return
                    yield sse.encode({
                        "id": meta.get("id"), "object": "chat.completion.chunk",
                        "created": meta.get("created") or int(time.time()), "model": meta.get("model"),
                        "choices": [{"index": i, "delta": {"images": images[i]}, "logprobs": None,
                                     "finish_reason": None} for i in sorted(images)],
                        "usage": None})
                for kept in held:
                    yield kept
                held = []
            elif isinstance(chunk := sse.json_data(event), dict):
                for key in ("id", "created", "model"):
                    meta.setdefault(key, chunk.get(key))
                choices = chunk.get("choices") or []
                for choice in choices:
                    delta = choice.get("delta") or {}
                    index = int(choice.get("index") or 0)
                    texts[index] = texts.get(index, "") + (delta.get("content") or "")
                if chunk.get("usage") or any(c.get("finish_reason") for c in choices):
                    held.append(event)
                    continue
            yield event
        for kept in held:  # a stream that ended without [DONE]
            yield kept
