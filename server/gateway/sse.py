"""Server-sent events, the one reader and writer every SSE path uses: the chat relay, the any-to-any wrapper and the
load generator (`loadtests/client.py`).

Events are split on blank lines from raw bytes (``\\r\\n`` normalised), so an event of any size (a chunk carrying a
base64 PNG) is never cut by a line-length limit, and each event is handed on as soon as its last byte arrives.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterable, AsyncIterator, Awaitable
from typing import Any, TypeVar

T = TypeVar("T")

DONE = b"[DONE]"
DONE_EVENT = b"data: [DONE]\n\n"
#: An SSE comment: clients ignore it, proxies see bytes and keep an idle stream open.
KEEPALIVE = b": keep-alive\n\n"
#: Headers of every SSE response: no caching, and no buffering in nginx-style proxies.
HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


async def events(chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    """``chunks`` (bytes as they arrive) as complete events, each ending in ``\\n\\n``; a trailing unterminated event
    is completed."""
    buf = b""
    async for data in chunks:
        buf += data.replace(b"\r\n", b"\n")
        while (cut := buf.find(b"\n\n")) >= 0:  # bounded by the buffer
            event, buf = buf[:cut + 2], buf[cut + 2:]
            yield event
    if buf.strip():
        yield buf.rstrip(b"\n") + b"\n\n"


def data(event: bytes) -> bytes | None:
    """The ``data:`` payload of one event (several data lines joined by ``\\n``, as the SSE spec says); None when the
    event has none (a comment, a keep-alive)."""
    lines = [line[5:].strip() for line in event.splitlines() if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


def name(event: bytes) -> str:
    """The event's ``event:`` field; ``message`` (the SSE default) when absent."""
    for line in event.splitlines():
        if line.startswith(b"event:"):
            return line[6:].strip().decode(errors="replace")
    return "message"


def json_data(event: bytes) -> Any:
    """The event's data parsed as JSON; None for ``[DONE]``, no data, or data that is not JSON."""
    payload = data(event)
    if payload is None or payload == DONE:
        return None
    try:
        return json.loads(payload)
    except ValueError:
        return None


def encode(payload: Any, event: str | None = None) -> bytes:
    """One event: ``payload`` as JSON (bytes are sent as they are) under an optional ``event:`` name."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + body + b"\n\n"


async def with_keepalive(items: AsyncIterable[T], interval_s: float) -> AsyncIterator[T | None]:
    """``items`` as they come, with a None whenever ``interval_s`` passes without one (the caller sends
    :data:`KEEPALIVE` then). Closing this iterator cancels the pending read of ``items``."""
    it = aiter(items)
    pending: asyncio.Future[T] = asyncio.ensure_future(anext(it))
    try:
        while True:  # ends with items (StopAsyncIteration) or the consumer
            done, _ = await asyncio.wait({pending}, timeout=interval_s)
            if not done:
                yield None
                continue
            try:
                item = pending.result()
            except StopAsyncIteration:
                return
            yield item
            pending = asyncio.ensure_future(anext(it))
    finally:
        if not pending.done():
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        if hasattr(it, "aclose"):
            await it.aclose()


async def once(work: Awaitable[T]) -> AsyncIterator[T]:
    """One awaitable as a one-item async iterator (to wait for it under :func:`with_keepalive`)."""
    yield await work
