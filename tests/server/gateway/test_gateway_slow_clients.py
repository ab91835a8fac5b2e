"""Slow clients cannot hold the gateway (issue: hardening, slow clients): a body that pauses longer than the read
timeout is a 408 and frees its admission slot, and so is a body trickling in under that pause limit for longer than
the body timeout; a stream nobody reads is cut after the write timeout and frees its slot
and its engine. Real uvicorn gateway on loopback, raw sockets as the slow clients, an http.server as the engine."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from server.gateway.config import GatewayConfig
from support.live import http_server
from support.stub_engine import StubEngine

MSG = [{"role": "user", "content": "Hi"}]
_EVENT = b"data: " + json.dumps({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "firehose",
                                 "choices": [{"index": 0, "delta": {"content": "x" * 16000},
                                              "finish_reason": None}]}).encode() + b"\n\n"


class _Firehose(StubEngine):
    """An engine that answers every chat request with ~64 MB of stream as fast as the socket takes it."""

    model = "firehose"

    def do_POST(self) -> None:
        self.read_body()
        self.start_stream()
        try:
            for _ in range(4000):  # bounded; the gateway stops reading once its client stalls
                self.write_chunk(_EVENT)
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture(scope="module")
def slow_gateway(gateway_server):  # type: ignore[no-untyped-def]
    with http_server(_Firehose) as engine:
        config = GatewayConfig(engines=(engine,), chat_max_in_flight=1, chat_max_queue=0, probe_interval_s=0.2,
                               client_read_timeout_s=0.5, client_write_timeout_s=1.0, client_body_timeout_s=1.5)
        with gateway_server(config) as base:
            yield base, gateway_server.apps[base].state.gateway


def _connect(base: str, rcvbuf: int | None = None) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect((host, int(port)))
    sock.settimeout(10)
    return sock


def _wait(predicate, what: str, timeout: float = 10) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():  # bounded by the deadline
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _free(gateway) -> bool:  # type: ignore[no-untyped-def]
    return gateway.admission.in_flight == 0 and all(e.in_flight == 0 for e in gateway.pool.engines)


def test_a_paused_upload_is_a_408_and_frees_its_slot(slow_gateway):
    base, gateway = slow_gateway
    _wait(lambda: gateway.pool.any_up, "engine not up")
    sock = _connect(base)
    body = json.dumps({"model": "firehose", "messages": MSG}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body[:10])  # then nothing more
    start = time.monotonic()
    reply = b""
    while b"\r\n\r\n" not in reply:  # bounded by the socket timeout
        reply += sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert 0.4 < time.monotonic() - start < 5
    sock.close()
    _wait(lambda: _free(gateway), "the slot was not released")
    with httpx.stream("POST", base + "/v1/chat/completions", timeout=30,
                      json={"model": "firehose", "messages": MSG, "stream": True}) as r:
        assert r.status_code == 200  # the one slot is free again (chat_max_in_flight=1, no queue)
    assert 'mgm_gateway_client_timeouts_total{direction="read"}' in httpx.get(base + "/metrics").text


def test_a_trickling_upload_is_a_408_at_the_body_deadline_and_frees_its_slot(slow_gateway):
    """One byte every 0.2 s never pauses for the read timeout (0.5 s); the body timeout (1.5 s) still ends it."""
    base, gateway = slow_gateway
    _wait(lambda: _free(gateway), "an earlier request still holds the slot")
    sock = _connect(base)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{")
    start = time.monotonic()
    _wait(lambda: gateway.admission.in_flight == 1, "the upload holds no slot")
    sock.setblocking(False)
    reply = b""
    while b"request_timeout" not in reply and time.monotonic() - start < 10:  # bounded; the body names the code
        try:
            sock.send(b" ")
        except OSError:  # the gateway may close as soon as it has answered
            pass
        time.sleep(0.2)
        try:
            reply += sock.recv(65536)
        except BlockingIOError:
            pass
    took = time.monotonic() - start
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"took more than 1.5 s" in reply, reply
    assert 1.3 < took < 6, took
    sock.close()
    _wait(lambda: _free(gateway), "the slot was not released")


def test_a_stream_nobody_reads_is_cut_and_frees_its_slot(slow_gateway):
    base, gateway = slow_gateway
    _wait(lambda: _free(gateway), "an earlier request still holds the slot")
    sock = _connect(base, rcvbuf=4096)
    body = json.dumps({"model": "firehose", "messages": MSG, "stream": True}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    assert sock.recv(1024).startswith(b"HTTP/1.1 200")  # the stream started; now the client stops reading
    _wait(lambda: gateway.admission.in_flight == 1, "the stream holds no slot")
    _wait(lambda: _free(gateway), "the stalled stream still holds its slot", timeout=15)
    assert 'mgm_gateway_client_timeouts_total{direction="write"}' in httpx.get(base + "/metrics").text
    sock.close()
    with httpx.stream("POST", base + "/v1/chat/completions", timeout=30,
                      json={"model": "firehose", "messages": MSG, "stream": True}) as r:
        assert r.status_code == 200
        assert sum(len(b) for b in r.iter_bytes()) > 10_000_000  # a client that reads gets the whole stream


def test_a_client_hanging_up_mid_upload_is_a_499_not_a_500(slow_gateway):
    base, gateway = slow_gateway
    _wait(lambda: _free(gateway), "an earlier request still holds the slot")

    def count(status: str) -> float:
        value = gateway.metrics.registry.get_sample_value(
            "mgm_gateway_requests_total", {"route": "/v1/chat/completions", "status": status})
        return value or 0.0

    before = count("499")
    sock = _connect(base)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n" + b'{"model": "firehose"')
    time.sleep(0.1)
    sock.close()
    _wait(lambda: count("499") == before + 1, "the hang-up was not counted as 499")
    assert count("500") == 0
    _wait(lambda: _free(gateway), "the slot was not released")
