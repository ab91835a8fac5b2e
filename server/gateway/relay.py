"""The chat relay: one chat completion body sent to an engine, with failover, and its answer passed back.

* **Failover.** The body goes to the least loaded up engine (a lease from :class:`EnginePool`). An engine that
  cannot be reached before anything was sent to the client is marked down (re-probed in the background) and the
  request moves to the next engine, each engine at most once; with none left the answer is 503 + ``retry-after``.
* **Streaming.** The relay waits for the engine's first event before answering, so an engine failing before then
  is retried elsewhere; after that, events pass through one by one as they arrive. An engine failure mid-stream ends
  the stream with an SSE ``error`` event. The engine is always asked for the usage chunk (token metrics), which is
  dropped again when the client did not ask for ``stream_options.include_usage``.
* **Errors.** Engine error bodies are normalised to the OpenAI shape (:func:`server.errors.normalize_upstream`);
  timeouts are 504, broken answers 502.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi.responses import StreamingResponse

from server.errors import APIError, normalize_upstream
from server.gateway import sse
from server.gateway.config import GatewayConfig
from server.gateway.engine_pool import Engine, EngineLease, EnginePool
from server.gateway.metrics import GatewayMetrics
from server.gateway.upstream import EngineClient, EngineFailed, EngineResponse, EngineTimeout, EngineUnreachable

logger = logging.getLogger("mgm.gateway")

#: Wraps a relayed event stream (the any-to-any images chunk is added this way).
StreamWrapper = Callable[[AsyncIterator[bytes]], AsyncIterator[bytes]]


def engine_unavailable(retry_after_s: int) -> APIError:
    return APIError(503, "No inference engine is available; retry shortly.", type_="server_error",
                    code="engine_unavailable", headers={"retry-after": str(retry_after_s)})


def _timeout() -> APIError:
    return APIError(504, "The engine did not answer in time.", type_="server_error", code="engine_timeout")


def _engine_error(message: str) -> APIError:
    return APIError(502, message, type_="server_error", code="engine_error")


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


class _RelayedStream(StreamingResponse):
    """A StreamingResponse that closes its upstream even when its body iterator never starts (client gone early)."""

    def __init__(self, content: AsyncIterator[bytes], upstream: _Upstream) -> None:
        super().__init__(content, media_type="text/event-stream", headers=sse.HEADERS)
        self.upstream = upstream

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.upstream.close()


class ChatRelay:
    def __init__(self, config: GatewayConfig, pool: EnginePool, client: EngineClient, metrics: GatewayMetrics) -> None:
        self.config, self.pool, self.client, self.metrics = config, pool, client, metrics

    async def _open(self, body: dict[str, Any], tried: set[Engine]) -> _Upstream:
        """Send ``body`` to the least loaded engine not in ``tried``; connection failures mark it down and move on.
        The caller owns the returned upstream (close it)."""
        while True:  # bounded: every engine at most once
            lease = self.pool.lease(tried)
            if lease is None:
                raise engine_unavailable(self.config.retry_after_s)
            engine = lease.engine
            tried.add(engine)
            payload = dict(body)
            if self.config.model_name and payload["model"] == self.config.model_name and engine.models:
                payload["model"] = engine.models[0]
            try:
                return _Upstream(lease, await self.client.post(engine.url + "/v1/chat/completions", payload))
            except EngineUnreachable as exc:
                lease.release()
                self._failed(engine, exc)
            except EngineTimeout:
                lease.release()
                raise _timeout() from None
            except BaseException:
                lease.release()
                raise

    def _failed(self, engine: Engine, exc: Exception) -> None:
        """Nothing reached the client yet: mark the engine down; the caller tries the next one."""
        self.pool.mark_down(engine, type(exc).__name__)
        self.metrics.engine_retries.inc()

    def _count_usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self.metrics.tokens.labels("prompt").inc(int(usage.get("prompt_tokens") or 0))
            self.metrics.tokens.labels("completion").inc(int(usage.get("completion_tokens") or 0))

    async def _error(self, upstream: _Upstream) -> APIError:
        """The engine's non-200 answer as our error (the upstream is closed)."""
        try:
            payload = json.loads(await upstream.response.aread())
        except (EngineFailed, ValueError):
            payload = None
        finally:
            await upstream.close()
        return normalize_upstream(upstream.response.status_code, payload)

    # --- non-streaming -----------------------------------------------------------------------------------------------

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """The engine's chat completion for ``body`` (JSON object)."""
        tried: set[Engine] = set()
        while True:  # bounded by _open: every engine at most once
            upstream = await self._open(body, tried)
            if upstream.response.status_code != 200:
                raise await self._error(upstream)
            try:
                raw = await upstream.response.aread()
            except EngineUnreachable as exc:  # the engine died before the answer was complete: try the next one
                self._failed(upstream.engine, exc)
                continue
            except EngineTimeout:
                raise _timeout() from None
            except EngineFailed:
                raise _engine_error("The engine failed while answering.") from None
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

    async def stream(self, body: dict[str, Any], include_usage: bool, wrap: StreamWrapper | None = None
                     ) -> StreamingResponse:
        """An SSE response relaying the engine's stream for ``body`` (optionally through ``wrap``)."""
        body = {**body, "stream_options": {**(body.get("stream_options") or {}), "include_usage": True}}
        tried: set[Engine] = set()
        timing = _StreamTiming(time.perf_counter())
        while True:  # bounded by _open: every engine at most once
            upstream = await self._open(body, tried)
            if upstream.response.status_code != 200:
                raise await self._error(upstream)
            events = sse.events(upstream.response.aiter_bytes())
            try:
                first: bytes | None = await anext(events)
            except StopAsyncIteration:
                first = None
            except EngineUnreachable as exc:
                await upstream.close()
                self._failed(upstream.engine, exc)
                continue
            except EngineTimeout:
                await upstream.close()
                raise _timeout() from None
            except BaseException:
                await upstream.close()
                raise
            relay = self._relay(upstream, events, first, include_usage, timing)
            return _RelayedStream(wrap(relay) if wrap is not None else relay, upstream)

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
                     include_usage: bool, timing: _StreamTiming) -> AsyncIterator[bytes]:
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
            logger.warning("engine failed mid-stream", extra={"fields": {"engine": upstream.engine.url,
                                                                            "error": type(exc).__name__}})
            yield sse.encode(_engine_error("The engine failed while streaming the answer.").body(), "error")
        finally:
            await upstream.close()


@dataclass
class _StreamTiming:
    """When the request started and when its first content chunk arrived (TTFT)."""

    start: float
    first: float | None = None
