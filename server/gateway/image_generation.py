"""Image generation: ``POST /v1/images/generations``, ``POST /v1/images/edits`` and the images drawn for any-to-any
chat (docs/api.md §1.5–1.6).

A request is served in three steps: (1) check it against the pool up front and reserve its places (size, inputs,
429/503 before any engine time is spent); (2) optionally re-caption the prompt with MGM in generation mode (paper
Fig. 4: for an edit MGM sees the input images too — its "reasoning generation"; the prompt plus the official
`` <GEN>`` suffix, the last complete ``<h>…</h>`` span of the answer is the SDXL prompt); (3) render on the SDXL pool
— text-to-image, or img2img from the first input image, or inpainting of its mask — and return each image inline, as
a stored URL, or as OpenAI's stream of partial images and completed events.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Response
from fastapi.responses import JSONResponse

from engine.names import CAPTION_CLOSE, CAPTION_OPEN, GEN_SUFFIX
from server.errors import APIError
from server.gateway import sse
from server.gateway.cancellation import gather_or_cancel
from server.gateway.config import GatewayConfig
from server.gateway.engine_pool import EnginePool
from server.gateway.image_fetch import Resolver
from server.gateway.image_inputs import EditBody, InputImage, check_mask, edit_policy, load_image
from server.gateway.image_store import MEDIA_TYPES, ImageFiles
from server.gateway.metrics import GatewayMetrics
from server.gateway.protocol import ImageGenerationRequest, ImageOptions
from server.gateway.relay import ChatRelay, engine_unavailable
from server.gateway.sdxl_pool import SDXLPool
from server.gateway.streaming import EventStream

logger = logging.getLogger("mgm.gateway")

#: OpenAI's image model names, served by this gateway's image model (the SDKs' examples and defaults use them).
OPENAI_IMAGE_MODELS = frozenset({"gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5", "dall-e-2", "dall-e-3"})


def parse_size(value: str, min_side: int, max_side: int) -> tuple[int, int]:
    w, sep, h = value.lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit():
        raise ValueError(f"must be 'WxH' (e.g. '1024x1024') or 'auto', got {value!r}")
    width, height = int(w), int(h)
    for side in (width, height):
        if side % 8 or not min_side <= side <= max_side:
            raise ValueError(f"both sides must be multiples of 8 between {min_side} and {max_side}, got {value!r}")
    return width, height


def extract_caption(text: str) -> str | None:
    """The LAST complete ``<h>…</h>`` span (the official CLI's choice), stripped; None when there is none (or it is
    empty). Unlike ``text.split("</h>")[-2].split("<h>")[-1]`` this never returns text outside a span when a stray
    ``</h>`` follows the last real one."""
    end = len(text)
    while (close := text.rfind(CAPTION_CLOSE, 0, end)) >= 0:  # bounded: end strictly decreases
        prev_close = text.rfind(CAPTION_CLOSE, 0, close)
        segment = text[prev_close + len(CAPTION_CLOSE) if prev_close >= 0 else 0:close]
        if (open_ := segment.rfind(CAPTION_OPEN)) >= 0:
            caption = segment[open_ + len(CAPTION_OPEN):].strip()
            return caption or None
        end = close
    return None


#: Token counts of the MGM re-caption call (``usage`` of the images API; zeros when MGM was not asked).
NO_USAGE = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
            "input_tokens_details": {"text_tokens": 0, "image_tokens": 0}}


def _usage(payload: dict[str, Any]) -> dict[str, Any]:
    u = payload.get("usage") or {}
    prompt, completion = int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0)
    return {"input_tokens": prompt, "output_tokens": completion, "total_tokens": prompt + completion,
            "input_tokens_details": {"text_tokens": prompt, "image_tokens": 0}}


@dataclass(frozen=True)
class EditInputs:
    images: list[InputImage]
    mask: InputImage | None


@dataclass
class _Prompt:
    text: str  # what SDXL draws (the revised prompt)
    how: str  # prompt_enhancement: enhanced | no_caption | disabled
    usage: dict[str, Any]


class ImagesService:
    def __init__(self, config: GatewayConfig, relay: ChatRelay, engines: EnginePool, sdxl: SDXLPool | None,
                 files: ImageFiles, metrics: GatewayMetrics, resolver: Resolver) -> None:
        self.config, self.relay, self.engines, self.sdxl = config, relay, engines, sdxl
        self.files, self.metrics, self.resolver = files, metrics, resolver

    def pool(self, param: str | None = None) -> SDXLPool:
        if self.sdxl is None:
            raise APIError(400, "Image generation is not configured on this gateway (no SDXL workers).", param=param,
                           code="images_not_configured")
        return self.sdxl

    def size(self, size: str | None, param: str = "size") -> tuple[int, int]:
        cfg = self.config
        value = cfg.image_default_size if size in (None, "auto") else size
        try:
            return parse_size(value, cfg.image_min_side, cfg.image_max_side)
        except ValueError as exc:
            raise APIError(400, f"Invalid value for '{param}': {exc}.", param=param, code="invalid_value") from None

    def edit_size(self, size: str | None, first: InputImage) -> tuple[int, int]:
        """``auto`` (the default for edits): the first image's size, scaled into the allowed sides, multiples of 8."""
        if size not in (None, "auto"):
            return self.size(size)
        lo, hi = self.config.image_min_side, self.config.image_max_side
        scale = min(1.0, hi / max(first.size))
        scale = max(scale, lo / min(first.size))
        return tuple(min(hi, max(lo, int(side * scale) // 8 * 8)) for side in first.size)  # type: ignore[return-value]

    async def enhance(self, prompt: str, images: list[InputImage] | None = None) -> tuple[str, str, dict[str, Any]]:
        """Re-caption ``prompt`` (seeing ``images``, for edits) with MGM in generation mode: the official layout,
        images before the text, `` <GEN>`` after it. Returns (SDXL prompt, "enhanced" | "no_caption", usage)."""
        models = self.engines.models()
        if not models:
            raise engine_unavailable(self.config.retry_after_s)
        text = prompt + GEN_SUFFIX
        content: str | list[dict[str, Any]] = text if not images else [
            *({"type": "image_url", "image_url": {"url": image.data_url()}} for image in images),
            {"type": "text", "text": text}]
        body = {"model": models[0], "messages": [{"role": "user", "content": content}],
                "max_tokens": self.config.enhance_max_tokens, "temperature": self.config.enhance_temperature,
                "add_special_tokens": True}
        payload = await self.relay.complete(body)
        try:
            answer = payload["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            answer = ""
        caption = extract_caption(answer)
        return (caption, "enhanced", _usage(payload)) if caption else (prompt, "no_caption", _usage(payload))

    def _checked_pool(self, req: ImageGenerationRequest) -> SDXLPool:
        pool = self.pool()
        model = req.model
        if model is None or model == self.config.image_model_name or model in OPENAI_IMAGE_MODELS:
            return pool
        if model in self.engines.models() or model == self.config.model_name:
            raise APIError(400, f"'{model}' is a chat model; this endpoint draws with the image model "
                           f"'{self.config.image_model_name}' (or omit model).", param="model", code="invalid_model")
        raise APIError(404, f"The model '{model}' does not exist.", param="model", code="model_not_found")

    async def generate(self, req: ImageGenerationRequest, base_url: str) -> Response:
        """``POST /v1/images/generations``."""
        pool = self._checked_pool(req)
        return await self._respond(pool, req, self.size(req.size), None, base_url, "/v1/images/generations")

    async def edit(self, body: EditBody, base_url: str) -> Response:
        """``POST /v1/images/edits``: the images read and checked (all at once), the mask against the first."""
        req = body.request
        pool = self._checked_pool(req)
        policy = edit_policy(self.config.images)
        names = ["image"] if len(body.images) == 1 else [f"image[{i}]" for i in range(len(body.images))]
        images = await gather_or_cancel([load_image(v, n, policy, self.resolver) for v, n in zip(body.images, names)])
        mask = None
        if body.mask is not None:
            mask = await load_image(body.mask, "mask", policy, self.resolver)
            check_mask(mask, images[0])
        size = self.edit_size(req.size, images[0])
        return await self._respond(pool, req, size, EditInputs(images, mask), base_url, "/v1/images/edits")

    # --- one request: (1) reserve, (2) prompt, (3) render ------------------------------------------------------------

    async def _prompt(self, req: ImageGenerationRequest, edit: EditInputs | None) -> _Prompt:
        if not req.enhance_prompt:
            return _Prompt(req.prompt, "disabled", NO_USAGE)
        return _Prompt(*await self.enhance(req.prompt, edit.images if edit else None))

    def _payload(self, req: ImageGenerationRequest, prompt: str, size: tuple[int, int],
                 edit: EditInputs | None) -> dict[str, Any]:
        payload = req.worker_payload(prompt, req.n, *size)
        if edit is not None:  # SDXL starts from the first image (img2img), or repaints its masked part
            payload["image"] = edit.images[0].b64()
            if edit.mask is not None:
                payload["mask"] = edit.mask.b64()
        if req.stream:
            payload["partial_images"] = req.partial_images or 0
        return payload

    def _described(self, req: ImageGenerationRequest, size: tuple[int, int]) -> dict[str, Any]:
        """The fields every answer repeats (the documented shape of the response and of the stream events)."""
        return {"size": f"{size[0]}x{size[1]}", "quality": req.quality or "auto",
                "background": req.background or "auto", "output_format": req.format}

    async def _respond(self, pool: SDXLPool, req: ImageGenerationRequest, size: tuple[int, int],
                       edit: EditInputs | None, base_url: str, route: str) -> Response:
        fmt = req.response_format or "url"
        if fmt == "url" and not req.stream:  # a store that is down is a 503 now, not after the render
            await self.files.check()
        reservation = contextlib.ExitStack()  # held through the re-caption: a 429 costs no engine time
        reservation.enter_context(pool.reserve(len(pool.split(req.n))))
        if req.stream:
            async def give_back() -> None:  # the pool places, however the stream ends
                reservation.close()

            return EventStream(self._stream(pool, req, size, edit, route), on_close=give_back)
        with reservation:
            prompt = await self._prompt(req, edit)
            items = await pool.generate(self._payload(req, prompt.text, size, edit), reserved=True)
        data = [{**await self.files.entry(item, fmt, req.format, base_url), "revised_prompt": prompt.text}
                for item in items]
        self.metrics.images_generated.labels(route).inc(len(data))
        return JSONResponse({"created": int(time.time()), "data": data, **self._described(req, size),
                             "usage": prompt.usage, "prompt_enhancement": prompt.how})

    async def _stream(self, pool: SDXLPool, req: ImageGenerationRequest, size: tuple[int, int],
                      edit: EditInputs | None, route: str) -> AsyncIterator[bytes]:
        """OpenAI's image stream: ``<kind>.partial_image`` events as previews arrive, one ``<kind>.completed`` per
        image (with ``index``, ``revised_prompt`` and ``prompt_enhancement`` added), keep-alive comments while
        nothing comes; any failure ends it with an ``error`` event."""
        described = self._described(req, size)
        keepalive = self.config.stream_keepalive_s

        def event(suffix: str, fields: dict[str, Any]) -> bytes:
            name = f"{req.kind}.{suffix}"
            return sse.encode({"type": name, "created_at": int(time.time()), **described, **fields}, name)

        try:
            prompt = None
            async for got in sse.with_keepalive(sse.once(self._prompt(req, edit)), keepalive):
                if got is None:
                    yield sse.KEEPALIVE
                prompt = got or prompt
            assert prompt is not None
            payload = self._payload(req, prompt.text, size, edit)
            async for item in sse.with_keepalive(pool.generate_stream(payload, reserved=True), keepalive):
                if item is None:
                    yield sse.KEEPALIVE
                elif item.get("type") == "partial_image":
                    yield event("partial_image", {"b64_json": item["b64_json"], "index": item.get("index", 0),
                                                  "partial_image_index": item.get("partial_image_index", 0)})
                elif item.get("type") == "image":
                    self.metrics.images_generated.labels(route).inc()
                    yield event("completed", {"b64_json": item["b64_json"], "index": item.get("index", 0),
                                              "usage": prompt.usage, "revised_prompt": prompt.text,
                                              "prompt_enhancement": prompt.how})
        except APIError as exc:
            yield sse.encode({"type": "error", **exc.body()}, "error")
        except Exception:
            logger.exception("an image stream failed", extra={"fields": {"route": route}})
            yield sse.encode({"type": "error", **APIError(500, "Image generation failed.", type_="server_error",
                                                          code="image_generation_failed").body()}, "error")

    async def draw_captions(self, captions: dict[int, str], options: ImageOptions, size: tuple[int, int],
                            base_url: str, *, reserved: bool = False) -> dict[int, list[dict[str, Any]]]:
        """One image per caption (choice index → caption), as chat ``message.images`` entries; ``reserved``: the
        caller holds a :meth:`SDXLPool.reserve` block with a place for each."""
        pool = self.pool("modalities")
        fmt = options.response_format or "b64_json"
        if fmt == "url":
            await self.files.check()

        async def one(caption: str) -> list[dict[str, Any]]:
            items = await pool.generate(options.worker_payload(caption, 1, *size), reserved=reserved)
            out = []
            for item in items:
                entry = await self.files.entry(item, fmt, options.format, base_url)
                url = entry.get("url") or f"data:{MEDIA_TYPES[options.format]};base64," + entry["b64_json"]
                out.append({"type": "image_url", "image_url": {"url": url}, "caption": caption})
            return out

        indices = sorted(captions)
        results = await gather_or_cancel([one(captions[i]) for i in indices])
        self.metrics.images_generated.labels("/v1/chat/completions").inc(sum(len(r) for r in results))
        return dict(zip(indices, results))
