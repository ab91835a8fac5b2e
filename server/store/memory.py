"""``memory://``: this process only, bounded by item count and bytes (oldest first out), per-item expiry."""

from __future__ import annotations

import time
from collections import OrderedDict

from server.store.base import Blob, valid_key


class MemoryStore:
    kind, shared = "memory", False

    def __init__(self, max_items: int, max_bytes: int) -> None:
        self.max_items, self.max_bytes = max_items, max_bytes
        self._items: OrderedDict[str, tuple[Blob, float]] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def _drop(self, key: str) -> None:
        blob, _ = self._items.pop(key)
        self._bytes -= len(blob.data)

    async def put(self, key: str, blob: Blob, ttl_s: float) -> None:
        now = time.monotonic()
        for old in [k for k, (_, expires) in self._items.items() if expires <= now]:
            self._drop(old)
        if key in self._items:
            self._drop(key)
        self._items[key] = (blob, now + ttl_s)
        self._bytes += len(blob.data)
        while len(self._items) > 1 and (len(self._items) > self.max_items or self._bytes > self.max_bytes):
            self._drop(next(iter(self._items)))

    async def get(self, key: str) -> Blob | None:
        item = self._items.get(key) if valid_key(key) else None
        if item is None:
            return None
        if item[1] <= time.monotonic():
            self._drop(key)
            return None
        return item[0]

    async def delete(self, key: str) -> bool:
        if key not in self._items:
            return False
        self._drop(key)
        return True

    async def check(self) -> None:
        return None

    async def close(self) -> None:
        self._items.clear()
        self._bytes = 0
