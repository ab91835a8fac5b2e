"""The gateway's FastAPI app: ``/health``, ``/ready``, ``/v1/models``, ``/metrics``, ``POST /v1/chat/completions``.

Chat requests are validated (:mod:`server.gateway.schemas`), remote images are fetched and inlined as data URLs
(:mod:`server.gateway.images`), and the request goes to the up engine with the fewest requests in flight. An engine
that cannot be reached before anything was sent to the client is marked down (re-probed in the background) and the
request moves to the next engine; with none left the answer is 503 with ``retry-after``. Streams are passed on event
by event as the engine sends them; an engine failure mid-stream ends the stream with an SSE ``error`` event.

Streaming: the gateway always asks the engine for the usage chunk (token metrics) and drops it again when the client
did not ask for ``stream_options.include_usage``.

Images (when ``sdxl_workers`` are configured; the pool is :mod:`server.gateway.sdxl_pool`): ``POST
/v1/images/generations`` and ``GET /v1/files/images/{id}`` are documented in :mod:`server.gateway.generation`.

Any-to-any chat (generation mode, mgm.md §7). A chat request with ``"modalities": ["text", "image"]`` (only
``text`` and ``image`` are accepted there):

* the official `` <GEN>`` suffix is appended to the text of the last user turn; the model answers in text;
* the LAST complete ``<h>…</h>`` span of each choice's text (the official CLI's rule) is the SDXL prompt; the
  text itself is returned unchanged (``message.content`` keeps the ``<h>`` span);
* the image comes back in an extra field of the message, next to ``content``::

      "message": {"role": "assistant", "content": "... <h>a red fox</h>",
                  "images": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."},
                              "caption": "a red fox"}]}

  (the openai SDK keeps unknown fields: ``message.images`` / ``message.model_extra["images"]``). A choice without
  a complete ``<h>`` span gets no ``images`` field;
* optional ``"image_options"`` with the images API's fields ``size`` (default 1024x1024), ``response_format``
  (``b64_json`` (default) → data URL, ``url`` → gateway URL), ``quality``, ``style``, ``seed``,
  ``negative_prompt``, ``num_inference_steps``, ``guidance_scale``;
* streaming: text chunks pass through as the engine sends them; after the engine's last chunk (and after the usage
  chunk, if asked for) the gateway sends ONE more chunk, ``{"object": "chat.completion.chunk", "choices": [{"index":
  i, "delta": {"images": [...]}, "finish_reason": null}, ...]}`` with the images of every choice that has a caption,
  then ``data: [DONE]``. A failed image generation ends the stream with an SSE ``error`` event instead;
  non-streaming it is the request's error (e.g. 503 + ``retry-after`` when no worker is up).

The gateway never makes the model write a caption: what the engine returns is what is used (tests with random
weights ask the engine for constrained decoding, ``structured_outputs``, in the request body).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from server.gateway import errors, openapi
from server.gateway.admission import Admission
from server.gateway.auth import check_bearer
from server.gateway.config import GatewayConfig
from server.gateway.errors import APIError
from server.gateway.generation import (
    GEN_SUFFIX,
    ImageGenerationRequest,
    ImageOptions,
    ImageStore,
    add_gen_suffix,
    extract_caption,
    image_entry,
    parse_size,
)
from server.gateway.images import Resolver, check_data_url, fetch_image, system_resolver
from server.gateway.metrics import GatewayMetrics
from server.gateway.playground import ROUTES as PLAYGROUND_ROUTES
from server.gateway.playground import create_router as playground_router
from server.gateway.routing import Engine, EnginePool
from server.gateway.schemas import ChatCompletionRequest
from server.gateway.sdxl_pool import SDXLPool, gather_or_cancel, run_while_connected
from server.gateway.upstream import EngineClient, EngineFailed, EngineResponse, EngineTimeout, EngineUnreachable

logger = logging.getLogger("mgm.gateway")

ROUTES = ("/health", "/ready", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/images/generations",
          *PLAYGROUND_ROUTES)
_FILES_PREFIX = "/v1/files/images/"


class MetricsMiddleware:
    """Pure ASGI: counts every response by route and status and times it to its last byte (streams included)."""

    def __init__(self, app: Any, metrics: GatewayMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = path if path in ROUTES else ("/v1/files/images" if path.startswith(_FILES_PREFIX) else "other")
        status = 500
        start = time.perf_counter()

        async def _send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        gauge = self.metrics.in_flight.labels(route)
        gauge.inc()
        try:
            await self.app(scope, receive, _send)
        finally:
            gauge.dec()
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)


class Gateway:
    def __init__(self, config: GatewayConfig, resolver: Resolver = system_resolver) -> None:
        self.config = config
        self.resolver = resolver
        self.metrics = GatewayMetrics()
        self.client: httpx.AsyncClient | None = None  # probes, SDXL workers
        self.engine_client: EngineClient | None = None  # chat requests (server.gateway.upstream)
        self.pool: EnginePool | None = None
        self.sdxl: SDXLPool | None = None
        self.store = ImageStore(config.image_store_ttl_s, config.image_store_max_items, config.image_store_max_bytes)
        self.created = int(time.time())
        self.admission = Admission(config.chat_max_in_flight, config.chat_max_queue, config.chat_queue_timeout_s,
                                   config.retry_after_s, on_change=self._admission_changed,
                                   on_reject=self._admission_rejected)

    def _admission_changed(self, in_flight: int, waiting: int) -> None:
        self.metrics.chat_in_flight.set(in_flight)
        self.metrics.chat_queue_depth.set(waiting)

    def _admission_rejected(self, reason: str) -> None:
        self.metrics.rejected.labels("/v1/chat/completions", reason).inc()

    async def start(self) -> None:
        timeout = httpx.Timeout(self.config.request_timeout_s, connect=self.config.connect_timeout_s)
        self.client = httpx.AsyncClient(timeout=timeout, trust_env=False,
                                        limits=httpx.Limits(max_connections=1024, max_keepalive_connections=128))
        self.engine_client = EngineClient(self.config.connect_timeout_s, self.config.request_timeout_s)
        self.pool = EnginePool(self.config.engines, self.client, probe_interval_s=self.config.probe_interval_s,
                               on_change=self._engine_changed, discover_interval_s=self.config.discover_interval_s,
                               resolve=self.resolver, on_remove=self._engine_removed)
        await self.pool.probe_all()
        if self.config.sdxl_workers:
            self.sdxl = SDXLPool(self.config.sdxl_workers, self.client, self.metrics,
                                 max_in_flight=self.config.sdxl_max_in_flight, max_queue=self.config.sdxl_max_queue,
                                 probe_interval_s=self.config.probe_interval_s, retry_after_s=self.config.retry_after_s,
                                 job_timeout_s=self.config.sdxl_job_timeout_s,
                                 discover_interval_s=self.config.discover_interval_s, resolve=self.resolver)
            await self.sdxl.probe_all()
        logger.info("gateway started", extra={"fields": {
            "engines": ",".join(self.config.engines), "up": sum(e.up for e in self.pool.engines),
            "models": ",".join(self.pool.models()), "auth": bool(self.config.api_keys),
            "allow_loopback_images": self.config.images.allow_loopback}})

    async def stop(self) -> None:
        if self.pool is not None:
            await self.pool.close()
        if self.sdxl is not None:
            await self.sdxl.close()
        if self.client is not None:
            await self.client.aclose()
        if self.engine_client is not None:
            await self.engine_client.aclose()

    def _engine_changed(self, engine: Engine) -> None:
        self.metrics.engine_up.labels(engine.url).set(1 if engine.up else 0)
        self.metrics.engine_in_flight.labels(engine.url).set(engine.in_flight)

    def _engine_removed(self, engine: Engine) -> None:  # discovery dropped it: no stale per-engine series
        for gauge in (self.metrics.engine_up, self.metrics.engine_in_flight):
            with contextlib.suppress(KeyError):
                gauge.remove(engine.url)

    # --- models ----------------------------------------------------------------------------------------------------

    def chat_model_ids(self) -> list[str]:
        """The alias (if any) and the engines' own ids; empty while no engine has answered yet."""
        assert self.pool is not None
        engine_ids = self.pool.models()
        if not engine_ids:
            return []
        return list(dict.fromkeys(([self.config.model_name] if self.config.model_name else []) + engine_ids))

    def model_ids(self) -> list[str]:
        assert self.pool is not None
        ids = ([self.config.model_name] if self.config.model_name else []) + self.pool.models()
        if self.config.sdxl_workers:
            ids.append(self.config.image_model_name)
        return list(dict.fromkeys(ids))

    # --- chat ------------------------------------------------------------------------------------------------------

    async def inline_images(self, body: dict[str, Any]) -> None:
        """Replace every http(s) image URL in ``body`` by a data URL fetched under the image policy."""
        policy = self.config.images
        parts = [(part["image_url"], f"messages[{i}].content[{j}].image_url.url")
                 for i, message in enumerate(body["messages"]) if isinstance(message.get("content"), list)
                 for j, part in enumerate(message["content"]) if part.get("type") == "image_url"]
        if len(parts) > policy.max_images_per_request:  # before any image is looked at
            raise APIError(400, f"At most {policy.max_images_per_request} images per request.", param="messages",
                           code="too_many_images")
        jobs: list[tuple[dict[str, Any], str, str]] = []
        for holder, param in parts:
            url = holder["url"]
            if url[:5].lower() != "data:":
                jobs.append((holder, url, param))
                continue
            try:
                if len(url) > 256 * 1024:  # base64 decoding of a large image would stall the event loop
                    await asyncio.to_thread(check_data_url, url, policy)
                else:
                    check_data_url(url, policy)
            except APIError as exc:
                exc.param = param
                raise
        results = await asyncio.gather(*(fetch_image(url, policy, self.resolver) for _, url, _ in jobs),
                                       return_exceptions=True)
        for (holder, _url, param), result in zip(jobs, results):
            if isinstance(result, BaseException):
                self.metrics.image_fetches.labels("refused" if isinstance(result, APIError) else "error").inc()
                if isinstance(result, APIError):
                    result.param = param
                    raise result
                raise result
            self.metrics.image_fetches.labels("ok").inc()
            holder["url"] = result

    def _take(self, engine: Engine) -> None:
        engine.in_flight += 1
        self.metrics.engine_in_flight.labels(engine.url).set(engine.in_flight)

    def _release(self, engine: Engine) -> None:
        engine.in_flight -= 1
        if self.pool is not None and engine in self.pool.engines:  # not for a pod discovery already dropped
            self.metrics.engine_in_flight.labels(engine.url).set(engine.in_flight)

    async def open_upstream(self, body: dict[str, Any], tried: set[Engine]) -> tuple[Engine, EngineResponse]:
        """Send ``body`` to the least loaded engine not in ``tried``; connection failures mark it down and move on
        (each engine at most once per request). The caller owns the returned response and the engine's slot."""
        assert self.pool is not None and self.engine_client is not None
        while True:  # bounded: every engine at most once
            engine = self.pool.pick(tried)
            if engine is None:
                raise APIError(503, "No inference engine is available; retry shortly.", type_="server_error",
                               code="engine_unavailable", headers={"retry-after": str(self.config.retry_after_s)})
            tried.add(engine)
            payload = dict(body)
            if self.config.model_name and payload["model"] == self.config.model_name and engine.models:
                payload["model"] = engine.models[0]
            self._take(engine)
            try:
                return engine, await self.engine_client.post(engine.url + "/v1/chat/completions", payload)
            except EngineUnreachable as exc:
                self._release(engine)
                self._failed(engine, exc)
            except EngineTimeout:
                self._release(engine)
                raise _timeout() from None
            except BaseException:
                self._release(engine)
                raise

    def _failed(self, engine: Engine, exc: Exception) -> None:
        """Nothing reached the client yet: mark the engine down; the caller tries the next one."""
        assert self.pool is not None
        self.pool.mark_down(engine, type(exc).__name__)
        self.metrics.engine_retries.inc()

    def _count_usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self.metrics.tokens.labels("prompt").inc(int(usage.get("prompt_tokens") or 0))
            self.metrics.tokens.labels("completion").inc(int(usage.get("completion_tokens") or 0))

    async def _error_body(self, engine: Engine, upstream: EngineResponse) -> APIError:
        try:
            raw = await upstream.aread()
            payload = json.loads(raw)
        except (EngineFailed, ValueError):
            payload = None
        finally:
            await upstream.aclose()
            self._release(engine)
        return errors.normalize_upstream(upstream.status_code, payload)

    async def complete_payload(self, body: dict[str, Any]) -> dict[str, Any]:
        tried: set[Engine] = set()
        while True:  # bounded by open_upstream: every engine at most once
            engine, upstream = await self.open_upstream(body, tried)
            if upstream.status_code != 200:
                raise await self._error_body(engine, upstream)
            try:
                raw = await upstream.aread()
            except EngineUnreachable as exc:  # the engine died before the answer was complete: try the next one
                self._failed(engine, exc)
                continue
            except EngineTimeout:
                raise _timeout() from None
            except EngineFailed:
                raise _engine_error("The engine failed while answering.") from None
            finally:
                await upstream.aclose()
                self._release(engine)
            try:
                payload = json.loads(raw)
            except ValueError:
                raise _engine_error("The engine sent an invalid response.") from None
            if not isinstance(payload, dict):
                raise _engine_error("The engine sent an invalid response.")
            self._count_usage(payload.get("usage"))
            return payload

    async def stream(self, body: dict[str, Any], include_usage: bool,
                     wrap: Callable[[AsyncIterator[bytes]], AsyncIterator[bytes]] | None = None) -> Response:
        """Open a stream on an engine and wait for its first event before answering, so that an engine failing
        before then is retried elsewhere; after that, events pass through as they arrive."""
        body = {**body, "stream_options": {**(body.get("stream_options") or {}), "include_usage": True}}
        tried: set[Engine] = set()
        state: dict[str, Any] = {"start": time.perf_counter(), "first": None}
        while True:  # bounded by open_upstream: every engine at most once
            engine, upstream = await self.open_upstream(body, tried)
            if upstream.status_code != 200:
                raise await self._error_body(engine, upstream)
            closer = _Closer(self, engine, upstream)
            events = _sse_events(upstream)
            try:
                first: bytes | None = await anext(events)
            except StopAsyncIteration:
                first = None
            except EngineUnreachable as exc:
                await closer()
                self._failed(engine, exc)
                continue
            except EngineTimeout:
                await closer()
                raise _timeout() from None
            except BaseException:
                await closer()
                raise
            relay = self._relay(engine, events, first, include_usage, state, closer)
            if wrap is not None:
                relay = wrap(relay)
            return _ClosingStream(relay, closer, media_type="text/event-stream",
                                  headers={"cache-control": "no-cache", "x-accel-buffering": "no"})

    def _event(self, event: bytes, include_usage: bool, state: dict[str, Any]) -> bytes | None:
        """Inspect one SSE event for metrics; None drops it (the usage chunk the client did not ask for)."""
        for line in event.splitlines():
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                return event
            if state["first"] is not None and b'"usage"' not in data:  # the common token chunk: nothing to inspect
                return event
            try:
                chunk = json.loads(data)
            except ValueError:
                return event
            if not isinstance(chunk, dict):
                return event
            if chunk.get("choices") and state["first"] is None:
                state["first"] = time.perf_counter()
                self.metrics.ttft.observe(state["first"] - state["start"])
            if chunk.get("usage") and not chunk.get("choices"):
                self._count_usage(chunk["usage"])
                return event if include_usage else None
        return event

    async def _relay(self, engine: Engine, events: AsyncIterator[bytes], first: bytes | None, include_usage: bool,
                     state: dict[str, Any], closer: _Closer) -> AsyncIterator[bytes]:
        try:
            if first is not None and (out := self._event(first, include_usage, state)) is not None:
                yield out
            if first is not None:
                async for event in events:  # ends with the engine's stream
                    if (out := self._event(event, include_usage, state)) is not None:
                        yield out
        except EngineFailed as exc:
            assert self.pool is not None
            if isinstance(exc, EngineUnreachable):
                self.pool.mark_down(engine, type(exc).__name__)
            logger.warning("engine failed mid-stream", extra={"fields": {"engine": engine.url,
                                                                            "error": type(exc).__name__}})
            err = _engine_error("The engine failed while streaming the answer.")
            yield b"event: error\ndata: " + json.dumps(err.body()).encode() + b"\n\n"
        finally:
            await closer()

    # --- images ----------------------------------------------------------------------------------------------------

    def image_pool(self, param: str | None = None) -> SDXLPool:
        if self.sdxl is None:
            raise APIError(400, "Image generation is not configured on this gateway (no SDXL workers).", param=param,
                           code="images_not_configured")
        return self.sdxl

    def image_size(self, size: str | None, param: str = "size") -> tuple[int, int]:
        cfg = self.config
        value = cfg.image_default_size if size in (None, "auto") else size
        try:
            return parse_size(value, cfg.image_min_side, cfg.image_max_side)
        except ValueError as exc:
            raise APIError(400, f"Invalid value for '{param}': {exc}.", param=param, code="invalid_value") from None

    def _chat_model(self) -> str:
        assert self.pool is not None
        models = self.pool.models()
        if models:
            return models[0]
        raise APIError(503, "No inference engine is available; retry shortly.", type_="server_error",
                       code="engine_unavailable", headers={"retry-after": str(self.config.retry_after_s)})

    async def enhance(self, prompt: str) -> tuple[str, str]:
        """Paper Fig. 4 re-caption: ask the chat model in generation mode, take the last complete <h> span.
        Returns (SDXL prompt, "enhanced" | "no_caption")."""
        body = {"model": self._chat_model(), "messages": [{"role": "user", "content": prompt + GEN_SUFFIX}],
                "max_tokens": self.config.enhance_max_tokens, "temperature": self.config.enhance_temperature,
                "add_special_tokens": True}
        payload = await self.complete_payload(body)
        try:
            text = payload["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            text = ""
        caption = extract_caption(text)
        return (caption, "enhanced") if caption else (prompt, "no_caption")

    async def caption_images(self, captions: dict[int, str], options: ImageOptions, size: tuple[int, int],
                             base_url: str) -> dict[int, list[dict[str, Any]]]:
        """One image per caption (choice index → caption), as ``message.images`` entries."""
        pool = self.image_pool("modalities")
        fmt = options.response_format or "b64_json"

        async def one(caption: str) -> list[dict[str, Any]]:
            items = await pool.generate(options.worker_payload(caption, 1, *size))
            out = []
            for item in items:
                entry = image_entry(item, fmt, self.store, base_url)
                url = entry.get("url") or "data:image/png;base64," + entry["b64_json"]
                out.append({"type": "image_url", "image_url": {"url": url}, "caption": caption})
            return out

        indices = sorted(captions)
        results = await gather_or_cancel([one(captions[i]) for i in indices])
        self.metrics.images_generated.labels("/v1/chat/completions").inc(sum(len(r) for r in results))
        return dict(zip(indices, results))

    def image_stream(self, options: ImageOptions, size: tuple[int, int], base_url: str
                     ) -> Callable[[AsyncIterator[bytes]], AsyncIterator[bytes]]:
        """Wraps a chat stream: collects each choice's text; before ``[DONE]`` sends one chunk with the images."""

        async def wrap(events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
            texts: dict[int, str] = {}
            meta: dict[str, Any] = {}
            async for event in events:
                done = False
                for line in event.splitlines():
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        done = True
                        break
                    try:
                        chunk = json.loads(data)
                    except ValueError:
                        continue
                    if not isinstance(chunk, dict):
                        continue
                    for key in ("id", "created", "model"):
                        meta.setdefault(key, chunk.get(key))
                    for choice in chunk.get("choices") or []:
                        delta = choice.get("delta") or {}
                        index = int(choice.get("index") or 0)
                        texts[index] = texts.get(index, "") + (delta.get("content") or "")
                if done:
                    captions = {i: c for i, t in texts.items() if (c := extract_caption(t))}
                    if captions:
                        try:
                            images = await self.caption_images(captions, options, size, base_url)
                        except APIError as exc:
                            yield b"event: error\ndata: " + json.dumps(exc.body()).encode() + b"\n\n"
                            return
                        chunk = {"id": meta.get("id"), "object": "chat.completion.chunk",
                                 "created": meta.get("created") or int(time.time()), "model": meta.get("model"),
                                 "choices": [{"index": i, "delta": {"images": images[i]}, "logprobs": None,
                                              "finish_reason": None} for i in sorted(images)],
                                 "usage": None}
                        yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
                yield event

        return wrap


class _Closer:
    """Closes the engine response and frees the engine slot exactly once (from the relay or the response)."""

    def __init__(self, gateway: Gateway, engine: Engine, upstream: EngineResponse) -> None:
        self.gateway, self.engine, self.upstream, self.done = gateway, engine, upstream, False

    async def __call__(self) -> None:
        if self.done:
            return
        self.done = True
        try:
            await self.upstream.aclose()
        finally:
            self.gateway._release(self.engine)


class _ClosingStream(StreamingResponse):
    """A StreamingResponse that frees the engine even when its body iterator never starts (client gone early), and
    then runs ``on_close`` callbacks (the chat admission slot)."""

    def __init__(self, content: AsyncIterator[bytes], closer: _Closer, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.closer = closer
        self.on_close: list[Callable[[], None]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.closer()
            finally:
                for callback in self.on_close:
                    callback()


async def _sse_events(upstream: EngineResponse) -> AsyncIterator[bytes]:
    """The engine's body split into complete SSE events (``\n\n``-terminated), each as soon as it is complete."""
    buf = b""
    async for data in upstream.aiter_bytes():
        buf += data.replace(b"\r\n", b"\n")
        while (cut := buf.find(b"\n\n")) >= 0:  # bounded by the buffer
            event, buf = buf[:cut + 2], buf[cut + 2:]
            yield event
    if buf.strip():
        yield buf + b"\n\n"


def _generation_mode(body: dict[str, Any]) -> ImageOptions | None:
    """Pops ``modalities`` and ``image_options`` from the body; the image options when an image is asked for."""
    modalities = body.pop("modalities", None)
    options = body.pop("image_options", None)
    if modalities is None:
        if options is not None:
            raise APIError(400, "'image_options' needs \"modalities\": [\"text\", \"image\"].",
                           param="image_options", code="invalid_value")
        return None
    if not isinstance(modalities, list) or not all(m in ("text", "image") for m in modalities) or not modalities:
        raise APIError(400, "Invalid value for 'modalities': a list of \"text\" and \"image\".", param="modalities",
                       code="invalid_value")
    if "image" not in modalities:
        return None
    try:
        return ImageOptions.model_validate(options or {})
    except ValidationError as exc:
        err = errors.validation_error(exc.errors())
        if err.param:
            err.message = err.message.replace(f"'{err.param}'", f"'image_options.{err.param}'")
            err.param = "image_options." + err.param
        raise err from None


def _timeout() -> APIError:
    return APIError(504, "The engine did not answer in time.", type_="server_error", code="engine_timeout")


def _engine_error(message: str) -> APIError:
    return APIError(502, message, type_="server_error", code="engine_error")


def create_app(config: GatewayConfig, resolver: Resolver = system_resolver) -> FastAPI:
    gateway = Gateway(config, resolver)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    app = FastAPI(title="MGM gateway", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json")
    openapi.install(app)
    app.state.gateway = gateway
    errors.install(app)
    app.add_middleware(MetricsMiddleware, metrics=gateway.metrics)
    app.include_router(playground_router())  # the static playground page at / (server.gateway.playground)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error", exc_info=exc)
        return APIError(500, "The gateway hit an internal error.", type_="server_error",
                        code="internal_error").response()

    def authorize(request: Request) -> None:
        check_bearer(request.headers.get("authorization"), config.api_keys)

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready() -> JSONResponse:
        assert gateway.pool is not None
        pool = gateway.pool
        await asyncio.gather(*(pool.probe(e) for e in pool.engines))
        engines = [{"url": e.url, "up": e.up, "in_flight": e.in_flight} for e in pool.engines]
        for engine in pool.engines:
            if not engine.up:
                pool.mark_down(engine, "probe failed")
        extra: dict[str, Any] = {}
        sdxl = gateway.sdxl
        if sdxl is not None:
            await asyncio.gather(*(sdxl.probe(w) for w in sdxl.workers))
            for worker in sdxl.workers:
                if not worker.up:
                    await sdxl.mark_down(worker, "probe failed")
            extra["workers"] = sdxl.status()
        if not pool.any_up or (sdxl is not None and not sdxl.any_up):
            what = "inference engine" if not pool.any_up else "SDXL worker"
            err = APIError(503, f"No {what} is reachable.", type_="server_error", code="not_ready",
                           headers={"retry-after": str(config.retry_after_s)})
            return JSONResponse({**err.body(), "engines": engines, **extra}, status_code=503, headers=err.headers)
        return JSONResponse({"status": "ready", "engines": engines, **extra})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        authorize(request)
        data = [{"id": m, "object": "model", "created": gateway.created, "owned_by": "minigemini-serve"}
                for m in gateway.model_ids()]
        return JSONResponse({"object": "list", "data": data})

    async def read_json(request: Request) -> Any:
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > config.max_body_bytes:  # refused before a byte of it is read
            raise APIError(413, f"Request body is larger than {config.max_body_bytes} bytes.",
                           code="request_too_large")
        data = bytearray()
        async for piece in request.stream():  # bounded by the body cap
            data += piece
            if len(data) > config.max_body_bytes:
                raise APIError(413, f"Request body is larger than {config.max_body_bytes} bytes.",
                               code="request_too_large")
        try:
            return json.loads(data)
        except ValueError:
            raise APIError(400, "We could not parse the JSON body of your request.", code="invalid_json") from None

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorize(request)  # before the body is even parsed
        # Admission before the body is read and before any image is fetched: an overloaded gateway answers 429 now.
        release = await gateway.admission.acquire()
        try:
            response = await chat(request)
        except BaseException:
            release()
            raise
        if isinstance(response, _ClosingStream):
            response.on_close.append(release)  # the slot is held until the stream ends
        else:
            release()
        return response

    async def while_connected(request: Request, work: Any) -> Any:
        try:
            return await run_while_connected(request, work)
        except APIError as exc:
            if exc.code == "client_closed":
                gateway.metrics.client_disconnects.labels(request.url.path).inc()
            raise

    async def chat(request: Request) -> Response:
        raw = await read_json(request)
        try:
            req = ChatCompletionRequest.model_validate(raw)
        except ValidationError as exc:
            raise errors.validation_error(exc.errors()) from None
        if unknown := req.unknown_fields():
            logger.info("request has fields outside the OpenAI schema; forwarded to the engine",
                        extra={"fields": {"fields": ",".join(unknown)}})
        if config.sdxl_workers and req.model == config.image_model_name:
            raise APIError(400, f"'{req.model}' is an image model; use /v1/images/generations.", param="model",
                           code="invalid_model")
        known = gateway.chat_model_ids()
        if known and req.model not in known:
            raise APIError(404, f"The model '{req.model}' does not exist.", param="model", code="model_not_found")
        body = req.model_dump(exclude_unset=True)
        # vLLM's chat path tokenises without special tokens, but the official MGM prompt ids start with BOS: ask
        # for it (image prompts get the official ids either way; the engine's processor rebuilds them).
        body.setdefault("add_special_tokens", True)
        generation = _generation_mode(body)
        size = (0, 0)
        if generation is not None:
            gateway.image_pool("modalities")
            add_gen_suffix(body["messages"])
            size = gateway.image_size(generation.size, "image_options.size")
        await gateway.inline_images(body)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            wrap = None if generation is None else gateway.image_stream(generation, size, str(request.base_url))
            return await gateway.stream(body, include_usage, wrap)
        # Non-streaming: a client that hangs up cancels the engine request (the engine aborts it).
        payload = await while_connected(request, gateway.complete_payload(body))
        if generation is None:
            return JSONResponse(payload)
        captions: dict[int, str] = {}
        for choice in payload.get("choices") or []:
            text = (choice.get("message") or {}).get("content")
            if isinstance(text, str) and (caption := extract_caption(text)):
                captions[int(choice.get("index") or 0)] = caption
        if captions:
            images = await while_connected(request, gateway.caption_images(captions, generation, size,
                                                                           str(request.base_url)))
            for choice in payload["choices"]:
                if (index := int(choice.get("index") or 0)) in images:
                    choice["message"]["images"] = images[index]
        return JSONResponse(payload)

    @app.post("/v1/images/generations")
    async def images_generations(request: Request) -> Response:
        authorize(request)
        raw = await read_json(request)
        try:
            req = ImageGenerationRequest.model_validate(raw)
        except ValidationError as exc:
            raise errors.validation_error(exc.errors()) from None
        if unknown := sorted(req.model_extra or {}):
            logger.info("image request has fields this gateway ignores", extra={"fields": {"fields": ",".join(unknown)}})
        pool = gateway.image_pool()
        if req.model is not None and req.model != config.image_model_name:
            raise APIError(404, f"The model '{req.model}' does not exist.", param="model", code="model_not_found")
        width, height = gateway.image_size(req.size)
        pool.admit(len(pool.split(req.n)))  # fail fast (429/503) before spending engine time on the prompt
        if req.enhance_prompt:
            prompt, how = await while_connected(request, gateway.enhance(req.prompt))
        else:
            prompt, how = req.prompt, "disabled"
        items = await while_connected(request, pool.generate(req.worker_payload(prompt, req.n, width, height)))
        fmt = req.response_format or "url"
        base_url = str(request.base_url)
        data = [{**image_entry(item, fmt, gateway.store, base_url), "revised_prompt": prompt} for item in items]
        gateway.metrics.images_generated.labels("/v1/images/generations").inc(len(data))
        return JSONResponse({"created": int(time.time()), "data": data, "size": f"{width}x{height}",
                             "output_format": "png", "prompt_enhancement": how})

    @app.get("/v1/files/images/{image_id}")
    async def image_file(image_id: str) -> Response:
        data = gateway.store.get(image_id)
        if data is None:
            raise APIError(404, "No such image (unknown or expired).", param="image_id", code="not_found")
        return Response(data, media_type="image/png", headers={"cache-control": "private, max-age=3600"})

    return app
