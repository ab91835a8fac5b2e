"""The gateway's HTTP client to its engines (the hot path: every chat request and every streamed event).

It is aiohttp rather than httpx: httpx's connection pool (httpcore on anyio locks) serialises concurrent requests,
and on loopback it capped the gateway at ~30 requests/s at concurrency 32 against an engine that serves 170 (see
BENCHMARKS.md, gateway overhead; encode/httpx#3215). Probes, SDXL jobs and remote images stay on httpx: they are
few.

The failure taxonomy is what the gateway's retry rule needs: :class:`EngineUnreachable` (nothing usable came back:
connect refused, connection reset or closed early — safe to retry on another engine before the client saw a byte),
:class:`EngineTimeout` and :class:`EngineFailed` (anything else).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp


class EngineFailed(Exception):
    """The engine's HTTP exchange failed."""


class EngineUnreachable(EngineFailed):
    """Connection refused, reset or closed before the answer was complete."""


class EngineTimeout(EngineFailed):
    """Connect or read timeout."""


def _translate(exc: BaseException) -> EngineFailed:
    if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return EngineTimeout(str(exc) or type(exc).__name__)
    if isinstance(exc, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, ConnectionError)):
        return EngineUnreachable(str(exc) or type(exc).__name__)
    return EngineFailed(str(exc) or type(exc).__name__)


_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError)


class EngineResponse:
    """One engine response being read: ``status_code``, ``aread()``, ``aiter_bytes()``, ``aclose()``."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status_code = response.status

    async def aread(self) -> bytes:
        try:
            return await self._response.read()
        except _ERRORS as exc:
            raise _translate(exc) from exc

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        """Bytes as they arrive (each chunk the engine flushed, not a fixed-size buffer)."""
        try:
            async for data, _end_of_chunk in self._response.content.iter_chunks():
                if data:
                    yield data
        except _ERRORS as exc:
            raise _translate(exc) from exc

    async def aclose(self) -> None:
        """A fully read answer returns its connection to the pool; an unfinished one closes it, which is how the
        engine learns that the request is abandoned (vLLM aborts it on disconnect)."""
        if self._response.content.at_eof():
            self._response.release()
        else:
            self._response.close()


class EngineClient:
    """POSTs JSON to engines; one connection pool for the gateway's lifetime."""

    def __init__(self, connect_timeout_s: float, read_timeout_s: float, max_connections: int = 1024) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, connect=connect_timeout_s, sock_read=read_timeout_s),
            connector=aiohttp.TCPConnector(limit=max_connections),
            trust_env=False, json_serialize=json.dumps)

    async def post(self, url: str, payload: dict[str, Any]) -> EngineResponse:
        """Send the request and return once the status line and headers are in; the body is read by the caller."""
        try:
            response = await self._session.post(url, json=payload)
        except _ERRORS as exc:
            raise _translate(exc) from exc
        return EngineResponse(response)

    async def aclose(self) -> None:
        await self._session.close()
