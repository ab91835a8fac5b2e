"""Blob stores: where the gateway keeps what must outlive one request — ``response_format="url"`` images today,
stored Responses later. One small interface (:class:`~server.store.base.BlobStore`: put/get/delete with a TTL, bytes
plus metadata) and three backends chosen by URL (``--image-store``):

- ``memory://`` — this process only (bounded LRU); the default, right for one gateway replica;
- ``file:///path`` — a directory, e.g. a ReadWriteMany volume shared by every replica;
- ``redis://host:port/db`` (``rediss://`` for TLS) — a Redis server shared by every replica; entries expire in Redis.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from server.store.base import Blob, BlobStore, StoreUnavailable, valid_key

__all__ = ["Blob", "BlobStore", "StoreUnavailable", "open_store", "check_store_url", "valid_key"]

SCHEMES = ("memory", "file", "redis", "rediss")


def check_store_url(url: str) -> str:
    """``url`` when it names a known backend, else ValueError naming the setting (config validation, no I/O)."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise ValueError(f"image_store: unknown scheme in {url!r}; use memory://, file:///path or redis://host:port/db")
    if parts.scheme == "file" and (parts.netloc or not parts.path.startswith("/")):
        raise ValueError(f"image_store: a file store needs an absolute path, file:///path, got {url!r}")
    if parts.scheme.startswith("redis") and not parts.hostname:
        raise ValueError(f"image_store: a Redis store needs a host, redis://host:port/db, got {url!r}")
    return url


def open_store(url: str, *, max_items: int, max_bytes: int, timeout_s: float) -> BlobStore:
    """The backend ``url`` names (no I/O yet: a Redis server that is down makes requests fail, not the start)."""
    parts = urlsplit(check_store_url(url))
    if parts.scheme == "memory":
        from server.store.memory import MemoryStore

        return MemoryStore(max_items=max_items, max_bytes=max_bytes)
    if parts.scheme == "file":
        from server.store.files import FileStore

        return FileStore(parts.path)
    from server.store.redis_store import RedisStore

    return RedisStore(url, timeout_s=timeout_s)
