"""The load generator around the statistics: scenarios, the client's SSE timing against a real loopback server,
closed and open loop bounds."""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter

import pytest
from aiohttp import web

from loadtests.client import Request, new_session, send
from loadtests.loadgen import Bounds, check_loopback, closed_loop, open_loop, run_level
from loadtests.scenarios import MIX, Scenario, mixed_kind
from loadtests.stats import RequestResult

GAP = 0.05  # seconds between the test server's content chunks


def _chunk(delta: dict) -> bytes:
    return b"data: " + json.dumps({"choices": [{"index": 0, "delta": delta}]}).encode() + b"\n\n"


async def _chat(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    if body.get("model") == "missing":
        return web.json_response({"error": {"message": "no such model"}}, status=404)
    if not body.get("stream"):
        await asyncio.sleep(GAP)
        return web.json_response({"choices": [{"message": {"content": "abc"}}],
                                  "usage": {"prompt_tokens": 5, "completion_tokens": 3}})
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    if body.get("model") == "split":  # events cut across writes, several in one write, a keep-alive comment
        first = _chunk({"content": "a"})
        await resp.write(b": keep-alive\r\n\r\n" + first[:9])
        await asyncio.sleep(GAP)
        await resp.write(first[9:] + _chunk({"content": "b"}) + b"data: [DONE]\n\n")
        return resp
    await resp.write(_chunk({"role": "assistant", "content": ""}))  # no content: not the first token
    await asyncio.sleep(GAP)
    for piece in ("a", "b", "c"):
        await resp.write(_chunk({"content": piece}))
        await asyncio.sleep(GAP)
    if body.get("stream_options", {}).get("include_usage"):
        await resp.write(b'data: {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 7}}\n\n')
    if body.get("model") != "truncated":
        await resp.write(b"data: [DONE]\n\n")
    return resp


def _event(kind: str, **fields: object) -> bytes:
    return f"event: {kind}\n".encode() + b"data: " + json.dumps({"type": kind, **fields}).encode() + b"\n\n"


async def _responses(request: web.Request) -> web.StreamResponse:
    """OpenAI's Responses shapes: the final object, or the event stream that ends with the response event."""
    body = await request.json()
    usage = {"input_tokens": 9, "output_tokens": 4, "total_tokens": 13}
    done = {"object": "response", "status": "completed", "usage": usage, "output": [
        {"type": "message", "content": [{"type": "output_text", "text": "abc"}]},
        {"type": "image_generation_call", "result": "aGk="}]}
    if not body.get("stream"):
        await asyncio.sleep(GAP)
        return web.json_response(done)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(_event("response.created", response={"status": "in_progress"}))
    await asyncio.sleep(GAP)
    for piece in ("a", "b", "c"):
        await resp.write(_event("response.output_text.delta", delta=piece))
        await asyncio.sleep(GAP)
    if body.get("model") == "failing":
        await resp.write(_event("response.failed", response={"error": {"code": "server_error", "message": "boom"}}))
        return resp
    await resp.write(_event("response.image_generation_call.completed", item_id="ig_1"))
    if body.get("model") != "truncated":
        await resp.write(_event("response.completed", response=done))
    return resp


@pytest.fixture(scope="module")
def server():
    """A real aiohttp server on 127.0.0.1 in a thread, speaking the OpenAI SSE shape with known timings."""
    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_post("/v1/responses", _responses)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def _send(base: str, body: dict, path: str = "/v1/chat/completions") -> RequestResult:
    async def go() -> RequestResult:
        async with new_session() as session:
            return await send(session, base, Request("chat", path, body))
    return asyncio.run(go())


def test_stream_timing_and_usage(server):
    r = _send(server, {"model": "m", "stream": True, "stream_options": {"include_usage": True}})
    assert r.ok and r.status == 200 and r.error == ""
    assert GAP * 0.8 < r.ttft < GAP * 4  # the empty role chunk does not count as the first token
    assert len(r.itl) == 2 and all(GAP * 0.8 < g < GAP * 4 for g in r.itl)
    assert r.latency >= r.ttft + sum(r.itl)
    assert (r.output_tokens, r.prompt_tokens) == (7, 5)  # from usage, not from the chunk count


def test_stream_without_usage_counts_chunks_and_truncation_fails(server):
    assert _send(server, {"model": "m", "stream": True}).output_tokens == 3
    r = _send(server, {"model": "truncated", "stream": True})
    assert not r.ok and "[DONE]" in r.error


def test_stream_events_timed_when_complete(server):
    """An event counts when its last byte arrives: the first token lands after the write that completes it."""
    r = _send(server, {"model": "split", "stream": True})
    assert r.ok and r.output_tokens == 2
    assert r.ttft > GAP * 0.8 and len(r.itl) == 1 and r.itl[0] < GAP / 2  # "b" came in the same write


def test_responses_stream_and_object(server):
    r = _send(server, {"model": "m", "stream": True}, "/v1/responses")
    assert r.ok and r.error == "" and GAP * 0.8 < r.ttft < GAP * 4
    assert len(r.itl) == 2 and all(GAP * 0.8 < g < GAP * 4 for g in r.itl)
    assert (r.output_tokens, r.prompt_tokens, r.images) == (4, 9, 1)  # usage from the final response event
    r = _send(server, {"model": "failing", "stream": True}, "/v1/responses")
    assert not r.ok and "boom" in r.error
    r = _send(server, {"model": "truncated", "stream": True}, "/v1/responses")
    assert not r.ok and "ended" in r.error  # no final response event
    r = _send(server, {"model": "m"}, "/v1/responses")
    assert r.ok and (r.output_tokens, r.images) == (4, 1) and r.ttft == r.latency


def test_non_streaming_and_http_errors(server):
    r = _send(server, {"model": "m"})
    assert r.ok and r.output_tokens == 3 and r.ttft == r.latency and r.itl == []
    r = _send(server, {"model": "missing"})
    assert not r.ok and r.status == 404 and "no such model" in r.error
    r = _send("http://127.0.0.1:9", {"model": "m"})  # nothing listens on the discard port
    assert not r.ok and r.status == 0 and r.error


def test_closed_loop_concurrency_and_bounds(server):
    body = {"model": "m", "stream": True}
    make = lambda i: Request("chat", "/v1/chat/completions", body)  # noqa: E731
    results, wall = asyncio.run(closed_loop(server, make, 4, Bounds(8), progress=False))
    assert len(results) == 8 and all(r.ok for r in results)
    # 8 requests of ~4 gaps each, 4 at a time: about two rounds, far less than eight
    assert 2 * 4 * GAP * 0.8 < wall < 8 * 4 * GAP
    results, wall = asyncio.run(closed_loop(server, make, 1, Bounds(100, time_limit_s=0.5, drain_s=5), False))
    assert 1 <= len(results) < 10  # stops sending at the time limit
    results, wall = asyncio.run(closed_loop(server, make, 2, Bounds(6, time_limit_s=0.05, drain_s=0.05), False))
    assert len(results) == 2 and wall < 4 * GAP  # one request per worker, cut when the drain time is over
    assert all(not r.ok and "time bound" in r.error for r in results)


def test_open_loop_rate_and_level_summary(server):
    body = {"model": "m"}
    make = lambda i: Request("chat", "/v1/chat/completions", body)  # noqa: E731
    results, wall = asyncio.run(open_loop(server, make, 40.0, Bounds(20), seed=1, progress=False))
    assert len(results) == 20 and all(r.ok for r in results)
    starts = sorted(r.start for r in results)
    assert 0.2 < starts[-1] - starts[0] < 1.5  # 19 exponential gaps of mean 25 ms
    level = run_level(server, make, Bounds(6), concurrency=3, progress=False)
    assert level["mode"] == "closed" and level["completed"] == 6 and "by_kind" not in level
    with pytest.raises(ValueError):
        run_level(server, make, Bounds(1), concurrency=1, rate=1.0)


def test_loopback_only():
    assert check_loopback("http://127.0.0.1:8000/") == "http://127.0.0.1:8000"
    assert check_loopback("http://localhost:1") == "http://localhost:1"
    with pytest.raises(ValueError, match="loopback"):
        check_loopback("http://example.com:8000")


def test_scenarios():
    counts = Counter(mixed_kind(i) for i in range(40))
    assert counts == Counter({k: 2 * n for k, n in MIX.items()})
    assert len({mixed_kind(i) for i in range(5)}) >= 3  # interleaved, not in runs
    s = Scenario("image", "m", max_tokens=7)
    a, b = s.request(0), s.request(1)
    url = a.body["messages"][0]["content"][0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,") and url != b.body["messages"][0]["content"][0]["image_url"]["url"]
    assert a.stream and a.body["ignore_eos"] and a.body["max_tokens"] == 7
    assert a.body["stream_options"] == {"include_usage": True}
    assert not Scenario("image-nostream", "m").request(0).stream
    img = Scenario("images", "m").request(3)
    assert img.path == "/v1/images/generations" and img.body["enhance_prompt"] is False
    kinds = {Scenario("mixed", "m").request(i).kind for i in range(20)}
    assert kinds == set(MIX)
    resp = Scenario("responses", "m", max_tokens=7).request(2)
    assert resp.path == "/v1/responses" and resp.stream and resp.body["max_output_tokens"] == 7
    image, text = resp.body["input"][0]["content"]
    assert image["image_url"] == Scenario("image", "m").request(2).body["messages"][0]["content"][0]["image_url"]["url"]
    assert text["type"] == "input_text" and resp.body["ignore_eos"]
    with pytest.raises(ValueError):
        Scenario("nope", "m")
