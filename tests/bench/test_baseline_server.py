"""The official-path baseline over real HTTP: it runs the same model as the float64 reference (greedy text equal),
honours the fixed output length, speaks the OpenAI stream shape the load generator reads, and rejects bad input."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator

import pytest
from support.live import uvicorn_thread

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@contextlib.contextmanager
def _serve(worker, limit_model_concurrency: int) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """The baseline app around ``worker`` under a real uvicorn on loopback; yields its base URL."""
    import uvicorn

    from bench.baselines.official_server import create_app
    from server.procs import free_port

    port = free_port()
    app = create_app(worker, limit_model_concurrency)
    with uvicorn_thread(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    from bench.baselines.official_server import Worker
    from engine.tiny import build_tiny

    path = build_tiny(tmp_path_factory.mktemp("baseline") / "tiny", backbone="llama", hd=False, seed=0)
    worker = Worker(path)
    with _serve(worker, 5) as base:
        yield base, worker, path


def _send(base: str, body: dict):  # type: ignore[no-untyped-def]
    from loadtests.client import Request, new_session, send

    async def go():  # type: ignore[no-untyped-def]
        async with new_session(timeout_s=60) as session:
            return await send(session, base, Request("chat", "/v1/chat/completions", body))
    return asyncio.run(go())


def test_greedy_stream_equals_float64_reference(baseline):
    import httpx
    from transformers import AutoTokenizer

    from engine.prompt import render_prompt
    from bench.baselines.mgm_hf import MGMReference
    from loadtests.scenarios import Scenario

    base, worker, path = baseline
    req = Scenario("image", worker.name, max_tokens=8).request(0)
    result = _send(base, req.body)
    assert result.ok and result.output_tokens == 8 and result.ttft is not None
    # the same request, not streamed: its text is what the stream carried
    text = httpx.post(base + req.path, json={**req.body, "stream": False}, timeout=60).json()
    content = text["choices"][0]["message"]["content"]
    assert text["usage"]["completion_tokens"] == 8

    from bench.baselines.official_server import decode_image

    image = decode_image(req.body["messages"][0]["content"][0]["image_url"]["url"])
    ref = MGMReference(path, placeholder_id=0)  # float64
    tokens, margins = ref.greedy(render_prompt(req.body["messages"], worker.template), [image], 8)
    assert min(margins) > 1e-3  # float32 vs float64 cannot flip these
    tok = AutoTokenizer.from_pretrained(path)
    assert content == tok.decode(tokens, skip_special_tokens=True)


def test_bad_requests_get_openai_errors(baseline):
    import httpx

    base, worker, _ = baseline
    for body in ({"messages": []}, {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://example.com/x.png"}}]}]},
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}):
        r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"] == worker.name


def test_semaphore_survives_clients_that_leave(baseline):
    """With one slot, a client that drops its stream must not keep the slot: the next request is still served."""
    import httpx

    _, worker, _ = baseline
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 64, "ignore_eos": True, "stream": True}
    with _serve(worker, 1) as base:
        for _ in range(3):
            with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=30) as r:
                next(r.iter_lines())  # first event, then hang up
        result = _send(base, {**body, "max_tokens": 4, "stream_options": {"include_usage": True}})
        assert result.ok and result.output_tokens == 4
