"""The load generator's HTTP side: one OpenAI request → one :class:`loadtests.stats.RequestResult`.

aiohttp (as vLLM's bench uses) with one shared session per run; SSE events are cut from the raw bytes by
`server.gateway.sse` (the gateway's own reader), so large events (the any-to-any chunk carrying a base64 PNG) are
not cut by a line-length limit. An event is timestamped as soon as its last byte arrives, before JSON parsing.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from loadtests.stats import RequestResult
from server.gateway import sse


@dataclass(frozen=True)
class Request:
    """One request of a scenario: POST ``path`` with ``body``; ``kind`` tags it in the results."""

    kind: str
    path: str
    body: dict[str, Any]

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))


def new_session(timeout_s: float = 600.0) -> aiohttp.ClientSession:
    """A session without a connection cap (the scenario's concurrency is the only limit)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=False),
                                 timeout=aiohttp.ClientTimeout(total=timeout_s))


async def send(session: aiohttp.ClientSession, base: str, req: Request) -> RequestResult:
    """Send ``req`` to ``base`` and time it; never raises for HTTP or transport failures (they become results)."""
    start = time.perf_counter()
    result = RequestResult(kind=req.kind, ok=False, start=start, latency=0.0)
    try:
        async with session.post(base + req.path, json=req.body) as resp:
            result.status = resp.status
            if resp.status != 200:
                result.error = (await resp.text())[:200]
            elif req.stream:
                await _read_stream(resp, result, start)
            else:
                _read_json(await resp.json(), result)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:200]
    result.latency = time.perf_counter() - start
    if result.ok and not req.stream:
        result.ttft = result.latency  # vLLM's convention for non-streaming requests
    return result


def _read_json(data: dict[str, Any], result: RequestResult) -> None:
    if "error" in data:
        result.error = str(data["error"])[:200]
        return
    if "choices" in data:
        message = data["choices"][0].get("message") or {}
        result.images = len(message.get("images") or [])
    elif data.get("object") == "response":  # the Responses API
        result.images = sum(item.get("type") == "image_generation_call" for item in data.get("output") or [])
    else:  # images API
        result.images = len(data.get("data") or [])
    _usage(data, result)
    result.ok = True


def _usage(data: dict[str, Any], result: RequestResult) -> None:
    usage = data.get("usage") or {}
    if "completion_tokens" in usage:
        result.output_tokens = int(usage["completion_tokens"])
        result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    elif "output_tokens" in usage:  # the Responses API's names
        result.output_tokens = int(usage["output_tokens"])
        result.prompt_tokens = int(usage.get("input_tokens") or 0)


async def _read_stream(resp: aiohttp.ClientResponse, result: RequestResult, start: float) -> None:
    last = None
    chunks = 0
    usage_seen = False
    done = False
    async for event in sse.events(resp.content.iter_any()):
        now = time.perf_counter()
        payload = sse.data(event)
        if payload is None:  # a comment, a keep-alive
            continue
        if payload == sse.DONE:
            done = True
            continue
        data = json.loads(payload)  # not JSON: a ValueError, which send() reports as the request's error
        if "error" in data:
            result.error = str(data["error"])[:200]
            return
        if "type" in data:  # a Responses API event (no [DONE]: the final response event ends the stream)
            status = _responses_event(data, result, now, start, last)
            if status == "delta":
                chunks += 1
                last = now
            elif status == "failed":
                return
            elif status == "done":
                usage_seen = done = True
            continue
        if data.get("usage"):
            _usage(data, result)
            usage_seen = True
        for choice in data.get("choices") or []:
            delta = choice.get("delta") or {}
            result.images += len(delta.get("images") or [])
            if delta.get("content"):
                chunks += 1
                if last is None:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
    if not done:
        result.error = "stream ended without [DONE] (or the Responses API's final response event)"
        return
    if not usage_seen:  # no usage chunk: one token per content chunk (what the engine sends)
        result.output_tokens = chunks
    result.ok = True


def _responses_event(event: dict[str, Any], result: RequestResult, now: float, start: float,
                     last: float | None) -> str | None:
    """Account one Responses stream event: ``delta`` (a text delta, timed), ``done``, ``failed`` or None."""
    kind = event["type"]
    if kind == "response.output_text.delta" and event.get("delta"):
        if last is None:
            result.ttft = now - start
        else:
            result.itl.append(now - last)
        return "delta"
    if kind == "response.image_generation_call.completed":
        result.images += 1
    elif kind == "response.failed":
        result.error = str((event.get("response") or {}).get("error"))[:200]
        return "failed"
    elif kind in ("response.completed", "response.incomplete"):
        _usage(event.get("response") or {}, result)
        return "done"
    return None
