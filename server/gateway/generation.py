"""Image generation on the gateway: ``POST /v1/images/generations``, generation-mode helpers for any-to-any chat,
and the in-memory store behind ``response_format="url"``.

``POST /v1/images/generations`` (OpenAI shape, anchors §1.5)::

    {"prompt": str (1..4000 chars, required), "model": <image model id> (optional),
     "n": 1..10 (default 1), "size": "WxH" | "auto" (default "1024x1024"),
     "response_format": "url" (default) | "b64_json",
     "quality": "standard" (default) | "hd", "style": "natural" (default) | "vivid", "user": str (ignored),
     # extensions
     "seed": int >= 0, "negative_prompt": str | null, "num_inference_steps": 1..200, "guidance_scale": 0..30,
     "enhance_prompt": bool (default true)}
    → {"created": int, "data": [{"url" | "b64_json": ..., "revised_prompt": str}], "size": "WxH",
       "output_format": "png", "prompt_enhancement": "enhanced" | "no_caption" | "disabled"}

* ``size``: any ``WxH`` whose sides are multiples of 8 within ``[image_min_side, image_max_side]`` of the gateway
  config (64..2048 by default, the worker's own limits), so the OpenAI sizes (``1024x1024``, ``1792x1024``, …) and
  small ones for tiny test pipelines (``64x64``) both work. ``auto`` = the default size. Anything else: 400,
  ``param: "size"``.
* ``quality`` → steps: ``standard`` = 30, ``hd`` = 50 (diffusers' SDXL default, the official MGM setting).
  ``style`` → guidance: ``natural`` = 5.0 (diffusers' SDXL default, official), ``vivid`` = 7.5.
  An explicit ``num_inference_steps`` / ``guidance_scale`` wins over both.
* ``negative_prompt``: omitted → MGM's official negative prompt (the worker's default); ``null`` or ``""`` → none.
* ``seed``: image i gets ``seed + i``; omitted → random.
* ``enhance_prompt`` (paper Fig. 4, "simple instruction re-caption"): the chat model is asked in generation mode
  (the prompt plus the official `` <GEN>`` suffix, as the official CLI's ``--gen``), and the last complete
  ``<h>…</h>`` span of its answer is the SDXL prompt. ``revised_prompt`` is always the prompt SDXL actually got;
  ``prompt_enhancement`` says where it came from: ``enhanced`` (the model's caption), ``no_caption`` (the model wrote
  no complete ``<h>`` span, so the user's prompt was used unchanged), ``disabled`` (``enhance_prompt: false``).
* ``response_format="url"``: the PNG is kept in a bounded in-memory store (LRU by count and bytes, expiry
  ``image_store_ttl_s``, 1 h by default like OpenAI's URLs) and served at ``GET /v1/files/images/{id}`` — the id is
  a random 192-bit token, so the URL itself is the credential (no ``Authorization`` needed, e.g. for ``<img src>``);
  an expired or evicted id is 404.

Generation mode in chat (any-to-any) is documented in :mod:`server.gateway.app`.
"""

from __future__ import annotations

import base64
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

#: The official generation-mode suffix (MGM ``cli.py``: ``inp = inp + ' <GEN>'``).
GEN_SUFFIX = " <GEN>"

STEPS = {"standard": 30, "hd": 50}
GUIDANCE = {"natural": 5.0, "vivid": 7.5}


def extract_caption(text: str) -> str | None:
    """The LAST complete ``<h>…</h>`` span (the official CLI's choice), stripped; None when there is none (or it is
    empty). Unlike ``text.split("</h>")[-2].split("<h>")[-1]`` this never returns text outside a span when a stray
    ``</h>`` follows the last real one."""
    end = len(text)
    while (close := text.rfind("</h>", 0, end)) >= 0:  # bounded: end strictly decreases
        prev_close = text.rfind("</h>", 0, close)
        segment = text[prev_close + 4 if prev_close >= 0 else 0:close]
        if (open_ := segment.rfind("<h>")) >= 0:
            caption = segment[open_ + 3:].strip()
            return caption or None
        end = close
    return None


def add_gen_suffix(messages: list[dict[str, Any]]) -> None:
    """Append the official `` <GEN>`` suffix to the text of the last user turn (in place)."""
    for message in reversed(messages):
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str) or content is None:
            message["content"] = (content or "") + GEN_SUFFIX
        else:
            texts = [p for p in content if p.get("type") == "text"]
            if texts:
                texts[-1]["text"] += GEN_SUFFIX
            else:
                content.append({"type": "text", "text": GEN_SUFFIX.strip()})
        return
    raise ValueError("no user message")


def parse_size(value: str, min_side: int, max_side: int) -> tuple[int, int]:
    w, sep, h = value.lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit():
        raise ValueError(f"must be 'WxH' (e.g. '1024x1024') or 'auto', got {value!r}")
    width, height = int(w), int(h)
    for side in (width, height):
        if side % 8 or not min_side <= side <= max_side:
            raise ValueError(f"both sides must be multiples of 8 between {min_side} and {max_side}, got {value!r}")
    return width, height


class ImageOptions(BaseModel):
    """What an image costs and looks like; shared by the images API and chat's ``image_options``."""

    model_config = ConfigDict(extra="allow")

    size: str | None = None
    response_format: Literal["url", "b64_json"] | None = None
    quality: Literal["standard", "hd"] | None = None
    style: Literal["vivid", "natural"] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    negative_prompt: str | None = Field(default=None, max_length=4000)
    num_inference_steps: int | None = Field(default=None, ge=1, le=200)
    guidance_scale: float | None = Field(default=None, ge=0, le=30, allow_inf_nan=False)

    def worker_payload(self, prompt: str, n: int, width: int, height: int) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "prompt": prompt, "n": n, "width": width, "height": height,
            "num_inference_steps": self.num_inference_steps or STEPS[self.quality or "standard"],
            "guidance_scale": float(self.guidance_scale if self.guidance_scale is not None
                                    else GUIDANCE[self.style or "natural"]),
        }
        if self.seed is not None:
            payload["seed"] = self.seed
        if "negative_prompt" in self.model_fields_set:  # omitted → the worker's official default
            payload["negative_prompt"] = self.negative_prompt or None
        return payload


class ImageGenerationRequest(ImageOptions):
    prompt: str = Field(min_length=1, max_length=4000)
    model: str | None = None
    n: int = Field(default=1, ge=1, le=10)
    user: str | None = None
    enhance_prompt: bool = True


@dataclass
class _Stored:
    data: bytes
    expires: float


class ImageStore:
    """Bounded in-memory PNG store (LRU by count and bytes, per-item expiry)."""

    def __init__(self, ttl_s: float, max_items: int, max_bytes: int) -> None:
        self.ttl_s, self.max_items, self.max_bytes = ttl_s, max_items, max_bytes
        self._items: OrderedDict[str, _Stored] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def _drop(self, key: str) -> None:
        item = self._items.pop(key)
        self._bytes -= len(item.data)

    def _expire(self, now: float) -> None:
        for key in [k for k, v in self._items.items() if v.expires <= now]:
            self._drop(key)

    def put(self, data: bytes) -> tuple[str, int]:
        """Store ``data``; returns (id, unix expiry)."""
        now = time.monotonic()
        self._expire(now)
        key = secrets.token_urlsafe(24)
        self._items[key] = _Stored(data, now + self.ttl_s)
        self._bytes += len(data)
        while len(self._items) > 1 and (len(self._items) > self.max_items or self._bytes > self.max_bytes):
            self._drop(next(iter(self._items)))  # oldest first
        return key, int(time.time() + self.ttl_s)

    def get(self, key: str) -> bytes | None:
        item = self._items.get(key)
        if item is None:
            return None
        if item.expires <= time.monotonic():
            self._drop(key)
            return None
        return item.data


def image_entry(item: dict[str, Any], response_format: str, store: ImageStore, base_url: str) -> dict[str, Any]:
    """A worker data item as ``{"b64_json"}`` or ``{"url"}`` (stored; ``base_url`` ends with ``/``)."""
    if response_format == "b64_json":
        return {"b64_json": item["b64_json"]}
    key, _expires = store.put(base64.b64decode(item["b64_json"]))
    return {"url": f"{base_url}v1/files/images/{key}"}
