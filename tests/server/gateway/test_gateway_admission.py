"""The chat admission bound (server.gateway.admission) as pure asyncio logic: FIFO hand-over of slots, 429 past the
queue, 503 after the queue timeout, cancelled waiters leave no trace, release is idempotent."""

from __future__ import annotations

import asyncio

import pytest

from server.gateway.admission import Admission
from server.errors import APIError


def test_slots_queue_handover_and_limits():
    async def run() -> None:
        changes: list[tuple[int, int]] = []
        adm = Admission(2, 1, 5.0, 3, on_change=lambda f, w: changes.append((f, w)))
        a, b = await adm.acquire(), await adm.acquire()
        waiter = asyncio.ensure_future(adm.acquire())
        await asyncio.sleep(0)
        assert (adm.in_flight, adm.waiting) == (2, 1)
        with pytest.raises(APIError) as info:  # 2 in flight + 1 waiting: full
            await adm.acquire()
        assert (info.value.status, info.value.code, info.value.headers) == (429, "queue_full", {"retry-after": "3"})
        a()
        a()  # idempotent
        c = await asyncio.wait_for(waiter, 1)  # the slot went to the waiter
        assert (adm.in_flight, adm.waiting) == (2, 0)
        b()
        c()
        assert (adm.in_flight, adm.waiting) == (0, 0) and changes[-1] == (0, 0)

    asyncio.run(run())


def test_queue_timeout_and_cancelled_waiter():
    async def run() -> None:
        adm = Admission(1, 4, 0.05, 2)
        held = await adm.acquire()
        with pytest.raises(APIError) as info:
            await adm.acquire()
        assert (info.value.status, info.value.code) == (503, "queue_timeout") and adm.waiting == 0
        waiter = asyncio.ensure_future(adm.acquire())
        await asyncio.sleep(0)
        waiter.cancel()  # the client went away while waiting
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert adm.waiting == 0
        held()
        assert adm.in_flight == 0
        (await adm.acquire())()  # the slot is free again

    asyncio.run(run())


def test_bad_limits_are_refused():
    with pytest.raises(ValueError):
        Admission(0, 1, 1.0, 1)
