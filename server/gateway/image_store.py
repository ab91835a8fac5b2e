"""The bounded in-memory store behind ``response_format="url"``: generated PNGs kept for ``image_store_ttl_s`` (1 h by
default, like OpenAI's URLs) and served at ``GET /v1/files/images/{id}``. The id is a random 192-bit token, so the URL
itself is the credential (no ``Authorization`` needed, e.g. for ``<img src>``); an expired or evicted id is 404."""

from __future__ import annotations

import base64
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

#: Where stored images are served (``GET {FILES_PATH}/{id}``).
FILES_PATH = "/v1/files/images"


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
    return {"url": f"{base_url}{FILES_PATH[1:]}/{key}"}
