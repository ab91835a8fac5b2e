"""The gateway's ASGI middleware, outermost first: metrics, client timeouts, admission, body limit. Each is a plain
ASGI callable and acts before FastAPI reads a body, so a refused request costs neither the upload nor the parse:

* :class:`MetricsMiddleware` counts every response by route and status and times it to its last byte (streams
  included);
* :class:`ClientTimeoutMiddleware` bounds how long a slow client can hold the gateway: a pause longer than the read
  timeout while its body arrives is a 408, and so is a body still arriving when the body timeout (counted from its
  first read) is over, however steadily it trickles; a response it does not read for longer than the write timeout
  is cut (and whatever the request held, an admission slot or an engine, is released with it);
* :class:`AdmissionMiddleware` authenticates, then takes an admission slot for the routes it guards (429/503 +
  ``retry-after`` when the gateway is full), held until the response's last byte;
* :class:`BodyLimitMiddleware` refuses a declared ``Content-Length`` over the cap at once and stops a body the
  moment it passes the byte cap or, for JSON, the cap on its number of values (413 ``request_too_large``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from server.errors import APIError
from server.gateway.admission import Admission
from server.gateway.auth import APIKeys
from server.gateway.metrics import GatewayMetrics

logger = logging.getLogger("mgm.gateway")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def _refuse(err: APIError, scope: Scope, receive: Receive, send: Send) -> None:
    await err.response()(scope, receive, send)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers") or ():
        if key == name:
            return value.decode("latin-1")
    return None


class MetricsMiddleware:
    """``route`` label: the path itself for ``routes``, the prefix's label for paths under ``prefixes``, else
    ``other`` (bounded label values whatever clients send)."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics, routes: frozenset[str],
                 prefixes: Mapping[str, str]) -> None:
        self.app, self.metrics, self.routes, self.prefixes = app, metrics, routes, prefixes

    def _route(self, path: str) -> str:
        if path in self.routes:
            return path
        return next((label for prefix, label in self.prefixes.items() if path.startswith(prefix)), "other")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = self._route(scope["path"])
        status = 500
        start = time.perf_counter()

        async def _send(message: Message) -> None:
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


#: A client's ``x-request-id`` is honoured when it is a plain token (it is logged and sent to the engine).
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def new_request_id() -> str:
    return "gw-" + uuid.uuid4().hex[:24]


def request_id(scope: Scope) -> str:
    """The request's id, set by :class:`RequestIdMiddleware` (a fresh one outside it, e.g. in unit tests)."""
    return scope.get("state", {}).get("request_id") or new_request_id()


class RequestIdMiddleware:
    """Every answer carries ``x-request-id`` (the client's when it is a plain token, else ``gw-…``; routes read it
    with :func:`request_id` and pass it to the engine and the logs) and ``openai-processing-ms`` (time to the
    headers), which the OpenAI SDKs expose as the response's request id and processing time."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"x-request-id") or ""
        rid = given if _REQUEST_ID.fullmatch(given) else new_request_id()
        scope.setdefault("state", {})["request_id"] = rid
        start = time.perf_counter()

        async def _send(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers += [(b"x-request-id", rid.encode()),
                            (b"openai-processing-ms", str(int((time.perf_counter() - start) * 1000)).encode())]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, _send)


class ClientGone(Exception):
    """The client did not read the response in time; raised from ``send`` so the app stops producing it."""


class ClientTimeoutMiddleware:
    def __init__(self, app: ASGIApp, metrics: GatewayMetrics, read_timeout_s: float, write_timeout_s: float,
                 body_timeout_s: float) -> None:
        self.app, self.metrics = app, metrics
        self.read_timeout_s, self.write_timeout_s, self.body_timeout_s = read_timeout_s, write_timeout_s, body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body_done = False
        deadline: float | None = None  # the whole body's, from its first read (not from a wait in the admission queue)

        async def timed_receive() -> Message:
            nonlocal body_done, deadline
            if body_done:  # afterwards receive() only waits for the disconnect: no limit
                return await receive()
            now = time.monotonic()
            if deadline is None:
                deadline = now + self.body_timeout_s
            whole_body = deadline - now < self.read_timeout_s  # the body deadline comes before the pause limit
            try:
                async with asyncio.timeout(min(self.read_timeout_s, max(0.0, deadline - now))):
                    message = await receive()
            except TimeoutError:
                self.metrics.client_timeouts.labels("read").inc()
                message = f"The request body took more than {self.body_timeout_s:g} s to arrive." if whole_body \
                    else f"The request body paused for more than {self.read_timeout_s:g} s."
                raise APIError(408, message, code="request_timeout") from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        async def timed_send(message: Message) -> None:
            try:
                async with asyncio.timeout(self.write_timeout_s):  # send() waits while the client's window is full
                    await send(message)
            except TimeoutError:
                self.metrics.client_timeouts.labels("write").inc()
                logger.warning("client stopped reading; response cut",
                               extra={"fields": {"path": scope["path"], "after_s": self.write_timeout_s}})
                raise ClientGone from None

        try:
            await self.app(scope, timed_receive, timed_send)
        except ClientGone:
            pass  # the response had started: nothing more can be said; uvicorn closes the connection


class AdmissionMiddleware:
    """``guarded``: path → the :class:`Admission` its POST requests go through (chat and images share one, so the
    images API's re-caption calls count against the same capacity as chat). The key is checked first: a caller
    without one gets 401 and never a slot. Refusals are counted in ``mgm_gateway_rejected_total{route,reason}``."""

    def __init__(self, app: ASGIApp, keys: APIKeys, guarded: Mapping[str, Admission], metrics: GatewayMetrics) -> None:
        self.app, self.keys, self.guarded, self.metrics = app, keys, guarded, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        admission = self.guarded.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if admission is None:
            await self.app(scope, receive, send)
            return
        try:
            self.keys.check(_header(scope, b"authorization"))
        except APIError as err:
            await _refuse(err, scope, receive, send)
            return
        try:
            release = await admission.acquire()
        except APIError as err:
            self.metrics.rejected.labels(scope["path"], err.code or "").inc()
            await _refuse(err, scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            release()


class BodyLimitMiddleware:
    """Caps a body's bytes and, for JSON bodies, its number of values: parsing turns a body of many small values into
    ~50x its size in Python objects (64 MiB of ``[0,0,…]`` would be gigabytes), while an image body is a few long
    base64 strings. Commas are counted as the bytes arrive (every array item and object member after the first brings
    one), so the cap holds before anything is parsed."""

    def __init__(self, app: ASGIApp, max_bytes: int, max_json_items: int) -> None:
        self.app, self.max_bytes, self.max_json_items = app, max_bytes, max_json_items

    def _too_large(self) -> APIError:
        return APIError(413, f"Request body is larger than {self.max_bytes} bytes.", code="request_too_large")

    def _too_many(self) -> APIError:
        return APIError(413, f"Request body has more than {self.max_json_items} JSON values.",
                        code="request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length") or ""
        if length.isdigit() and int(length) > self.max_bytes:  # refused before a byte of it is read
            await _refuse(self._too_large(), scope, receive, send)
            return
        ctype = (_header(scope, b"content-type") or "").split(";", 1)[0].strip().lower()
        count_items = ctype in ("", "application/json") or ctype.endswith("+json")
        seen = items = 0

        async def capped() -> Message:
            nonlocal seen, items
            message = await receive()
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                seen += len(chunk)
                if seen > self.max_bytes:  # raised inside the body read: the app's error handler answers 413
                    raise self._too_large()
                if count_items:
                    items += chunk.count(b",")
                    if items > self.max_json_items:
                        raise self._too_many()
            return message

        await self.app(scope, capped, send)
