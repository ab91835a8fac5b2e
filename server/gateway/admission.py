"""Bounded admission for chat requests: at most ``max_in_flight`` requests are served at once and at most
``max_queue`` more wait for a slot (FIFO); past that a request is refused at once with 429 + ``retry-after``, and a
request that waited ``queue_timeout_s`` without getting a slot gets 503 + ``retry-after``.

The gateway admits a chat or images request right after authentication, before it reads the body, fetches remote
images or talks to an engine (:class:`server.gateway.middleware.AdmissionMiddleware`), so an overloaded gateway
answers quickly and spends nothing on work it cannot do. A streaming response keeps its slot until the stream ends.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable

from server.errors import APIError


class Admission:
    def __init__(self, max_in_flight: int, max_queue: int, queue_timeout_s: float, retry_after_s: int,
                 on_change: Callable[[int, int], None] = lambda _in_flight, _waiting: None) -> None:
        if max_in_flight < 1 or max_queue < 0 or queue_timeout_s <= 0:
            raise ValueError("max_in_flight must be >= 1, max_queue >= 0 and queue_timeout_s > 0")
        self.max_in_flight, self.max_queue = max_in_flight, max_queue
        self.queue_timeout_s, self.retry_after_s = queue_timeout_s, retry_after_s
        self.in_flight = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._on_change = on_change

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _changed(self) -> None:
        self._on_change(self.in_flight, self.waiting)

    async def acquire(self) -> Callable[[], None]:
        """A slot, or :class:`APIError` 429 (queue full) / 503 (waited too long). Returns the release function
        (idempotent), which the caller must call when the request is over."""
        if self.in_flight < self.max_in_flight and not self._waiters:
            self.in_flight += 1
        else:
            if len(self._waiters) >= self.max_queue:
                raise APIError(429, f"The gateway is at capacity ({self.max_in_flight} requests in flight, "
                               f"{self.max_queue} waiting); retry later.", code="queue_full",
                               headers={"retry-after": str(self.retry_after_s)})
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            self._changed()
            try:
                await asyncio.wait_for(asyncio.shield(waiter), self.queue_timeout_s)
            except (TimeoutError, asyncio.CancelledError) as exc:
                if waiter.done() and not waiter.cancelled():  # the slot was handed over meanwhile: give it back
                    self._release_slot()
                else:
                    waiter.cancel()
                    self._waiters.remove(waiter)
                self._changed()
                if isinstance(exc, asyncio.CancelledError):
                    raise
                raise APIError(503, f"No capacity became free within {self.queue_timeout_s:g} s; retry later.",
                               type_="server_error", code="queue_timeout",
                               headers={"retry-after": str(self.retry_after_s)}) from None
            # the releaser moved its slot to us (in_flight unchanged)
        self._changed()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._release_slot()
                self._changed()

        return release

    def _release_slot(self) -> None:
        """Hand the slot to the first waiter still waiting, else free it."""
        while self._waiters:  # bounded by the queue
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.in_flight -= 1
