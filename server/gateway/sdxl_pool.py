"""The gateway's SDXL worker pool (``mgm sdxl-worker`` processes, ``POST /v1/generate``).

* **Routing**: each job goes to the up worker with the fewest jobs in flight from this gateway (ties: the first
  listed). A worker takes at most ``max_in_flight`` jobs at a time from the gateway (one running, the rest queued in
  the worker where it can batch them).
* **Bounded queue, reserved up front**: when every up worker is at its cap, a job waits in the gateway. A request
  reserves places for all its jobs when it is admitted (:meth:`SDXLPool.reserve`, before any MGM re-caption time is
  spent) and holds them until its images are back: the pool never holds more jobs than the up workers' slots plus
  ``max_queue``, and a job that was admitted is never refused half-way (which would throw away its siblings' work).
  Beyond that the request gets 429 ``queue_full`` with ``retry-after``.
* **Retries**: a worker that refuses the connection, drops it, or answers 503 is marked down and the job moves to
  another worker (each worker at most once per job); a down worker is re-probed (``GET /ready``) every
  ``probe_interval_s`` until it answers again; up workers are re-checked in the background
  (:mod:`server.gateway.backends`, health of up backends). With no worker left: 503 ``image_worker_unavailable`` with
  ``retry-after``. A worker's 429 moves the job on as well (without marking it down); if every worker refuses, the
  429 is passed on.
* **Splitting**: a request for more images than a worker's ``max_batch`` (learnt from its ``/ready``) becomes
  several jobs run concurrently; with a ``seed``, job k starts at ``seed + (images before it)`` so image i always
  gets seed ``seed + i`` (the worker seeds image j of a job with ``seed + j``).
* **Cancellation**: a cancelled job (the client hung up: :mod:`server.gateway.cancellation`) cancels its upstream
  httpx request, which closes its connection; the worker notices and drops the job.
* **Discovery**: with ``discover_interval_s > 0`` a worker URL whose host is a DNS name (a headless Service) stands
  for every address it resolves to, re-resolved that often (:mod:`server.gateway.discovery`): new workers are
  probed and join, vanished ones leave (jobs already on them finish).
* **Metrics** (``GatewayMetrics``): ``mgm_gateway_sdxl_queue_depth``, ``mgm_gateway_sdxl_in_flight``,
  ``mgm_gateway_sdxl_latency_seconds`` (per successful job), ``mgm_gateway_sdxl_worker_up{worker}``,
  ``mgm_gateway_sdxl_retries``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from server.errors import APIError, normalize_upstream
from server.gateway import sse
from server.gateway.backends import Backend, BackendPool
from server.gateway.cancellation import gather_or_cancel
from server.gateway.discovery import Resolve
from server.gateway.metrics import GatewayMetrics

logger = logging.getLogger("mgm.gateway.sdxl")

_RETRYABLE = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


def _bad_answer() -> APIError:
    return APIError(502, "The image worker sent an invalid response.", type_="server_error", code="image_worker_error")


@dataclass(eq=False)
class SDXLWorker(Backend):
    max_batch: int = 4  # images per job; refreshed from the worker's /ready


class SDXLPool(BackendPool[SDXLWorker]):
    noun = "sdxl worker"
    log_field = "worker"

    def __init__(self, urls: tuple[str, ...], client: httpx.AsyncClient, metrics: GatewayMetrics, *,
                 max_in_flight: int = 2, max_queue: int = 32, probe_interval_s: float = 2.0,
                 probe_timeout_s: float = 2.0, retry_after_s: int = 2, job_timeout_s: float = 600.0,
                 discover_interval_s: float = 0.0, resolve: Resolve | None = None,
                 health_interval_s: float | None = None) -> None:
        super().__init__(urls, SDXLWorker, logger, probe_interval_s=probe_interval_s,
                         discover_interval_s=discover_interval_s, resolve=resolve,
                         health_interval_s=health_interval_s)
        self.client, self.metrics = client, metrics
        self.max_in_flight, self.max_queue = max_in_flight, max_queue
        self.probe_timeout_s = probe_timeout_s
        self.retry_after_s, self.job_timeout_s = retry_after_s, job_timeout_s
        self.waiting = 0
        self.reserved = 0  # jobs admitted (reserve) and not yet finished
        self._changed = asyncio.Condition()  # notified on every slot release and up/down change: wakes waiting jobs

    @property
    def workers(self) -> list[SDXLWorker]:
        return self.backends

    # --- probing ---------------------------------------------------------------------------------------------------

    async def check(self, worker: SDXLWorker) -> bool:
        """``GET /ready``: 200 = up (and its ``max_batch``); anything else = down. Records nothing."""
        try:
            r = await self.client.get(worker.url + "/ready", timeout=self.probe_timeout_s)
            ok = r.status_code == 200
            if ok:
                worker.max_batch = max(1, int(r.json().get("max_batch", worker.max_batch)))
        except (httpx.HTTPError, ValueError, TypeError, AttributeError):
            ok = False
        return ok

    async def probe(self, worker: SDXLWorker) -> bool:
        """:meth:`check`, recorded in ``worker.up`` (and the gauge); wakes waiting jobs."""
        ok = await self.check(worker)
        await self._set(worker, ok)
        return ok

    async def _health_failed(self, worker: SDXLWorker) -> None:
        await self.mark_down(worker, "health probe failed")

    async def _set(self, worker: SDXLWorker, up: bool) -> None:
        if self._record(worker, up):  # a worker removed by discovery keeps no metric series
            self.metrics.sdxl_worker_up.labels(worker.url).set(1 if up else 0)
        async with self._changed:
            self._changed.notify_all()

    async def mark_down(self, worker: SDXLWorker, reason: str) -> None:
        self._log_mark_down(worker, reason)
        await self._set(worker, False)
        self._start_reprobe(worker)

    async def _on_removed(self, removed: list[SDXLWorker]) -> None:
        for worker in removed:
            with contextlib.suppress(KeyError):
                self.metrics.sdxl_worker_up.remove(worker.url)
        self._gauges()
        async with self._changed:  # waiters re-check: their candidates may be gone
            self._changed.notify_all()

    def status(self) -> list[dict[str, Any]]:
        return [{"url": w.url, "up": w.up, "in_flight": w.in_flight, "max_batch": w.max_batch} for w in self.workers]

    # --- slots -----------------------------------------------------------------------------------------------------

    def _free(self, exclude: set[SDXLWorker]) -> SDXLWorker | None:
        candidates = [w for w in self.workers if w.up and w not in exclude and w.in_flight < self.max_in_flight]
        return min(candidates, key=lambda w: w.in_flight) if candidates else None

    def _gauges(self) -> None:
        self.metrics.sdxl_queue_depth.set(self.waiting)
        self.metrics.sdxl_in_flight.set(sum(w.in_flight for w in self.workers))

    def _unavailable(self) -> APIError:
        return APIError(503, "No image worker is available; retry shortly.", type_="server_error",
                        code="image_worker_unavailable", headers={"retry-after": str(self.retry_after_s)})

    def _queue_full(self) -> APIError:
        return APIError(429, f"The image queue is full ({self.max_queue} jobs waiting); retry later.",
                        code="queue_full", headers={"retry-after": str(self.retry_after_s)})

    def capacity(self) -> int:
        """Jobs the pool holds at once: every up worker's slots plus the gateway queue."""
        return sum(self.max_in_flight for w in self.workers if w.up) + self.max_queue

    @contextlib.contextmanager
    def reserve(self, jobs: int) -> Iterator[None]:
        """Admit a request of ``jobs`` jobs (503 with no worker up, 429 when they do not fit) and hold their places
        until the block ends. Synchronous check-and-take: no await between them, so concurrent requests cannot
        both take the last places."""
        if not self.any_up:
            raise self._unavailable()
        if self.reserved + jobs > self.capacity():
            raise self._queue_full()
        self.reserved += jobs
        try:
            yield
        finally:
            self.reserved -= jobs

    async def _acquire(self, tried: set[SDXLWorker], last_error: APIError | None) -> SDXLWorker:
        """A slot on the least loaded up worker not in ``tried``; waits (bounded queue) while all are busy."""
        worker = self._free(tried)
        if worker is None:
            if not any(w.up and w not in tried for w in self.workers):
                raise last_error or self._unavailable()
            # No queue_full here: the job's place was reserved when its request was admitted.
            self.waiting += 1
            self._gauges()
            try:
                async with self._changed:
                    while (worker := self._free(tried)) is None:  # woken by every release and up/down change
                        if not any(w.up and w not in tried for w in self.workers):
                            raise last_error or self._unavailable()
                        await self._changed.wait()
            finally:
                self.waiting -= 1
                self._gauges()
        worker.in_flight += 1
        self._gauges()
        return worker

    async def _release(self, worker: SDXLWorker) -> None:
        worker.in_flight -= 1
        self._gauges()
        async with self._changed:
            self._changed.notify_all()

    # --- jobs ------------------------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _job(self, payload: dict[str, Any], *, stream: bool) -> AsyncIterator[httpx.Response]:
        """A worker's 200 answer to one ``/v1/generate`` call, its slot held while the block runs; a dead worker's
        job moves to another (each worker at most once). Without ``stream`` the body is read here, so a worker that
        dies mid-job is retried elsewhere; a stream's body is the caller's to read."""
        tried: set[SDXLWorker] = set()
        last_error: APIError | None = None
        request_timeout = httpx.Timeout(self.job_timeout_s, connect=self.probe_timeout_s)
        while True:  # bounded: every worker at most once
            worker = await self._acquire(tried, last_error)
            tried.add(worker)
            start = time.perf_counter()
            try:
                request = self.client.build_request("POST", worker.url + "/v1/generate", json=payload,
                                                    timeout=request_timeout)
                try:
                    r = await self.client.send(request, stream=True)
                    if r.status_code != 200 or not stream:
                        await r.aread()
                except _RETRYABLE as exc:
                    await self.mark_down(worker, type(exc).__name__)
                    self.metrics.sdxl_retries.inc()
                    last_error = self._unavailable()
                    continue
                except httpx.TimeoutException:
                    raise APIError(504, "The image worker did not answer in time.", type_="server_error",
                                   code="image_worker_timeout") from None
                try:
                    if r.status_code == 200:
                        yield r
                        self.metrics.sdxl_latency.observe(time.perf_counter() - start)
                        return
                    try:
                        body = r.json()
                    except ValueError:
                        body = None
                    if r.status_code == 503:  # not ready / shutting down: take it out and try another
                        await self.mark_down(worker, "503")
                        self.metrics.sdxl_retries.inc()
                        last_error = self._unavailable()
                        continue
                    if r.status_code == 429:  # its own queue is full: try another, else pass the 429 on
                        self.metrics.sdxl_retries.inc()
                        err = normalize_upstream(429, body)
                        err.headers = {"retry-after": r.headers.get("retry-after", str(self.retry_after_s))}
                        last_error = err
                        continue
                    raise normalize_upstream(r.status_code, body, upstream="image worker")
                finally:
                    await r.aclose()
            finally:
                await self._release(worker)

    async def run_job(self, payload: dict[str, Any]) -> list[dict[str, Any]]:
        """One ``/v1/generate`` call (``payload["n"]`` ≤ every worker's ``max_batch``), retried elsewhere on a dead
        worker. Returns the worker's ``data`` items (``b64_json``, ``seed``)."""
        async with self._job(payload, stream=False) as r:
            try:
                return list(r.json()["data"])
            except (ValueError, KeyError, TypeError):
                raise _bad_answer() from None

    async def stream_job(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """One streamed ``/v1/generate`` call: the worker's ``partial_image`` / ``image`` events in order (docs/api.md,
        the worker's API). A worker error event, a cut stream or a lost connection after the first event → 502."""
        async with self._job({**payload, "stream": True}, stream=True) as r:
            try:
                async for event in sse.events(r.aiter_raw()):
                    data = sse.data(event)
                    if data is None:
                        continue
                    if data == sse.DONE:
                        return
                    item = sse.json_data(event)
                    if not isinstance(item, dict):
                        raise _bad_answer()
                    if item.get("type") == "error":
                        raise normalize_upstream(502, item, upstream="image worker")
                    yield item
            except httpx.HTTPError:
                raise APIError(502, "The image worker's connection was lost while drawing.", type_="server_error",
                               code="image_worker_error") from None
            raise APIError(502, "The image worker's stream ended before its last image.", type_="server_error",
                           code="image_worker_error")

    def split(self, n: int) -> list[int]:
        """Images per job for a request of ``n`` images (the smallest ``max_batch`` of the up workers)."""
        per_job = min((w.max_batch for w in self.workers if w.up), default=4)
        sizes = [per_job] * (n // per_job)
        if n % per_job:
            sizes.append(n % per_job)
        return sizes

    def _jobs(self, payload: dict[str, Any], sizes: list[int]) -> list[tuple[int, dict[str, Any]]]:
        """(first image index, job payload) per job; with a seed, job k starts at ``seed + images before it``."""
        jobs, offset = [], 0
        for size in sizes:
            job = {**payload, "n": size}
            if payload.get("seed") is not None:
                job["seed"] = payload["seed"] + offset
            jobs.append((offset, job))
            offset += size
        return jobs

    async def generate(self, payload: dict[str, Any], *, reserved: bool = False) -> list[dict[str, Any]]:
        """``payload`` as for the worker, any ``n``: split into jobs, run concurrently, images in order. Reserves
        places for its jobs itself unless the caller holds a :meth:`reserve` block (``reserved=True``)."""
        sizes = self.split(int(payload.get("n", 1)))
        if not reserved:
            with self.reserve(len(sizes)):
                return await self.generate(payload, reserved=True)
        jobs = [self.run_job(job) for _offset, job in self._jobs(payload, sizes)]
        if len(jobs) == 1:
            return await jobs[0]
        results = await gather_or_cancel(jobs)
        return [item for items in results for item in items]

    async def generate_stream(self, payload: dict[str, Any], *, reserved: bool = False
                              ) -> AsyncIterator[dict[str, Any]]:
        """:meth:`generate`, streamed: every job's events as they come (jobs run concurrently), ``index`` counted
        over the whole request. Closing the iterator cancels the jobs still running."""
        sizes = self.split(int(payload.get("n", 1)))
        if not reserved:
            with self.reserve(len(sizes)):
                async for item in self.generate_stream(payload, reserved=True):
                    yield item
            return
        jobs = self._jobs(payload, sizes)
        if len(jobs) == 1:
            async for item in self.stream_job(jobs[0][1]):
                yield item
            return
        queue: asyncio.Queue[dict[str, Any] | BaseException | None] = asyncio.Queue()

        async def pump(offset: int, job: dict[str, Any]) -> None:
            try:
                async for item in self.stream_job(job):
                    await queue.put({**item, "index": offset + int(item.get("index", 0))})
                await queue.put(None)
            except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
                await queue.put(exc)

        tasks = [asyncio.ensure_future(pump(offset, job)) for offset, job in jobs]
        try:
            left = len(tasks)
            while left:  # bounded: each task puts exactly one None or one exception last
                got = await queue.get()
                if got is None:
                    left -= 1
                elif isinstance(got, BaseException):
                    raise got
                else:
                    yield got
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
