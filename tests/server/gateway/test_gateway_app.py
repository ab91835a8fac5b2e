"""The gateway app without a live engine (its engine URL is a closed loopback port): health/ready/metrics, the
OpenAI error shape for 401/404/405/validation errors, and 503 + retry-after when no engine is up — through a real
uvicorn and the official openai SDK."""

from __future__ import annotations

import socket
import threading
import time
from http.server import ThreadingHTTPServer

import httpx
import openai
import pytest

from server.procs import free_port
from server.gateway.config import GatewayConfig
from support.stub_engine import StubEngine

KEY = "sk-test-gateway"


@pytest.fixture(scope="module")
def gateway(gateway_server):  # type: ignore[no-untyped-def]
    config = GatewayConfig(engines=(f"http://127.0.0.1:{free_port()}",), api_keys=(KEY,),
                           sdxl_workers=("http://127.0.0.1:1",), image_model_name="sdxl-tiny", probe_interval_s=0.2,
                           max_body_bytes=100_000)
    with gateway_server(config) as base:
        yield base


def _error(r: httpx.Response) -> dict:  # type: ignore[type-arg]
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def _post(base: str, body, key: str | None = KEY, **kwargs) -> httpx.Response:  # type: ignore[no-untyped-def]
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(base + "/v1/chat/completions", json=body, headers=headers, timeout=10, **kwargs)


MSG = [{"role": "user", "content": "hi"}]


def test_health_ready_metrics(gateway):
    assert httpx.get(gateway + "/health").json() == {"status": "ok"}
    r = httpx.get(gateway + "/ready")
    assert r.status_code == 503 and r.headers["retry-after"] == "2" and _error_like(r.json())["code"] == "not_ready"
    assert r.json()["engines"] == [{"up": False, "in_flight": 0}]  # no addresses without the key
    assert [set(w) for w in r.json()["workers"]] == [{"up", "in_flight", "max_batch"}]
    keyed = httpx.get(gateway + "/ready", headers={"Authorization": f"Bearer {KEY}"})
    assert keyed.status_code == 503 and keyed.json()["engines"][0]["url"].startswith("http://127.0.0.1:")
    assert keyed.json()["workers"][0]["url"] == "http://127.0.0.1:1"
    assert httpx.get(gateway + "/ready", headers={"Authorization": "Bearer wrong"}).json()["engines"][0].keys() == {
        "up", "in_flight"}
    text = httpx.get(gateway + "/metrics").text
    for name in ("mgm_gateway_requests_total", "mgm_gateway_request_latency_seconds_bucket",
                 "mgm_gateway_in_flight_requests", "mgm_gateway_engine_up", "mgm_gateway_ttft_seconds"):
        assert name in text
    assert 'mgm_gateway_requests_total{route="/ready",status="503"} 3.0' in text
    assert 'mgm_gateway_engine_up{engine="http://127.0.0.1:' in text


def _error_like(body: dict) -> dict:  # type: ignore[type-arg]
    return body["error"]


def test_404_405_shapes(gateway):
    r = httpx.get(gateway + "/v1/nothing")
    assert r.status_code == 404 and _error(r)["code"] == "not_found"
    r = httpx.get(gateway + "/v1/chat/completions")
    assert r.status_code == 405 and _error(r)["code"] == "method_not_allowed"


def test_auth(gateway):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        r = httpx.post(gateway + "/v1/chat/completions", json={}, headers=headers)
        assert r.status_code == 401 and _error(r)["type"] == "authentication_error"
        assert KEY not in r.text
    assert httpx.get(gateway + "/v1/models").status_code == 401
    assert httpx.get(gateway + "/health").status_code == 200  # probes need no key
    client = openai.OpenAI(base_url=gateway + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="m", messages=MSG)  # type: ignore[arg-type]


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"messages": MSG}, "model", "missing_required_parameter"),
    ({"model": "m"}, "messages", "missing_required_parameter"),
    ({"model": "m", "messages": []}, "messages", "invalid_value"),
    ({"model": "m", "messages": MSG, "temperature": 5}, "temperature", "invalid_value"),
    ({"model": "m", "messages": MSG, "n": "two"}, "n", "invalid_type"),
    ({"model": "m", "messages": MSG, "stop": ["a", "b", "c", "d", "e"]}, None, "invalid_value"),
    ({"model": "m", "messages": MSG, "stream_options": {"include_usage": True}}, None, "invalid_value"),
    ({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", "invalid_value"),
    ({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": "http://example.com/v.mp4"}}]}]}, "messages[0].content[0]", None),
    ([1, 2], None, "invalid_body"),
])
def test_validation_errors(gateway, body, param, code):
    r = _post(gateway, body)
    err = _error(r)
    assert r.status_code == 400 and err["type"] == "invalid_request_error", err
    if param is not None:
        assert err["param"] is not None and err["param"].startswith(param), err
    if code is not None:
        assert err["code"] == code, err


def test_body_cap(gateway):
    r = _post(gateway, {"model": "m", "messages": [{"role": "user", "content": "x" * 200_000}]})
    assert r.status_code == 413 and _error(r)["code"] == "request_too_large"


def test_invalid_json(gateway):
    r = httpx.post(gateway + "/v1/chat/completions", content=b"{nope", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and _error(r)["code"] == "invalid_json"


def test_private_image_url_refused_before_any_engine(gateway):
    content = [{"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest/meta-data/"}},
               {"type": "text", "text": "x"}]
    client = openai.OpenAI(base_url=gateway + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": content}])  # type: ignore
    assert info.value.code == "image_url_not_allowed"
    assert info.value.param == "messages[0].content[0].image_url.url"


def test_engine_down_is_503_with_retry_after(gateway):
    r = _post(gateway, {"model": "m", "messages": MSG})
    assert r.status_code == 503 and r.headers["retry-after"] == "2"
    assert _error(r)["code"] == "engine_unavailable"
    client = openai.OpenAI(base_url=gateway + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="m", messages=MSG, stream=True)  # type: ignore[arg-type]
    assert info.value.status_code == 503


def test_models_lists_the_image_model_when_workers_are_configured(gateway):
    client = openai.OpenAI(base_url=gateway + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == ["sdxl-tiny"]


# --- an engine that dies mid-answer (a real socket that closes after the first SSE event) -----------------------------

_CHUNK = (b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"broken",'
          b'"choices":[{"index":0,"delta":{"role":"assistant","content":"Hel"},"finish_reason":null}]}\n\n')


class _DyingEngine(StubEngine):
    model = "broken"

    def do_POST(self) -> None:
        self.read_body()
        self.start_stream()
        self.write_chunk(_CHUNK)
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)  # gone before the end of the body


@pytest.fixture(scope="module")
def dying_gateway(gateway_server):  # type: ignore[no-untyped-def]
    server = ThreadingHTTPServer(("127.0.0.1", 0), _DyingEngine)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        config = GatewayConfig(engines=(f"http://127.0.0.1:{server.server_address[1]}",), probe_interval_s=0.1)
        with gateway_server(config) as base:
            yield base
    finally:
        server.shutdown()
        server.server_close()


def test_mid_stream_engine_failure_is_an_sse_error_event(dying_gateway, gateway_server):
    with httpx.stream("POST", dying_gateway + "/v1/chat/completions", timeout=10,
                      json={"model": "broken", "messages": MSG, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(r.iter_bytes())
    first, error = raw.split(b"\n\n")[:2]
    assert first + b"\n\n" == _CHUNK
    assert error.startswith(b"event: error\ndata: ") and b'"code": "engine_error"' in error
    # the engine was marked down; the background re-probe brings it back (it still answers /health)
    _wait_up(gateway_server.apps[dying_gateway].state.gateway.pool.engines[0])
    client = openai.OpenAI(base_url=dying_gateway + "/v1", api_key="x", max_retries=0)
    stream = client.chat.completions.create(model="broken", messages=MSG, stream=True)  # type: ignore[arg-type]
    got = []
    with pytest.raises(openai.APIError, match="failed while streaming"):
        for chunk in stream:
            got.append(chunk.choices[0].delta.content)
    assert got == ["Hel"]


def _wait_up(engine) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 10
    while not engine.up:  # bounded by the deadline
        assert time.monotonic() < deadline, "engine was not re-probed"
        time.sleep(0.05)


def test_engine_failure_before_the_answer_is_retried_then_503(dying_gateway, gateway_server):
    """Non-streaming: nothing reached the client, so the failed engine is marked down and the next one is tried;
    with none left the client gets 503 + retry-after."""
    _wait_up(gateway_server.apps[dying_gateway].state.gateway.pool.engines[0])  # /ready reports, never probes
    assert httpx.get(dying_gateway + "/ready").status_code == 200
    r = httpx.post(dying_gateway + "/v1/chat/completions", json={"model": "broken", "messages": MSG}, timeout=10)
    assert r.status_code == 503 and r.headers["retry-after"] and _error(r)["code"] == "engine_unavailable"
    assert 'mgm_gateway_engine_retries_total 1.0' in httpx.get(dying_gateway + "/metrics").text


def test_cli_config_errors(capsys, monkeypatch):
    from server.cli import main

    monkeypatch.delenv("MGM_ENGINES", raising=False)

    assert main(["gateway", "--port", "1"]) == 2  # no engine given
    assert "at least one engine" in capsys.readouterr().err
    assert main(["gateway", "--engine", "127.0.0.1:8001"]) == 2
    assert "must start with http" in capsys.readouterr().err


def test_pick_least_in_flight():
    from server.gateway.engine_pool import EnginePool

    pool = EnginePool(("http://a", "http://b", "http://c"), client=None)  # type: ignore[arg-type]
    a, b, c = pool.engines
    assert pool.pick() is None  # nothing probed yet
    a.up = b.up = c.up = True
    a.in_flight, b.in_flight, c.in_flight = 2, 1, 1
    assert pool.pick() is b and pool.pick({b}) is c and pool.pick({b, c}) is a and pool.pick({a, b, c}) is None
    c.up = False
    assert pool.pick({b}) is a


def test_body_content_type(gateway):
    """A body without a Content-Type is read as JSON; one declared as something else is refused with a hint."""
    body = b'{"model": "m", "messages": [{"role": "user", "content": "Hi"}]}'
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(gateway + "/v1/chat/completions", content=body, headers=auth, timeout=10)
    assert r.status_code == 503 and _error(r)["code"] == "engine_unavailable"  # parsed, then no engine is up
    r = httpx.post(gateway + "/v1/chat/completions", content=body, timeout=10,
                   headers={**auth, "Content-Type": "application/x-www-form-urlencoded"})
    err = _error(r)
    assert r.status_code == 400 and err["code"] == "invalid_body" and "application/json" in err["message"]
