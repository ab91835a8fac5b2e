"""The gateway's HTTP client to its engines (the hot path: every chat request and every streamed event).

It is aiohttp rather than httpx: httpx's connection pool (httpcore on anyio locks) serialises concurrent requests,
and on loopback it capped the gateway at ~30 requests/s at concurrency 32 against an engine that serves 170 (see
BENCHMARKS.md, gateway overhead; encode/httpx#3215). Probes, SDXL jobs and remote images stay on httpx: they are
few.

The failure taxonomy is what the gateway's retry rule (:mod:`server.gateway.relay`) needs:

* :class:`EngineConnectFailed` — nothing was sent: connection refused, or no connection within the connect timeout.
  Safe to send to another engine.
* :class:`EngineDropped` — the connection was lost after the request went out (reset, closed before the answer was
  complete): the engine may have crashed on this very request. A drop before the answer's headers on a *reused*
  keep-alive connection is usually the engine having closed an idle connection just as it was reused: :meth:`post`
  sends once more on a fresh connection (aiohttp retries only idempotent methods, never POST) and reports a drop
  only when that one fails too.
* Both are :class:`EngineUnreachable`; :class:`EngineTimeout` (a read timeout: the engine is slow, not gone) and
  :class:`EngineFailed` (anything else) are not retried.
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


class EngineConnectFailed(EngineUnreachable):
    """Nothing was sent: connection refused or connect timeout."""


class EngineDropped(EngineUnreachable):
    """The connection was lost after the request was sent (reset, closed before the answer was complete)."""


class EngineTimeout(EngineFailed):
    """Read timeout: the engine took too long to answer."""


def _translate(exc: BaseException) -> EngineFailed:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, (aiohttp.ConnectionTimeoutError, aiohttp.ClientConnectorError)):  # before the timeout check
        return EngineConnectFailed(text)
    if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return EngineTimeout(text)
    if isinstance(exc, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, ConnectionError)):
        return EngineDropped(text)
    return EngineFailed(text)


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


async def _on_reuse(_session: aiohttp.ClientSession, ctx: Any, _params: Any) -> None:
    if isinstance(ctx.trace_request_ctx, dict):
        ctx.trace_request_ctx["reused"] = True


class EngineClient:
    """POSTs JSON to engines; one connection pool for the gateway's lifetime (and a second, without keep-alive, for
    the one re-send after a stale pooled connection). ``stale_retries`` counts those re-sends."""

    def __init__(self, connect_timeout_s: float, read_timeout_s: float, max_connections: int = 1024) -> None:
        timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout_s, sock_read=read_timeout_s)
        trace = aiohttp.TraceConfig()
        trace.on_connection_reuseconn.append(_on_reuse)
        self._session = aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=max_connections),
                                              trust_env=False, json_serialize=json.dumps, trace_configs=[trace])
        self._fresh = aiohttp.ClientSession(timeout=timeout, trust_env=False, json_serialize=json.dumps,
                                            connector=aiohttp.TCPConnector(limit=max_connections, force_close=True))
        self.stale_retries = 0

    async def post(self, url: str, payload: dict[str, Any], request_id: str | None = None) -> EngineResponse:
        """Send the request and return once the status line and headers are in; the body is read by the caller.
        A drop on a reused keep-alive connection before the headers is re-sent once on a fresh connection."""
        headers = {"x-request-id": request_id} if request_id else None
        state: dict[str, bool] = {"reused": False}
        try:
            response = await self._session.post(url, json=payload, headers=headers, trace_request_ctx=state)
        except _ERRORS as exc:
            err = _translate(exc)
            if not (isinstance(err, EngineDropped) and state["reused"]):
                raise err from exc
            self.stale_retries += 1
            try:
                response = await self._fresh.post(url, json=payload, headers=headers)
            except _ERRORS as exc2:
                raise _translate(exc2) from exc2
        return EngineResponse(response)

    async def aclose(self) -> None:
        await self._session.close()
        await self._fresh.close()
