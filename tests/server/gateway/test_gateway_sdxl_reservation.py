"""SDXL places are reserved when a request is admitted, before any engine time is spent: with one worker, one slot
and no gateway queue, a request holding the slot makes every other image-drawing request a 429 ``queue_full`` at
once — /v1/images/generations (which would re-caption with MGM), /v1/images/edits (multipart), any-to-any chat
(streamed or not) and the Responses ``image_generation`` tool — and the engine is never called for them. Once the
slot is free they go through, and their places are given back (streamed or not).

A real gateway (uvicorn) in front of a counting fake engine and a fake SDXL worker whose jobs wait for the test."""

from __future__ import annotations

import base64
import json
import threading
import time

import httpx
from support.live import http_server
from support.stub_engine import StubEngine, StubWorker

from server.gateway.config import GatewayConfig
from server.procs import png_data_url

PNG = base64.b64decode(png_data_url((64, 64)).split(",", 1)[1])
CAPTION = "Sure. <h>a red fox</h>"


class _Engine(StubEngine):
    """Counts chat calls; answers every one with a caption (a stream when asked)."""

    model = "fake"
    calls: list[dict] = []  # type: ignore[type-arg]

    def do_POST(self) -> None:
        body = json.loads(self.read_body() or b"{}")
        type(self).calls.append(body)
        if not body.get("stream"):
            self.send_json(json.dumps({
                "id": "chatcmpl-fake", "object": "chat.completion", "created": 1, "model": "fake",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": CAPTION},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}}).encode())
            return
        self.start_stream()

        def chunk(delta: dict, finish: str | None = None) -> bytes:  # type: ignore[type-arg]
            return b"data: " + json.dumps({
                "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": "fake",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}).encode() + \
                b"\n\n"

        for event in (chunk({"role": "assistant", "content": CAPTION}), chunk({}, "stop"), b"data: [DONE]\n\n"):
            self.write_chunk(event)
        self.write_chunk(b"")


class _Worker(StubWorker):
    """/ready → ready, max_batch 1; /v1/generate waits until ``gate`` is set, then answers one image (an event
stream when asked)."""

    gate: threading.Event
    jobs: list[float] = []

    def do_POST(self) -> None:
        payload = json.loads(self.read_body())
        type(self).jobs.append(time.monotonic())
        type(self).gate.wait(60)
        image = {"b64_json": base64.b64encode(PNG).decode(), "seed": 1}
        if not payload.get("stream"):
            self.send_object({"data": [image]})
            return
        self.start_events()
        self.write_event({"type": "image", "index": 0, **image})
        self.wfile.write(b"data: [DONE]\n\n")


def _wait(predicate, what: str, timeout: float = 10) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():  # bounded by the deadline
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


CHAT = {"model": "fake", "messages": [{"role": "user", "content": "Draw a fox."}],
        "modalities": ["text", "image"], "image_options": {"size": "64x64"}}
RESPONSES = {"model": "fake", "input": "Draw a fox.", "tools": [{"type": "image_generation", "size": "64x64"}]}


def test_full_sdxl_pool_is_429_before_the_engine_is_called(gateway_server):  # type: ignore[no-untyped-def]
    engine = type("Engine", (_Engine,), {"calls": []})
    worker = type("Worker", (_Worker,), {"gate": threading.Event(), "jobs": []})
    with http_server(engine) as engine_url, http_server(worker) as worker_url:
        config = GatewayConfig(engines=(engine_url,), sdxl_workers=(worker_url,), sdxl_max_in_flight=1,
                               sdxl_max_queue=0, probe_interval_s=0.3)
        with gateway_server(config) as gw:
            pool = gateway_server.apps[gw].state.gateway.sdxl
            held: list[httpx.Response] = []
            holder = threading.Thread(target=lambda: held.append(httpx.post(gw + "/v1/images/generations", json={
                "prompt": "held", "size": "64x64", "enhance_prompt": False, "response_format": "b64_json"},
                timeout=60)))
            holder.start()
            try:
                _wait(lambda: len(worker.jobs) == 1, "the first request's job never reached the worker")
                refused = {
                    "generations": httpx.post(gw + "/v1/images/generations", json={"prompt": "a fox"}, timeout=10),
                    "edits": httpx.post(gw + "/v1/images/edits", data={"prompt": "a fox"},
                                        files={"image": ("in.png", PNG, "image/png")}, timeout=10),
                    "chat": httpx.post(gw + "/v1/chat/completions", json=CHAT, timeout=10),
                    "chat stream": httpx.post(gw + "/v1/chat/completions", json={**CHAT, "stream": True},
                                              timeout=10),
                    "responses": httpx.post(gw + "/v1/responses", json=RESPONSES, timeout=10),
                    "responses stream": httpx.post(gw + "/v1/responses", json={**RESPONSES, "stream": True},
                                                   timeout=10),
                }
                for name, r in refused.items():
                    assert r.status_code == 429, (name, r.text)
                    assert r.json()["error"]["code"] == "queue_full" and r.headers["retry-after"], (name, r.text)
                assert engine.calls == []  # no re-caption, no chat turn: refused before any engine time
                assert len(worker.jobs) == 1 and pool.reserved == 1
            finally:
                worker.gate.set()
                holder.join(60)
            assert held[0].status_code == 200, held[0].text

            # with the slot free the same requests draw, and every place is given back (streams included)
            r = httpx.post(gw + "/v1/chat/completions", json=CHAT, timeout=30)
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["images"], r.text
            with httpx.stream("POST", gw + "/v1/chat/completions", json={**CHAT, "stream": True}, timeout=30) as s:
                assert s.status_code == 200 and b'"images"' in b"".join(s.iter_raw())
            r = httpx.post(gw + "/v1/responses", json=RESPONSES, timeout=30)
            assert r.status_code == 200 and r.json()["output"][-1]["type"] == "image_generation_call", r.text
            with httpx.stream("POST", gw + "/v1/responses", json={**RESPONSES, "stream": True}, timeout=30) as s:
                assert s.status_code == 200 and b"response.completed" in b"".join(s.iter_raw())
            plain = httpx.post(gw + "/v1/responses", json={"model": "fake", "input": "hi"}, timeout=30)
            assert plain.status_code == 200, plain.text
            _wait(lambda: pool.reserved == 0, f"SDXL places not given back: {pool.reserved}")
            assert len(engine.calls) == 5
