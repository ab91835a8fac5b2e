"""``redis://host:port/db``: records under ``mgm:blob:<key>`` with Redis's own expiry (``SET … PX``), so every
replica sees every record and nothing outlives its TTL. Every call has a timeout; any Redis failure is
:class:`StoreUnavailable` (the caller answers 503 for what needs the store and serves everything else)."""

from __future__ import annotations

import time

from server.store.base import Blob, StoreUnavailable, decode, encode, valid_key

PREFIX = "mgm:blob:"


class RedisStore:
    kind, shared = "redis", True

    def __init__(self, url: str, timeout_s: float) -> None:
        import redis.asyncio as aioredis

        # No retries inside the client: a down server must surface within timeout_s, not after a back-off loop.
        self._client = aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                               retry_on_timeout=False, health_check_interval=0)

    async def _call(self, name: str, *args: object, **kwargs: object) -> object:
        from redis.exceptions import RedisError

        try:
            return await getattr(self._client, name)(*args, **kwargs)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis {name}: {type(exc).__name__}: {exc}") from exc

    async def put(self, key: str, blob: Blob, ttl_s: float) -> None:
        if not valid_key(key):
            raise ValueError(f"invalid store key {key!r}")
        ttl_ms = max(1, int(ttl_s * 1000))
        await self._call("set", PREFIX + key, encode(blob, time.time() + ttl_s), px=ttl_ms)

    async def get(self, key: str) -> Blob | None:
        if not valid_key(key):
            return None
        record = await self._call("get", PREFIX + key)
        return decode(record) if isinstance(record, bytes) else None

    async def delete(self, key: str) -> bool:
        if not valid_key(key):
            return False
        return bool(await self._call("delete", PREFIX + key))

    async def check(self) -> None:
        await self._call("ping")

    async def close(self) -> None:
        await self._client.aclose()
