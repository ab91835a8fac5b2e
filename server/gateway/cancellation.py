"""Work tied to a client: cancel it when the client hangs up, and never let one failed part of a fan-out outlive the
request. Cancelling an upstream call closes its connection, which is how engines and SDXL workers learn to drop it
(vLLM aborts a request whose connection closes)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

from fastapi import Request

from server.errors import APIError

T = TypeVar("T")
P = ParamSpec("P")


async def gather_or_cancel(aws: list[Awaitable[T]]) -> list[T]:
    """``asyncio.gather``, but the first failure (or our own cancellation) cancels the others, so no upstream
    request outlives the caller."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def run_while_connected(request: Request, work: Awaitable[T], poll_s: float = 0.1) -> T:
    """Await ``work``, cancelling it when the client disconnects (then :class:`APIError` 499 ``client_closed``)."""
    task = asyncio.ensure_future(work)
    try:
        while True:  # ends with the task or the client
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
                raise APIError(499, "The client closed the request.", code="client_closed")
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def with_cancellation(handler: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Route decorator: the handler runs until it returns or its client disconnects (counted in
    ``mgm_gateway_client_disconnects``). The route must take ``raw_request: Request``. A stream the handler returns
    is watched by the response itself from then on."""

    @functools.wraps(handler)
    async def route(*args: P.args, **kwargs: P.kwargs) -> T:
        request = kwargs["raw_request"]
        assert isinstance(request, Request)
        try:
            return await run_while_connected(request, handler(*args, **kwargs))
        except APIError as exc:
            if exc.code == "client_closed":
                request.app.state.gateway.metrics.client_disconnects.labels(request.url.path).inc()
            raise

    return route
