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
import json
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
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
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
    #: Edits: base64 of the input image (img2img), and of an OpenAI-style mask (PNG; alpha 0 = repaint: inpainting).
    image: str | None = None
    mask: str | None = None
    #: img2img/inpainting strength; None → 0.8 for img2img, 1.0 for inpainting.
    strength: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: int = Field(default=100, ge=0, le=100)
    stream: bool = False
    partial_images: int = Field(default=0, ge=0, le=3)

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, v: int | None) -> int | None:
        # The VAE downsamples by 8 and the pipeline refuses other sizes.
        if v is not None and (v <= 0 or v % 8):
            raise ValueError("must be a positive multiple of 8")
        return v

    @property
    def mode(self) -> str:
        return "inpaint" if self.mask is not None else "img2img" if self.image is not None else "text2img"

    @property
    def effective_strength(self) -> float:
        """What the pipeline runs with (text-to-image: always 1.0, so such jobs batch whatever was sent)."""
        if self.mode == "text2img" or self.strength is None:
            return DEFAULT_STRENGTH[self.mode]
        return float(self.strength)


#: img2img moves this far from the input by default (diffusers' own default, 0.3, barely changes it); inpainting
#: repaints the masked part completely.
DEFAULT_STRENGTH = {"text2img": 1.0, "img2img": 0.8, "inpaint": 1.0}


def _open_image(data: str, param: str) -> Any:
    """A base64 image of the request, decoded (PNG/JPEG/WebP only), or a 400 naming ``param``."""
    from PIL import Image

    try:
        raw = base64.b64decode(data, validate=True)
        with Image.open(io.BytesIO(raw), formats=("PNG", "JPEG", "WEBP")) as img:
            img.load()
            return img.copy()
    except Exception:  # noqa: BLE001 - bad base64 or an unreadable image: the client's error
        raise APIError(400, f"'{param}' is not a base64 PNG, JPEG or WebP image.", param=param,
                       code="invalid_image") from None


def edit_inputs(req: GenerateRequest, width: int, height: int) -> tuple[Any, Any]:
    """(input image as RGB at width×height, diffusers mask "L" with white = repaint) for an edit request."""
    from PIL import Image

    if req.mask is not None and req.image is None:
        raise APIError(400, "'mask' needs an 'image'.", param="mask", code="invalid_value")
    if req.image is None:
        return None, None
    source = _open_image(req.image, "image")
    image = source.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
    if req.mask is None:
        return image, None
    mask = _open_image(req.mask, "mask")
    if mask.size != source.size:
        raise APIError(400, f"'mask' is {mask.width}x{mask.height}, the image {source.width}x{source.height}.",
                       param="mask", code="invalid_value")
    if "A" not in mask.getbands() and "transparency" not in mask.info:
        raise APIError(400, "'mask' has no alpha channel (alpha 0 marks what to repaint).", param="mask",
                       code="invalid_image")
    alpha = mask.convert("RGBA").getchannel("A")
    repaint = alpha.point(lambda a: 255 if a == 0 else 0)  # OpenAI: fully transparent = edit here
    return image, repaint.resize((width, height), Image.Resampling.NEAREST)


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
    strength = req.effective_strength
    if req.mode != "text2img" and int(req.num_inference_steps * strength) < 1:  # diffusers runs steps × strength
        return _error(400, f"Invalid value for 'strength': {strength:g} × {req.num_inference_steps} steps leaves no "
                      "denoising step; raise either.", param="strength", code="invalid_value")
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
        self.mode_jobs = Counter("mgm_sdxl_mode_jobs", "Accepted jobs by mode", ["mode"], registry=r)
        self.previews = Counter("mgm_sdxl_previews", "Preview images streamed to clients", registry=r)
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
        for mode in DEFAULT_STRENGTH:
            self.mode_jobs.labels(mode)


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
    #: Streamed jobs: called on the inference thread with (preview index, one PIL image per seed).
    on_preview: Callable[[int, list[Any]], None] | None = None

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
        self.oom_cooldown_s = config.oom_cooldown_s
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
            def on_preview(i: int, k: int, images: list[Any]) -> None:
                if (sink := batch[i].on_preview) is not None:
                    sink(k, images)

            res = self.runner.generate(
                [j.spec for j in batch], width=key.width, height=key.height, steps=key.steps,
                guidance_scale=key.guidance_scale, cancelled=lambda i: batch[i].cancel_event.is_set(),
                mode=key.mode, strength=key.strength, on_preview=on_preview)
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


def encode_image(image: Any, fmt: str = "png", compression: int = 100) -> str:
    """Base64 of ``image`` in ``fmt``. JPEG/WebP: ``compression`` is the encoder's quality (OpenAI's
    ``output_compression``, 100 = best); PNG is lossless and ignores it, as OpenAI's API does."""
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG")
    else:
        image.save(buf, format=fmt.upper(), quality=max(1, compression))
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
        try:  # decoding MBs of base64 and resizing: off the event loop
            image, mask = await run_in_threadpool(edit_inputs, req, width, height)
        except APIError as exc:
            worker.count("invalid")
            return exc.response()
        seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
        spec = GenSpec(prompt=req.prompt, negative_prompt=req.negative_prompt or None,
                       seeds=tuple(seed + i for i in range(req.n)), image=image, mask=mask,
                       previews=req.partial_images if req.stream else 0)
        job = Job(id=f"img-{uuid.uuid4().hex[:24]}", spec=spec,
                  key=BatchKey(width, height, req.num_inference_steps, float(req.guidance_scale), req.mode,
                               req.effective_strength))
        previews: asyncio.Queue[tuple[int, list[Any]]] = asyncio.Queue()
        if req.stream:
            loop = asyncio.get_running_loop()
            job.on_preview = lambda k, imgs: loop.call_soon_threadsafe(previews.put_nowait, (k, imgs))
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
        worker.metrics.mode_jobs.labels(req.mode).inc()
        logger.debug("job queued", extra={"fields": {"job": job.id, "n": job.n, "key": job.key}})

        waiter = asyncio.wrap_future(job.future)
        # Mark an outcome nobody awaits any more (client gone) as retrieved, so asyncio does not log it.
        waiter.add_done_callback(lambda f: f.cancelled() or f.exception())
        deadline = received + config.job_timeout_s
        if req.stream:
            return StreamingResponse(_stream(req, job, waiter, previews, deadline), media_type="text/event-stream",
                                     headers={"cache-control": "no-cache"})
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
        except (JobCancelled, JobFailed) as exc:
            return _failure(job, exc).response()

        encode_start = time.monotonic()
        data = await run_in_threadpool(lambda: [encode_image(img, req.output_format, req.output_compression)
                                                for img in result.images])
        done = time.monotonic()
        timing = _finished(req, job, result, received, encode_start, done, len(data))
        return JSONResponse({
            "id": job.id,
            "object": "sdxl.generation",
            "created": int(time.time()),
            "model": worker.model_name,
            "width": width,
            "height": height,
            "num_inference_steps": req.num_inference_steps,
            "guidance_scale": float(req.guidance_scale),
            "mode": req.mode,
            "output_format": req.output_format,
            "data": [{"index": i, "seed": s, "b64_json": b} for i, (s, b) in enumerate(zip(result.seeds, data))],
            "batch": {"jobs": result.batch_jobs, "images": result.batch_images},
            "timing": timing,
        })

    def _failure(job: Job, exc: Exception) -> APIError:
        """What a client hears of a job that did not produce images (the exception text is only logged)."""
        if isinstance(exc, JobCancelled):
            status, code = (503, "shutting_down") if str(exc) == "shutdown" else (499, "cancelled")
            return APIError(status, f"Generation was cancelled ({exc}).", type_="server_error", code=code)
        if worker.state == "stopping":
            return APIError(503, f"Generation was stopped: the SDXL worker is shutting down (job {job.id}).",
                            type_="server_error", code="shutting_down", headers={"retry-after": "1"})
        if isinstance(exc, JobOutOfMemory):
            return APIError(503, f"Generation failed: the SDXL worker ran out of memory (job {job.id}); retry "
                                 "shortly.", type_="server_error", code="out_of_memory",
                            headers={"retry-after": str(max(1, math.ceil(worker.oom_cooldown_s)))})
        return APIError(500, f"Generation failed (job {job.id}); the worker log has the details.",
                        type_="server_error", code="generation_failed")

    def _finished(req: GenerateRequest, job: Job, result: JobResult, received: float, encode_start: float,
                  done: float, images: int) -> dict[str, float]:
        worker.metrics.images.inc(images)
        worker.metrics.job_latency.observe(done - job.created)
        timing = {"queue_s": result.queue_s, "encode_s": result.encode_s, "denoise_s": result.denoise_s,
                  "decode_s": result.decode_s, "png_s": done - encode_start, "total_s": done - received}
        timing = {k: round(v, 4) for k, v in timing.items()}
        logger.info("job done", extra={"fields": {
            "job": job.id, "outcome": "ok", "n": job.n, "mode": job.key.mode, "width": job.key.width,
            "height": job.key.height, "steps": req.num_inference_steps, "batch_jobs": result.batch_jobs, **timing}})
        return timing

    async def _stream(req: GenerateRequest, job: Job, waiter: asyncio.Future[JobResult],
                      previews: asyncio.Queue[tuple[int, list[Any]]], deadline: float) -> AsyncIterator[bytes]:
        """The streamed answer (docs/api.md, the worker's API): previews as the batch produces them, then every final
        image, then ``[DONE]``; a failure is an ``error`` event. Leaving early (client gone) cancels the job."""
        def event(payload: dict[str, Any]) -> bytes:
            return b"data: " + json.dumps(payload).encode() + b"\n\n"

        async def partial(k: int, imgs: list[Any]) -> AsyncIterator[bytes]:
            encoded = await run_in_threadpool(lambda: [encode_image(i, req.output_format, req.output_compression)
                                                       for i in imgs])
            worker.metrics.previews.inc(len(encoded))
            for index, b64 in enumerate(encoded):
                yield event({"type": "partial_image", "index": index, "partial_image_index": k, "b64_json": b64})

        received = time.monotonic()
        try:
            while not waiter.done():  # bounded by the job timeout
                getter = asyncio.ensure_future(previews.get())
                await asyncio.wait({waiter, getter}, timeout=_POLL_S, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    await asyncio.gather(getter, return_exceptions=True)
                elif not getter.cancelled():
                    async for chunk in partial(*getter.result()):
                        yield chunk
                if time.monotonic() > deadline:
                    worker.cancel(job, "timeout")
                    yield event({"type": "error", **APIError(504, "Generation did not finish within "
                                 f"{config.job_timeout_s:g} s.", type_="server_error", code="timeout").body()})
                    return
            try:
                result = waiter.result()
            except (JobCancelled, JobFailed) as exc:
                yield event({"type": "error", **_failure(job, exc).body()})
                return
            while not previews.empty():  # previews of the last steps, queued as the job finished
                async for chunk in partial(*previews.get_nowait()):
                    yield chunk
            encode_start = time.monotonic()
            data = await run_in_threadpool(lambda: [encode_image(img, req.output_format, req.output_compression)
                                                    for img in result.images])
            _finished(req, job, result, received, encode_start, time.monotonic(), len(data))
            for index, (seed, b64) in enumerate(zip(result.seeds, data)):
                yield event({"type": "image", "index": index, "seed": seed, "b64_json": b64})
            yield b"data: [DONE]\n\n"
        finally:
            if not waiter.done():  # the client left (or the server is stopping) while the job was alive
                worker.cancel(job, "cancelled")

    return app
