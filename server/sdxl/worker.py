"""``mgm sdxl-worker``: one process, one ``StableDiffusionXLPipeline``, an HTTP job API in front of it.

Threads: uvicorn's event loop serves HTTP; a single inference thread owns the pipeline (diffusers is not
thread-safe, and one denoising loop already saturates a GPU). They meet in a bounded :class:`JobQueue`:

    POST /v1/generate → validate → Job → queue (full: 429 + retry-after) → inference thread takes a batch of
    compatible jobs → pipeline → PIL images → handler encodes PNGs (off the inference thread) → JSON response.

While a job waits or runs, its handler polls for the client's disconnect and cancels the job: a waiting job leaves
the queue at once; a running batch stops at the next denoising step once all of its jobs are cancelled.

Routes (``POST /v1/generate``, ``/health``, ``/ready``, ``/metrics``) and their fields: docs/api.md §6. Errors use the
OpenAI shape of :mod:`server.errors`, as the gateway's do.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import gc
import io
import logging
import math
import secrets
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool

from server.errors import APIError
from server.errors import install as install_error_handlers
from server.sdxl.batching import BatchKey, JobQueue, QueueClosed, QueueFull
from server.sdxl.config import WorkerConfig
from server.sdxl.pipeline import (
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    OFFICIAL_NEGATIVE_PROMPT,
    BatchCancelled,
    GenSpec,
    PipelineOptions,
)

logger = logging.getLogger("mgm.sdxl")

#: Final states of a job, one per job (``invalid``/``rejected``/``unavailable`` never reach the queue).
OUTCOMES = ("ok", "cancelled", "timeout", "error", "shutdown", "invalid", "rejected", "unavailable")
_POLL_S = 0.1  # how often a waiting handler checks for its client's disconnect
_MAX_RETRY_AFTER_S = 60  # the OpenAI SDK ignores longer hints


# --- configuration and request model ---------------------------------------------------------------------------------


class GenerateRequest(BaseModel):
    """``POST /v1/generate``. Strict types (no "64" for 64, no true for 1); unknown fields are an error — the
    worker's only client is the gateway, so a misspelt field is a bug to surface, not to ignore."""

    model_config = ConfigDict(strict=True, extra="forbid")

    prompt: str = Field(min_length=1, max_length=4000)
    #: Omitted → MGM's official negative prompt; null or "" → none (SDXL's zeroed negative embedding).
    negative_prompt: str | None = Field(default=OFFICIAL_NEGATIVE_PROMPT, max_length=4000)
    width: int | None = None  # None → the model's default size (1024 for SDXL base)
    height: int | None = None
    num_inference_steps: int = Field(default=DEFAULT_STEPS, ge=1)
    guidance_scale: float = Field(default=DEFAULT_GUIDANCE, ge=0.0, le=30.0, allow_inf_nan=False)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)  # None → random, reported back
    n: int = Field(default=1, ge=1)

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, v: int | None) -> int | None:
        # The VAE downsamples by 8 and the pipeline refuses other sizes.
        if v is not None and (v <= 0 or v % 8):
            raise ValueError("must be a positive multiple of 8")
        return v


# --- errors ----------------------------------------------------------------------------------------------------------


def _error(status: int, message: str, **fields: Any) -> JSONResponse:
    return APIError(status, message, **fields).response()


def _check_limits(req: GenerateRequest, config: WorkerConfig) -> JSONResponse | None:
    """Limits that depend on this worker's flags (pydantic checks the fixed ones)."""
    for name in ("width", "height"):
        v = getattr(req, name)
        if v is not None and not config.min_side <= v <= config.max_side:
            return _error(400, f"Invalid value for '{name}': must be between {config.min_side} and "
                                  f"{config.max_side}.", param=name, code="invalid_value")
    if req.num_inference_steps > config.max_steps:
        return _error(400, f"Invalid value for 'num_inference_steps': at most {config.max_steps}.",
                              param="num_inference_steps", code="invalid_value")
    if req.n > config.max_batch:
        return _error(400, f"Invalid value for 'n': at most {config.max_batch} images per request on this "
                              "worker.", param="n", code="invalid_value")
    return None


# --- metrics ---------------------------------------------------------------------------------------------------------

_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
_TIME_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)


class Metrics:
    """Own registry per app, so several workers (or tests) in one process do not collide."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.queue_depth = Gauge("mgm_sdxl_queue_depth", "Jobs waiting for a batch", registry=r)
        self.in_flight = Gauge("mgm_sdxl_in_flight_jobs", "Jobs in the running pipeline call", registry=r)
        self.ready = Gauge("mgm_sdxl_ready", "1 when the pipeline is loaded and warmed up", registry=r)
        self.jobs = Counter("mgm_sdxl_jobs", "Generation requests by final outcome", ["outcome"], registry=r)
        self.images = Counter("mgm_sdxl_images", "Images returned to clients", registry=r)
        self.batch_images = Histogram("mgm_sdxl_batch_images", "Images per pipeline call", buckets=_SIZE_BUCKETS,
                                      registry=r)
        self.batch_jobs = Histogram("mgm_sdxl_batch_jobs", "Jobs per pipeline call", buckets=_SIZE_BUCKETS, registry=r)
        self.batch_seconds = Histogram("mgm_sdxl_batch_seconds", "Wall time of one pipeline call",
                                       buckets=_TIME_BUCKETS, registry=r)
        self.queue_wait = Histogram("mgm_sdxl_queue_wait_seconds", "Time from acceptance to the start of its batch",
                                    buckets=_TIME_BUCKETS, registry=r)
        self.job_latency = Histogram("mgm_sdxl_job_latency_seconds", "Acceptance to response, successful jobs",
                                     buckets=_TIME_BUCKETS, registry=r)
        for outcome in OUTCOMES:  # export zeros, so rate() works from the first scrape
            self.jobs.labels(outcome)


# --- jobs and the inference thread -----------------------------------------------------------------------------------


@dataclass
class JobResult:
    images: list[Any]  # PIL images
    seeds: tuple[int, ...]
    batch_jobs: int
    batch_images: int
    queue_s: float
    encode_s: float
    denoise_s: float
    decode_s: float


class JobCancelled(Exception):
    pass


class JobFailed(Exception):
    pass


class JobOutOfMemory(JobFailed):
    """The batch ran out of (GPU) memory: the worker frees it and is not ready for a moment; retry elsewhere."""


def is_out_of_memory(exc: BaseException) -> bool:
    """``torch.cuda.OutOfMemoryError`` (matched by name: no torch import here) or any error that says so."""
    return (any(c.__name__ == "OutOfMemoryError" for c in type(exc).__mro__)
            or "out of memory" in str(exc).lower())


def release_memory() -> None:
    """Drop what the failed batch left behind: Python garbage first, then the CUDA caching allocator's free blocks."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass(eq=False)  # identity equality: the queue removes *this* job
class Job:
    id: str
    spec: GenSpec
    key: BatchKey
    created: float = field(default_factory=time.monotonic)
    future: concurrent.futures.Future[JobResult] = field(default_factory=concurrent.futures.Future)
    cancel_event: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str = "cancelled"
    outcome: str | None = None
    started: float | None = None

    @property
    def n(self) -> int:
        return len(self.spec.seeds)


class Worker:
    """Owns the queue, the inference thread, its state and the metrics."""

    def __init__(self, config: WorkerConfig, runner_factory: Callable[[PipelineOptions], Any] | None = None) -> None:
        config.validate()
        self.config = config
        self.model_name = config.model_name or Path(config.model).resolve().name
        self.queue: JobQueue[Job] = JobQueue(config.max_batch, config.max_queue)
        self.metrics = Metrics()
        self.state = "starting"  # starting → loading → warming → ready ⇄ recovering | failed; stopping at shutdown
        #: After an out-of-memory batch: seconds the worker stays not-ready once the memory is freed, so the
        #: gateway's probe sees it and sends jobs elsewhere (and other processes on the GPU settle).
        self.oom_cooldown_s = 2.0
        self.runner: Any = None
        self.info: dict[str, Any] = {}
        self._runner_factory = runner_factory
        self._stop = threading.Event()
        self._lock = threading.Lock()  # guards job outcomes and _running
        self._running: list[Job] = []
        self._batch_s: float | None = None  # moving average, for retry-after hints
        self._thread = threading.Thread(target=self._run, name="sdxl-inference", daemon=True)

    # lifecycle

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self.state = "stopping"
        self.metrics.ready.set(0)
        self._stop.set()
        for job in self.queue.close():
            self._finish(job, "shutdown", exc=JobFailed("worker is shutting down"))
        with self._lock:
            for job in self._running:
                job.cancel_reason = "shutdown"
                job.cancel_event.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self.state in ("starting", "loading", "warming", "ready", "recovering", "stopping") and (
            self._thread.is_alive() or self.state == "starting")

    @property
    def ready(self) -> bool:
        return self.state == "ready" and self._thread.is_alive()

    @property
    def default_size(self) -> int:
        return int(self.info.get("default_size", 1024))

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: queued batches × mean batch time (at least 1, at most 60)."""
        per_batch = self._batch_s or 1.0
        batches_ahead = len(self.queue) / self.config.max_batch + 1
        return max(1, min(_MAX_RETRY_AFTER_S, math.ceil(per_batch * batches_ahead)))

    # jobs

    def submit(self, job: Job) -> None:
        depth = self.queue.put(job)  # raises QueueFull / QueueClosed
        self.metrics.queue_depth.set(depth)

    def cancel(self, job: Job, reason: str) -> None:
        """Client gone or timed out: drop the job if it waits; a running batch sees the flag at its next step."""
        job.cancel_reason = reason
        job.cancel_event.set()
        if self.queue.remove(job):
            self.metrics.queue_depth.set(len(self.queue))
            self._finish(job, reason, exc=JobCancelled(reason))

    def count(self, outcome: str) -> None:
        self.metrics.jobs.labels(outcome).inc()

    def _finish(self, job: Job, outcome: str, result: JobResult | None = None, exc: Exception | None = None) -> None:
        with self._lock:
            if job.outcome is not None:  # exactly one outcome per job
                return
            job.outcome = outcome
        self.count(outcome)
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            if exc is not None:
                job.future.set_exception(exc)
            else:
                job.future.set_result(result)  # type: ignore[arg-type]
        if outcome != "ok":
            logger.info("job ended", extra={"fields": {"job": job.id, "outcome": outcome, "n": job.n}})

    # inference thread

    def _run(self) -> None:
        try:
            self._load()
        except Exception:
            self.state = "failed"
            logger.exception("SDXL pipeline failed to load", extra={"fields": {"model": str(self.config.model)}})
            for job in self.queue.close():
                self._finish(job, "error", exc=JobFailed("pipeline failed to load"))
            return
        while not self._stop.is_set():  # every take() waits at most 0.5 s, so stop() is seen promptly
            batch = self.queue.take(timeout=0.5, batch_wait=self.config.batch_wait_s)
            self.metrics.queue_depth.set(len(self.queue))
            live = []
            for job in batch:
                if job.cancel_event.is_set():  # cancelled between take() and now
                    self._finish(job, job.cancel_reason, exc=JobCancelled(job.cancel_reason))
                else:
                    live.append(job)
            if live:
                self._run_batch(live)

    def _load(self) -> None:
        from server.sdxl.tiny import is_tiny

        self.state = "loading"
        factory = self._runner_factory
        if factory is None:
            from server.sdxl.pipeline import SDXLRunner

            factory = SDXLRunner
        logger.info("loading SDXL pipeline", extra={"fields": {"model": str(self.config.model)}})
        if is_tiny(self.config.model):
            logger.warning("tiny SDXL checkpoint: RANDOM WEIGHTS, images are noise",
                           extra={"fields": {"model": str(self.config.model)}})
        self.runner = factory(self.config.pipeline_options())
        self.info = self.runner.describe()
        logger.info("pipeline loaded", extra={"fields": self.info})
        if self.config.warmup_steps:
            # First calls pay for lazy initialisation (cuDNN/oneDNN kernel choice, allocator growth): do it now,
            # at the default size, rather than in the first user's latency.
            self.state = "warming"
            size = self.default_size
            start = time.perf_counter()
            self.runner.generate([GenSpec("warm-up", OFFICIAL_NEGATIVE_PROMPT, (0,))], width=size, height=size,
                                 steps=self.config.warmup_steps, guidance_scale=DEFAULT_GUIDANCE)
            logger.info("warm-up done", extra={"fields": {"seconds": round(time.perf_counter() - start, 3),
                                                          "size": size, "steps": self.config.warmup_steps}})
        self.state = "ready"
        self.metrics.ready.set(1)
        logger.info("SDXL worker ready", extra={"fields": {"model_name": self.model_name}})

    def _run_batch(self, batch: list[Job]) -> None:
        key = batch[0].key
        start = time.monotonic()
        images = sum(j.n for j in batch)
        for job in batch:
            job.started = start
            self.metrics.queue_wait.observe(start - job.created)
        with self._lock:
            self._running = batch
        self.metrics.in_flight.set(len(batch))
        self.metrics.batch_jobs.observe(len(batch))
        self.metrics.batch_images.observe(images)
        try:
            res = self.runner.generate(
                [j.spec for j in batch], width=key.width, height=key.height, steps=key.steps,
                guidance_scale=key.guidance_scale, cancelled=lambda i: batch[i].cancel_event.is_set())
        except BatchCancelled:
            for job in batch:
                self._finish(job, job.cancel_reason, exc=JobCancelled(job.cancel_reason))
        except Exception as exc:  # a bad batch must not kill the worker; its jobs get a generic 500 (503 on OOM)
            oom = is_out_of_memory(exc)
            if oom:  # not ready before any client hears of the failure, so a retry does not land here again
                self.state = "recovering"
                self.metrics.ready.set(0)
            # The detail (CUDA allocator figures, paths) goes to the log only; clients get the job id to quote.
            logger.exception("pipeline call failed", extra={"fields": {
                "jobs": [j.id for j in batch], "error": type(exc).__name__, "out_of_memory": oom}})
            for job in batch:
                self._finish(job, "error", exc=JobOutOfMemory(job.id) if oom else JobFailed(job.id))
        else:
            for job, imgs in zip(batch, res.images):
                if imgs is None or job.cancel_event.is_set():
                    self._finish(job, job.cancel_reason, exc=JobCancelled(job.cancel_reason))
                else:
                    self._finish(job, "ok", JobResult(
                        images=imgs, seeds=job.spec.seeds, batch_jobs=len(batch), batch_images=images,
                        queue_s=start - job.created, encode_s=res.encode_s, denoise_s=res.denoise_s,
                        decode_s=res.decode_s))
        finally:
            with self._lock:
                self._running = []
            self.metrics.in_flight.set(0)
            elapsed = time.monotonic() - start
            self.metrics.batch_seconds.observe(elapsed)
            self._batch_s = elapsed if self._batch_s is None else 0.8 * self._batch_s + 0.2 * elapsed
            logger.debug("batch done", extra={"fields": {"jobs": len(batch), "images": images,
                                                         "seconds": round(elapsed, 3), "key": key}})
        if self.state == "recovering":  # outside the except block: the traceback's frames (and tensors) are gone
            self._recover()

    def _recover(self) -> None:
        start = time.monotonic()
        try:
            release_memory()
        except Exception:  # freeing failed: keep serving; the next batch tells whether the memory is there
            logger.exception("freeing memory after out-of-memory failed")
        self._stop.wait(max(0.0, self.oom_cooldown_s - (time.monotonic() - start)))
        if self.state == "recovering":  # not stopping meanwhile
            self.state = "ready"
            self.metrics.ready.set(1)
            logger.warning("SDXL worker ready again after out-of-memory",
                           extra={"fields": {"seconds": round(time.monotonic() - start, 3)}})


# --- HTTP ------------------------------------------------------------------------------------------------------------


def _png_b64(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def create_app(config: WorkerConfig, runner_factory: Callable[[PipelineOptions], Any] | None = None) -> FastAPI:
    worker = Worker(config, runner_factory)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        worker.start()  # loads and warms up in the background: /health answers meanwhile, /ready says 503
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop)

    app = FastAPI(title="MGM SDXL worker", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.worker = worker

    install_error_handlers(app, on_validation_error=lambda: worker.count("invalid"))

    @app.get("/health")
    async def health() -> JSONResponse:
        body = {"status": "ok" if worker.alive else "error", "state": worker.state}
        return JSONResponse(body, status_code=200 if worker.alive else 503)

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if not worker.ready:
            return _error(503, f"SDXL worker is not ready (state: {worker.state}).", type_="server_error",
                                  code="not_ready", headers={"retry-after": "1"})
        return JSONResponse({"status": "ready", "model": worker.model_name, "queue_depth": len(worker.queue),
                             "max_batch": config.max_batch, "max_queue": config.max_queue, **worker.info})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(worker.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/generate")
    async def generate(req: GenerateRequest, request: Request) -> Response:
        received = time.monotonic()
        if (bad := _check_limits(req, config)) is not None:
            worker.count("invalid")
            return bad
        if not worker.ready:
            worker.count("unavailable")
            return _error(503, f"SDXL worker is not ready (state: {worker.state}).", type_="server_error",
                                  code="not_ready", headers={"retry-after": str(worker.retry_after())})
        width = req.width or worker.default_size
        height = req.height or worker.default_size
        seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
        spec = GenSpec(prompt=req.prompt, negative_prompt=req.negative_prompt or None,
                       seeds=tuple(seed + i for i in range(req.n)))
        job = Job(id=f"img-{uuid.uuid4().hex[:24]}", spec=spec,
                  key=BatchKey(width, height, req.num_inference_steps, float(req.guidance_scale)))
        try:
            worker.submit(job)
        except QueueFull:
            worker.count("rejected")
            return _error(429, f"The SDXL queue is full ({config.max_queue} jobs waiting); retry later.",
                                  type_="rate_limit_error", code="queue_full",
                                  headers={"retry-after": str(worker.retry_after())})
        except QueueClosed:
            worker.count("unavailable")
            return _error(503, "The SDXL worker is shutting down.", type_="server_error",
                                  code="shutting_down", headers={"retry-after": "1"})
        logger.debug("job queued", extra={"fields": {"job": job.id, "n": job.n, "key": job.key}})

        waiter = asyncio.wrap_future(job.future)
        # Mark an outcome nobody awaits any more (client gone) as retrieved, so asyncio does not log it.
        waiter.add_done_callback(lambda f: f.cancelled() or f.exception())
        deadline = received + config.job_timeout_s
        try:
            while not waiter.done():  # bounded by the job timeout
                await asyncio.wait({waiter}, timeout=_POLL_S)
                if waiter.done():
                    break
                if await request.is_disconnected():
                    worker.cancel(job, "cancelled")
                    return Response(status_code=499)  # nobody reads it; the client is gone
                if time.monotonic() > deadline:
                    worker.cancel(job, "timeout")
                    return _error(504, f"Generation did not finish within {config.job_timeout_s:g} s.",
                                          type_="server_error", code="timeout")
        except asyncio.CancelledError:  # server shutting down under us
            worker.cancel(job, "shutdown")
            raise
        try:
            result = waiter.result()
        except JobCancelled as exc:
            status, code = (503, "shutting_down") if str(exc) == "shutdown" else (499, "cancelled")
            return _error(status, f"Generation was cancelled ({exc}).", type_="server_error", code=code)
        except JobFailed as exc:  # the message never carries the exception text (logged with the job id)
            if worker.state == "stopping":
                return _error(503, f"Generation was stopped: the SDXL worker is shutting down (job {job.id}).",
                              type_="server_error", code="shutting_down", headers={"retry-after": "1"})
            if isinstance(exc, JobOutOfMemory):
                return _error(503, f"Generation failed: the SDXL worker ran out of memory (job {job.id}); retry "
                                   "shortly.", type_="server_error", code="out_of_memory",
                              headers={"retry-after": str(max(1, math.ceil(worker.oom_cooldown_s)))})
            return _error(500, f"Generation failed (job {job.id}); the worker log has the details.",
                          type_="server_error", code="generation_failed")

        png_start = time.monotonic()
        data = await run_in_threadpool(lambda: [_png_b64(img) for img in result.images])
        done = time.monotonic()
        worker.metrics.images.inc(len(data))
        worker.metrics.job_latency.observe(done - job.created)
        timing = {"queue_s": result.queue_s, "encode_s": result.encode_s, "denoise_s": result.denoise_s,
                  "decode_s": result.decode_s, "png_s": done - png_start, "total_s": done - received}
        timing = {k: round(v, 4) for k, v in timing.items()}
        logger.info("job done", extra={"fields": {
            "job": job.id, "outcome": "ok", "n": job.n, "width": width, "height": height,
            "steps": req.num_inference_steps, "batch_jobs": result.batch_jobs, **timing}})
        return JSONResponse({
            "id": job.id,
            "object": "sdxl.generation",
            "created": int(time.time()),
            "model": worker.model_name,
            "width": width,
            "height": height,
            "num_inference_steps": req.num_inference_steps,
            "guidance_scale": float(req.guidance_scale),
            "output_format": "png",
            "data": [{"index": i, "seed": s, "b64_json": b} for i, (s, b) in enumerate(zip(result.seeds, data))],
            "batch": {"jobs": result.batch_jobs, "images": result.batch_images},
            "timing": timing,
        })

    return app
