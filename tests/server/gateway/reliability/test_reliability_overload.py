"""Overload: the admission bound of chat and images (max in flight + max waiting) answers 429 + retry-after at once, before the
body is read or any image is fetched; a request that waited too long gets 503 + retry-after; a body that declares
more than the cap gets 413 before a byte of it is sent. Real gateway, real session engine, real sockets."""

from __future__ import annotations

import socket
import threading
import time

import httpx
from test_reliability_faults import chat, metric, wait_for

from server.gateway.config import GatewayConfig, ImagePolicy


def _held(files, model: str) -> dict:  # type: ignore[no-untyped-def,type-arg]
    """A request that holds its admission slot while ``files.hold()`` lasts: its image is /held.png."""
    return {"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"{files.base}/held.png"}}, {"type": "text", "text": "x"}]}]}


def test_full_queue_is_429_before_any_image_fetch(engine, gateway_server, files, record):
    base_url, model = engine
    config = GatewayConfig(engines=(base_url,), chat_max_in_flight=1, chat_max_queue=1, chat_queue_timeout_s=30,
                           images=ImagePolicy(allow_loopback=True))
    with gateway_server(config) as gw:
        done: list[httpx.Response] = []

        def long_request() -> None:
            done.append(httpx.post(gw + "/v1/chat/completions", json=_held(files, model), timeout=120))

        holders = [threading.Thread(target=long_request) for _ in range(2)]
        with files.hold():  # both hold their place until the block ends
            holders[0].start()
            wait_for(lambda: metric(gw, "mgm_gateway_chat_in_flight") == 1, 10, "the first request to hold the slot")
            holders[1].start()
            wait_for(lambda: metric(gw, "mgm_gateway_chat_queue_depth") == 1, 10, "the second request to wait")
            # full: one in flight, one waiting. The next request has a remote image: refused before it is fetched.
            probe = f"{files.base}/img.png?overload-probe"
            body = {"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": probe}}, {"type": "text", "text": "x"}]}]}
            latencies = []
            for _ in range(20):
                t0 = time.perf_counter()
                r = httpx.post(gw + "/v1/chat/completions", json=body, timeout=10)
                latencies.append(time.perf_counter() - t0)
                assert r.status_code == 429 and r.headers["retry-after"] == "2", r.text
                assert r.json()["error"]["code"] == "queue_full" and r.json()["error"]["type"] == "rate_limit_error"
            assert not any("overload-probe" in p for p in files.seen)  # never fetched
            assert metric(gw, "mgm_gateway_rejected_total", route="/v1/chat/completions", reason="queue_full") == 20
            # the images API shares the admission (its MGM re-caption call uses engine capacity too)
            r = httpx.post(gw + "/v1/images/generations", json={"prompt": "a fox"}, timeout=10)
            assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full", r.text
            assert metric(gw, "mgm_gateway_rejected_total", route="/v1/images/generations", reason="queue_full") == 1
        for thread in holders:
            thread.join(120)
        assert [r.status_code for r in done] == [200, 200]  # the admitted and the queued one both complete
        assert metric(gw, "mgm_gateway_chat_in_flight") == 0 and metric(gw, "mgm_gateway_chat_queue_depth") == 0
        # with capacity again, the same request goes through (and its image is fetched)
        assert httpx.post(gw + "/v1/chat/completions", json=body, timeout=60).status_code == 200
        assert any("overload-probe" in p for p in files.seen)
    latencies.sort()
    record("chat admission full (1 in flight + 1 waiting), 20 more requests with remote images",
           "20 × 429 queue_full + retry-after, no image fetched; the 2 admitted requests complete",
           median_429_ms=round(latencies[10] * 1000, 1), max_429_ms=round(latencies[-1] * 1000, 1))


def test_waiting_too_long_is_503_with_retry_after(engine, gateway_server, files, record):
    base_url, model = engine
    config = GatewayConfig(engines=(base_url,), chat_max_in_flight=1, chat_max_queue=4, chat_queue_timeout_s=0.5,
                           images=ImagePolicy(allow_loopback=True))
    with gateway_server(config) as gw:
        held: list[httpx.Response] = []
        holder = threading.Thread(target=lambda: held.append(httpx.post(gw + "/v1/chat/completions", timeout=120,
                                                                        json=_held(files, model))))
        with files.hold():
            holder.start()
            wait_for(lambda: metric(gw, "mgm_gateway_chat_in_flight") == 1, 10, "the first request to hold the slot")
            t0 = time.perf_counter()
            r = httpx.post(gw + "/v1/chat/completions", json=chat(gw, model, max_tokens=1), timeout=10)
            waited = time.perf_counter() - t0
        assert r.status_code == 503, r.text[:300]
        assert r.headers["retry-after"] and r.json()["error"]["code"] == "queue_timeout"
        assert 0.4 < waited < 10  # the holder never ends inside the block: answering at all proves the timeout
        holder.join(120)
        assert held[0].status_code == 200
        assert metric(gw, "mgm_gateway_chat_queue_depth") == 0 and metric(gw, "mgm_gateway_chat_in_flight") == 0
        assert httpx.post(gw + "/v1/chat/completions", json=chat(gw, model, max_tokens=1), timeout=60).status_code \
            == 200
    record("chat request waiting longer than the queue timeout (0.5 s)", "503 queue_timeout + retry-after",
           answered_after_s=round(waited, 2))


def test_declared_huge_body_is_413_before_it_is_sent(engine, gateway_server, record):
    """Headers declaring 10 GB and no body at all: the gateway answers 413 at once instead of waiting to read it."""
    with gateway_server(GatewayConfig(engines=(engine[0],), max_body_bytes=1024 * 1024)) as gw:
        host, port = gw.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            t0 = time.perf_counter()
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 10000000000\r\n\r\n")
            reply = b""
            while b"\r\n\r\n" not in reply:  # bounded by the socket timeout
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
            took = time.perf_counter() - t0
        assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
        assert httpx.get(gw + "/health", timeout=5).status_code == 200
    record("body declaring 10 GB (cap 1 MiB), nothing sent", "413 request_too_large before the body is read",
           answered_after_ms=round(took * 1000, 1))
