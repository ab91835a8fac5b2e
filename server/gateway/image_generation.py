"""Image generation: ``POST /v1/images/generations`` and the images drawn for any-to-any chat (docs/api.md §1.5).

A request is served in three steps: (1) check it against the pool up front (size, 429/503 before any engine time is
spent); (2) optionally re-caption the prompt with MGM in generation mode (paper Fig. 4: the prompt plus the official
`` <GEN>`` suffix, the last complete ``<h>…</h>`` span of the answer is the SDXL prompt); (3) render on the SDXL pool
and return each image inline or as a stored URL.
"""

from __future__ import annotations

import time
from typing import Any

from engine.names import CAPTION_CLOSE, CAPTION_OPEN, GEN_SUFFIX
from server.errors import APIError
from server.gateway.cancellation import gather_or_cancel
from server.gateway.config import GatewayConfig
from server.gateway.engine_pool import EnginePool
from server.gateway.image_store import ImageStore, image_entry
from server.gateway.metrics import GatewayMetrics
from server.gateway.protocol import ImageGenerationRequest, ImageOptions
from server.gateway.relay import ChatRelay, engine_unavailable
from server.gateway.sdxl_pool import SDXLPool


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


class ImagesService:
    def __init__(self, config: GatewayConfig, relay: ChatRelay, engines: EnginePool, sdxl: SDXLPool | None,
                 store: ImageStore, metrics: GatewayMetrics) -> None:
        self.config, self.relay, self.engines, self.sdxl = config, relay, engines, sdxl
        self.store, self.metrics = store, metrics

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

    async def enhance(self, prompt: str) -> tuple[str, str]:
        """Re-caption ``prompt`` with MGM in generation mode. Returns (SDXL prompt, "enhanced" | "no_caption")."""
        models = self.engines.models()
        if not models:
            raise engine_unavailable(self.config.retry_after_s)
        body = {"model": models[0], "messages": [{"role": "user", "content": prompt + GEN_SUFFIX}],
                "max_tokens": self.config.enhance_max_tokens, "temperature": self.config.enhance_temperature,
                "add_special_tokens": True}
        payload = await self.relay.complete(body)
        try:
            text = payload["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            text = ""
        caption = extract_caption(text)
        return (caption, "enhanced") if caption else (prompt, "no_caption")

    async def generate(self, req: ImageGenerationRequest, base_url: str) -> dict[str, Any]:
        """The images API: the response body for ``req``."""
        # 1. Up front: the pool exists, the model and size are valid, the jobs fit (429/503 before engine time).
        pool = self.pool()
        if req.model is not None and req.model != self.config.image_model_name:
            raise APIError(404, f"The model '{req.model}' does not exist.", param="model", code="model_not_found")
        width, height = self.size(req.size)
        with pool.reserve(len(pool.split(req.n))):  # held through the re-caption: a 429 costs no engine time
            # 2. The SDXL prompt: MGM's caption of the request, or the request itself.
            if req.enhance_prompt:
                prompt, how = await self.enhance(req.prompt)
            else:
                prompt, how = req.prompt, "disabled"
            # 3. Render and hand back.
            items = await pool.generate(req.worker_payload(prompt, req.n, width, height), reserved=True)
        fmt = req.response_format or "url"
        data = [{**image_entry(item, fmt, self.store, base_url), "revised_prompt": prompt} for item in items]
        self.metrics.images_generated.labels("/v1/images/generations").inc(len(data))
        return {"created": int(time.time()), "data": data, "size": f"{width}x{height}", "output_format": "png",
                "prompt_enhancement": how}

    async def draw_captions(self, captions: dict[int, str], options: ImageOptions, size: tuple[int, int],
                            base_url: str) -> dict[int, list[dict[str, Any]]]:
        """One image per caption (choice index → caption), as chat ``message.images`` entries."""
        pool = self.pool("modalities")
        fmt = options.response_format or "b64_json"

        async def one(caption: str) -> list[dict[str, Any]]:
            items = await pool.generate(options.worker_payload(caption, 1, *size))
            out = []
            for item in items:
                entry = image_entry(item, fmt, self.store, base_url)
                url = entry.get("url") or "data:image/png;base64," + entry["b64_json"]
                out.append({"type": "image_url", "image_url": {"url": url}, "caption": caption})
            return out

        indices = sorted(captions)
        results = await gather_or_cancel([one(captions[i]) for i in indices])
        self.metrics.images_generated.labels("/v1/chat/completions").inc(sum(len(r) for r in results))
        return dict(zip(indices, results))
