"""The chat relay: one chat completion body sent to an engine, with failover, and its answer passed back.

* **Failover, by kind of fault** (the taxonomy of :mod:`server.gateway.upstream`). The body goes to the least loaded
  up engine (a lease from :class:`EnginePool`); each request carries an id (the caller's ``x-request-id`` or a
  generated ``gw-…``), sent to the engine as ``x-request-id`` and named in every error message and log line of the
  request.

  - *Nothing was sent* (connection refused, connect timeout): the engine is marked down (re-probed in the
    background) and the request moves to the next engine, each engine at most once.
  - *A stale pooled connection* (reset or closed before the answer on a reused keep-alive connection): re-sent once
    on a fresh connection to the same engine, which stays up (:meth:`EngineClient.post`).
  - *Connection lost after the request was sent* (on a fresh connection, or mid-answer before the client saw a
    byte): the request may be what crashed the engine. The engine is marked down and the request is sent again at
    most :data:`MAX_CRASH_RETRIES` time(s), not once per engine; after that the answer is 502 ``engine_error``
    naming the request id (``mgm_gateway_engine_crashes`` counts these losses).
  - *A read timeout* is 504 (the engine is slow, not gone); *a 5xx answer* is passed on, and repeated 5xx answers
    make the pool skip that engine for a while (:mod:`server.gateway.engine_pool`, error back-off).

  With no engine left the answer is 503 + ``retry-after``.
* **Streaming.** The relay waits for the engine's first event before answering, so an engine failing before then
  is retried elsewhere (as above); after that, events pass through one by one as they arrive. An engine failure
  mid-stream ends the stream with an SSE ``error`` event naming the request id. The engine is always asked for the
  usage chunk (token metrics), which is dropped again when the client did not ask for
  ``stream_options.include_usage``.
* **Errors.** Engine error bodies are normalised to the OpenAI shape (:func:`server.errors.normalize_upstream`);
  a 5xx's text is logged, not passed on (a generic message naming the request id); timeouts are 504, broken
  answers 502.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import StreamingResponse

from server.errors import APIError, normalize_upstream
from server.gateway import sse
from server.gateway.config import GatewayConfig
from server.gateway.engine_pool import Engine, EngineLease, EnginePool
from server.gateway.metrics import GatewayMetrics
from server.gateway.middleware import new_request_id
from server.gateway.streaming import EventStream
from server.gateway.routing import routing_key, tag_images
from server.gateway.upstream import (
    EngineClient,
    EngineConnectFailed,
    EngineFailed,
    EngineResponse,
    EngineTimeout,
    EngineUnreachable,
)

logger = logging.getLogger("mgm.gateway")

#: Wraps a relayed event stream (the any-to-any images chunk is added this way).
StreamWrapper = Callable[[AsyncIterator[bytes]], AsyncIterator[bytes]]

#: How many more times a request is sent after its connection to an engine was lost once it had been sent.
MAX_CRASH_RETRIES = 1


def _req(request_id: str | None) -> str:
    return f" (request {request_id})" if request_id else ""


def engine_unavailable(retry_after_s: int, request_id: str | None = None) -> APIError:
    return APIError(503, f"No inference engine is available; retry shortly.{_req(request_id)}", type_="server_error",
                    code="engine_unavailable", headers={"retry-after": str(retry_after_s)})


def _timeout(request_id: str) -> APIError:
    return APIError(504, f"The engine did not answer in time{_req(request_id)}.", type_="server_error",
                    code="engine_timeout")


def _engine_error(message: str) -> APIError:
    return APIError(502, message, type_="server_error", code="engine_error")


#: The engines' routes the relay speaks to.
CHAT_PATH, COMPLETIONS_PATH = "/v1/chat/completions", "/v1/completions"


@dataclass
class _Attempt:
    """One request's way through the engines: its id, the engines tried, connections lost after sending."""

    request_id: str
    key: str | None = None  # the routing key (server.gateway.routing)
    tried: set[Engine] = field(default_factory=set)
    crashes: int = 0

    @classmethod
    def of(cls, body: dict[str, Any], request_id: str | None) -> _Attempt:
        tag_images(body)
        return cls(request_id or new_request_id(), routing_key(body))


class _Upstream:
    """One engine response being read and the lease it holds; :meth:`close` closes and releases exactly once (from
    the relay or from the response, whichever ends first)."""

    def __init__(self, lease: EngineLease, response: EngineResponse) -> None:
        self.lease, self.response = lease, response

    @property
    def engine(self) -> Engine:
        return self.lease.engine

    async def close(self) -> None:
        if self.lease.released:
            return
        try:
            await self.response.aclose()
        finally:
            self.lease.release()


class ChatRelay:
    def __init__(self, config: GatewayConfig, pool: EnginePool, client: EngineClient, metrics: GatewayMetrics) -> None:
        self.config, self.pool, self.client, self.metrics = config, pool, client, metrics

    async def _open(self, body: dict[str, Any], attempt: _Attempt, path: str = CHAT_PATH) -> _Upstream:
        """Send ``body`` to the least loaded engine not tried yet; failures move on by the rule in the module
        docstring. The caller owns the returned upstream (close it)."""
        while True:  # bounded: every engine at most once
            lease = self.pool.lease(attempt.tried, attempt.key)
            if lease is None:
                raise engine_unavailable(self.config.retry_after_s, attempt.request_id)
            engine = lease.engine
            attempt.tried.add(engine)
            payload = dict(body)
            if self.config.model_name and payload["model"] == self.config.model_name and engine.models:
                payload["model"] = engine.models[0]
            try:
                response = await self.client.post(engine.url + path, payload, attempt.request_id)
            except EngineConnectFailed as exc:  # nothing was sent
                lease.release()
                self._failed(engine, exc, attempt)
                continue
            except EngineUnreachable as exc:  # lost after sending (a stale pooled connection was re-sent already)
                lease.release()
                self._crashed(engine, exc, attempt)
                continue
            except EngineTimeout:
                lease.release()
                raise _timeout(attempt.request_id) from None
            except BaseException:
                lease.release()
                raise
            self.pool.answered(engine, response.status_code)
            return _Upstream(lease, response)

    def _failed(self, engine: Engine, exc: Exception, attempt: _Attempt) -> None:
        """Nothing was sent (or reached the client): mark the engine down; the caller tries the next one."""
        logger.warning("engine unreachable, trying the next one", extra={"fields": {
            "engine": engine.url, "error": type(exc).__name__, "request_id": attempt.request_id}})
        self.pool.mark_down(engine, type(exc).__name__)
        self.metrics.engine_retries.inc()

    def _crashed(self, engine: Engine, exc: Exception, attempt: _Attempt) -> None:
        """The connection was lost after the request was sent: mark the engine down; the caller may try one more
        engine (:data:`MAX_CRASH_RETRIES`), after that this raises 502 naming the request id."""
        attempt.crashes += 1
        self.pool.mark_down(engine, type(exc).__name__)
        self.metrics.engine_crashes.inc()
        final = attempt.crashes > MAX_CRASH_RETRIES
        logger.warning("engine connection lost after the request was sent", extra={"fields": {
            "engine": engine.url, "error": type(exc).__name__, "request_id": attempt.request_id,
            "attempt": attempt.crashes, "retry": not final}})
        if final:
            raise _engine_error(f"The engine failed while answering (request {attempt.request_id}); the request "
                                f"was tried {attempt.crashes} times and is not retried again.")
        self.metrics.engine_retries.inc()

    def _count_usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self.metrics.tokens.labels("prompt").inc(int(usage.get("prompt_tokens") or 0))
            self.metrics.tokens.labels("completion").inc(int(usage.get("completion_tokens") or 0))

    async def _error(self, upstream: _Upstream, request_id: str) -> APIError:
        """The engine's non-200 answer as our error (the upstream is closed; a 5xx's text only logged)."""
        try:
            payload = json.loads(await upstream.response.aread())
        except (EngineFailed, ValueError):
            payload = None
        finally:
            await upstream.close()
        return normalize_upstream(upstream.response.status_code, payload, request_id)

    # --- non-streaming -----------------------------------------------------------------------------------------------

    async def complete(self, body: dict[str, Any], request_id: str | None = None,
                       path: str = CHAT_PATH) -> dict[str, Any]:
        """The engine's answer for ``body`` (JSON object) on ``path`` (chat completions, or the legacy text
        completions); ``request_id``: the caller's, else generated."""
        attempt = _Attempt.of(body, request_id)
        while True:  # bounded by _open: every engine at most once
            upstream = await self._open(body, attempt, path)
            if upstream.response.status_code != 200:
                raise await self._error(upstream, attempt.request_id)
            try:
                raw = await upstream.response.aread()
            except EngineUnreachable as exc:  # the engine died before the answer was complete
                self._crashed(upstream.engine, exc, attempt)
                continue
            except EngineTimeout:
                raise _timeout(attempt.request_id) from None
            except EngineFailed:
                raise _engine_error(f"The engine failed while answering (request {attempt.request_id}).") from None
            finally:
                await upstream.close()
            try:
                payload = json.loads(raw)
            except ValueError:
                raise _engine_error("The engine sent an invalid response.") from None
            if not isinstance(payload, dict):
                raise _engine_error("The engine sent an invalid response.")
            self._count_usage(payload.get("usage"))
            return payload

    # --- streaming ---------------------------------------------------------------------------------------------------

    async def stream(self, body: dict[str, Any], include_usage: bool, wrap: StreamWrapper | None = None,
                     request_id: str | None = None, path: str = CHAT_PATH) -> StreamingResponse:
        """An SSE response relaying the engine's stream for ``body`` (optionally through ``wrap``)."""
        body = {**body, "stream_options": {**(body.get("stream_options") or {}), "include_usage": True}}
        attempt = _Attempt.of(body, request_id)
        timing = _StreamTiming(time.perf_counter())
        while True:  # bounded by _open: every engine at most once
            upstream = await self._open(body, attempt, path)
            if upstream.response.status_code != 200:
                raise await self._error(upstream, attempt.request_id)
            events = sse.events(upstream.response.aiter_bytes())
            try:
                first: bytes | None = await anext(events)
            except StopAsyncIteration:
                first = None
            except EngineUnreachable as exc:
                await upstream.close()
                self._crashed(upstream.engine, exc, attempt)
                continue
            except EngineTimeout:
                await upstream.close()
                raise _timeout(attempt.request_id) from None
            except BaseException:
                await upstream.close()
                raise
            relay = self._relay(upstream, events, first, include_usage, timing, attempt.request_id)
            return EventStream(wrap(relay) if wrap is not None else relay, on_close=upstream.close)

    def _inspect(self, event: bytes, include_usage: bool, timing: _StreamTiming) -> bytes | None:
        """Look at one event for metrics; None drops it (the usage chunk the client did not ask for)."""
        data = sse.data(event)
        if data is None or data == sse.DONE:
            return event
        if timing.first is not None and b'"usage"' not in data:  # the common token chunk: nothing to inspect
            return event
        try:
            chunk = json.loads(data)
        except ValueError:
            return event
        if not isinstance(chunk, dict):
            return event
        if chunk.get("choices") and timing.first is None:
            timing.first = time.perf_counter()
            self.metrics.ttft.observe(timing.first - timing.start)
        if chunk.get("usage") and not chunk.get("choices"):
            self._count_usage(chunk["usage"])
            return event if include_usage else None
        return event

    async def _relay(self, upstream: _Upstream, events: AsyncIterator[bytes], first: bytes | None,
                     include_usage: bool, timing: _StreamTiming, request_id: str) -> AsyncIterator[bytes]:
        try:
            if first is not None and (out := self._inspect(first, include_usage, timing)) is not None:
                yield out
            if first is not None:
                async for event in events:  # ends with the engine's stream
                    if (out := self._inspect(event, include_usage, timing)) is not None:
                        yield out
        except EngineFailed as exc:
            if isinstance(exc, EngineUnreachable):
                self.pool.mark_down(upstream.engine, type(exc).__name__)
            logger.warning("engine failed mid-stream", extra={"fields": {
                "engine": upstream.engine.url, "error": type(exc).__name__, "request_id": request_id}})
            yield sse.encode(_engine_error(f"The engine failed while streaming the answer (request {request_id})."
                                           ).body(), "error")
        finally:
            await upstream.close()


@dataclass
class _StreamTiming:
    """When the request started and when its first content chunk arrived (TTFT)."""

    start: float
    first: float | None = None
