"""The SDXL pool's admission (pure logic, no workers contacted): a request reserves places for all its jobs when it
is admitted, so concurrent requests cannot over-commit the pool and an admitted job is never refused half-way."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from server.errors import APIError
from server.gateway.metrics import GatewayMetrics
from server.gateway.sdxl_pool import SDXLPool


def _pool(workers: int, *, max_in_flight: int, max_queue: int) -> SDXLPool:
    urls = tuple(f"http://127.0.0.1:{9000 + i}" for i in range(workers))
    pool = SDXLPool(urls, httpx.AsyncClient(), GatewayMetrics(), max_in_flight=max_in_flight, max_queue=max_queue)
    for w in pool.workers:
        w.up = True
    return pool


def test_reservations_bound_the_pool_and_are_returned():
    pool = _pool(2, max_in_flight=2, max_queue=1)  # 2×2 slots + 1 queued = 5 jobs
    assert pool.capacity() == 5
    with pool.reserve(3):
        with pytest.raises(APIError) as err:
            with pool.reserve(3):
                pass
        assert (err.value.status, err.value.code) == (429, "queue_full") and "retry-after" in err.value.headers
        with pool.reserve(2):  # exactly fills it
            assert pool.reserved == 5
    assert pool.reserved == 0
    with pool.reserve(5):
        pass


def test_no_worker_up_is_503_and_reserves_nothing():
    pool = _pool(1, max_in_flight=1, max_queue=4)
    pool.workers[0].up = False
    with pytest.raises(APIError) as err:
        with pool.reserve(1):
            pass
    assert (err.value.status, err.value.code) == (503, "image_worker_unavailable") and pool.reserved == 0


def test_an_admitted_job_waits_for_a_slot_instead_of_being_refused():
    """One slot and a queue of one: a request of two jobs is admitted, and its second job waits for the first one's
    slot rather than getting queue_full mid-request; a newcomer is refused up front."""
    async def run() -> None:
        pool = _pool(1, max_in_flight=1, max_queue=1)
        with pool.reserve(2):
            first = await pool._acquire(set(), None)
            second = asyncio.create_task(pool._acquire(set(), None))
            await asyncio.sleep(0.05)
            assert not second.done() and pool.waiting == 1
            with pytest.raises(APIError):
                with pool.reserve(1):
                    pass
            await pool._release(first)
            assert await asyncio.wait_for(second, 2) is first
            await pool._release(first)
        assert pool.reserved == 0 and pool.waiting == 0
        await pool.client.aclose()

    asyncio.run(run())
