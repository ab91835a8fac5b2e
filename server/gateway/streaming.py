"""The gateway's streamed (SSE) responses and what ends them.

Starlette's ``StreamingResponse`` stops a body whose client has gone by cancelling an anyio scope; such a scope
cancels *every* await inside it until it exits, so the body's own clean-up — closing its connection to an SDXL worker
or an engine, which is how they learn to drop the work — would itself be cancelled and the upstream job would run on
unobserved. :class:`EventStream` cancels the body with a plain asyncio cancellation instead (delivered once), closes a
body left suspended at a ``yield``, and then runs ``on_close`` however the response ended, even when the body never
started (the client left before the first byte)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Response
from fastapi.responses import StreamingResponse

from server.gateway import sse


class EventStream(StreamingResponse):
    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]] | None = None) -> None:
        super().__init__(content, media_type="text/event-stream", headers=sse.HEADERS)
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            body = asyncio.ensure_future(self.stream_response(send))
            gone = asyncio.ensure_future(self.listen_for_disconnect(receive))
            try:
                await asyncio.wait({body, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (body, gone):
                    task.cancel()
                await asyncio.gather(body, gone, return_exceptions=True)
                closer = getattr(self.body_iterator, "aclose", None)
                if closer is not None:  # suspended at a yield when cancelled: run its finally blocks now
                    await closer()
            if not body.cancelled() and body.exception() is not None:
                raise body.exception()  # type: ignore[misc]
        finally:
            if self.on_close is not None:
                await self.on_close()


async def respond_holding(hold: contextlib.AbstractContextManager[object],
                          respond: Callable[[], Awaitable[Response]]) -> Response:
    """Enter ``hold`` (SDXL places: its 429 comes before any engine time is spent), build the response, and keep
    ``hold`` until that response is done with it (:func:`release_after`); given back at once if building fails."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(hold)
        response = await respond()
        return release_after(response, stack.pop_all().close)


def release_after(response: Response, release: Callable[[], None]) -> Response:
    """Call ``release`` once ``response`` is done with what it holds: when an :class:`EventStream` ends (after its
    own ``on_close``, however it ended), at once for any other response (its body is complete already)."""
    if not isinstance(response, EventStream):
        release()
        return response
    close = response.on_close

    async def on_close() -> None:
        try:
            if close is not None:
                await close()
        finally:
            release()

    response.on_close = on_close
    return response
