"""``POST /v1/images/generations`` and the SDXL worker pool, end to end: the official openai SDK → a real gateway →
TWO real ``mgm sdxl-worker`` processes (tiny random SDXL pipeline) and the session's real tiny ``mgm engine`` for
prompt enhancement. The last tests kill the second worker (retry elsewhere, then 503 + retry-after)."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from http.server import ThreadingHTTPServer

import httpx
import numpy as np
import openai
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from support.live import http_server
from support.stub_engine import StubEngine, StubWorker

from server.procs import free_port
from server.gateway.config import GatewayConfig

KEY = "sk-images-test"
MODEL = "sdxl-tiny"
FAST = {"num_inference_steps": 2}


def _config(engine: str, workers: tuple[str, ...], **kwargs) -> GatewayConfig:  # type: ignore[no-untyped-def]
    kwargs.setdefault("probe_interval_s", 0.3)
    return GatewayConfig(engines=(engine,), api_keys=(KEY,), sdxl_workers=workers, image_model_name=MODEL,
                         enhance_max_tokens=16, **kwargs)


@pytest.fixture(scope="module")
def gateway(engine, sdxl_workers, gateway_server):  # type: ignore[no-untyped-def]
    with gateway_server(_config(engine[0], (sdxl_workers[1].url, sdxl_workers[0].url))) as url:
        yield url


@pytest.fixture(scope="module")
def client(gateway) -> openai.OpenAI:  # type: ignore[no-untyped-def]
    return openai.OpenAI(base_url=gateway + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _img(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _metric(base: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(httpx.get(base + "/metrics", timeout=10).text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


def _wait_cancelled(worker: str, gateway: str, cancelled_before: float) -> None:
    """The worker counts one more cancelled job, and the gateway's pool holds no job any more (20 s at most)."""
    deadline = time.monotonic() + 20
    while _metric(worker, "mgm_sdxl_jobs_total", outcome="cancelled") <= cancelled_before:  # bounded
        assert time.monotonic() < deadline, "the worker never saw the cancellation"
        time.sleep(0.1)
    while _metric(gateway, "mgm_gateway_sdxl_in_flight") > 0:  # bounded by the deadline
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_b64_json_without_enhancement_and_n_split_over_jobs(client, gateway):
    prompt = "a red fox in the snow"
    r = client.images.generate(model=MODEL, prompt=prompt, n=5, size="64x64", response_format="b64_json",
                               extra_body={**FAST, "seed": 11, "enhance_prompt": False})
    assert len(r.data) == 5 and r.created > 0
    images = [_img(base64.b64decode(d.b64_json)) for d in r.data]
    assert all(im.shape == (64, 64, 3) for im in images)
    assert all(d.revised_prompt == prompt and d.url is None for d in r.data)
    assert r.model_extra["prompt_enhancement"] == "disabled"
    # n=5 > the workers' max batch (4): two jobs, seeds 11..14 and 15; image i is the one of seed 11+i
    single = client.images.generate(model=MODEL, prompt=prompt, n=1, size="64x64", response_format="b64_json",
                                    extra_body={**FAST, "seed": 15, "enhance_prompt": False})
    assert np.abs(_img(base64.b64decode(single.data[0].b64_json)) - images[4]).max() <= 2
    assert np.abs(images[0] - images[4]).max() > 2  # different seeds, different noise


def test_url_response_is_served_by_the_gateway(client, gateway):
    r = client.images.generate(prompt="a lighthouse", size="64x128", response_format="url",
                               extra_body={**FAST, "enhance_prompt": False, "quality": "hd"})
    (item,) = r.data
    assert item.b64_json is None and item.url.startswith(gateway + "/v1/files/images/")
    got = httpx.get(item.url, timeout=10)  # the URL is the credential: no Authorization header
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    assert _img(got.content).shape == (128, 64, 3)
    missing = httpx.get(gateway + "/v1/files/images/nope", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_enhance_prompt_asks_the_engine(client, gateway):
    """Default enhance_prompt=true: the engine is asked in generation mode; random weights rarely write a <h>
    span, so either the caption is used or the user's prompt is, and the response says which."""
    before = _metric(gateway, "mgm_gateway_tokens_total", kind="completion")
    prompt = "draw a small boat"
    r = client.images.generate(model=MODEL, prompt=prompt, size="64x64", response_format="b64_json", extra_body=FAST)
    how = r.model_extra["prompt_enhancement"]
    assert how in ("enhanced", "no_caption")
    assert r.data[0].revised_prompt and (how == "enhanced" or r.data[0].revised_prompt == prompt)
    assert _metric(gateway, "mgm_gateway_tokens_total", kind="completion") > before  # the engine did generate


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"size": "100x100"}, "size"),
    ({"size": "4096x4096"}, "size"),
    ({"size": "big"}, "size"),
    ({"n": 11}, "n"),
    ({"n": 0}, "n"),
    ({"response_format": "png"}, "response_format"),
    ({"quality": "ultra"}, "quality"),
    ({"extra_body": {"num_inference_steps": 0}}, "num_inference_steps"),
])
def test_bad_parameters_are_400_naming_the_param(client, kwargs, param):
    kwargs = {"size": "64x64", **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(model=MODEL, prompt="x", **kwargs)
    assert err.value.status_code == 400 and err.value.body["param"] == param, err.value.body


def test_model_names_unknown_openai_and_chat_and_auth(client, gateway, engine):
    with pytest.raises(openai.NotFoundError):
        client.images.generate(model="imagen-4", prompt="x", size="64x64")
    # OpenAI's image model names are served by the image model (the SDKs' examples use them)
    r = client.images.generate(model="dall-e-3", prompt="x", size="64x64", response_format="b64_json",
                               extra_body={**FAST, "enhance_prompt": False})
    assert len(r.data) == 1
    with pytest.raises(openai.BadRequestError) as err:  # the chat model: named as such, not "does not exist"
        client.images.generate(model=engine[1], prompt="x", size="64x64")
    assert err.value.body["code"] == "invalid_model" and "chat model" in err.value.body["message"]
    r = httpx.post(gateway + "/v1/images/generations", json={"prompt": "x"}, timeout=10)
    assert r.status_code == 401


def test_ready_and_metrics_report_the_workers(gateway, sdxl_workers):
    anonymous = httpx.get(gateway + "/ready", timeout=10).json()  # keys are configured: no addresses without one
    assert all("url" not in w for w in anonymous["workers"] + anonymous["engines"])
    ready = httpx.get(gateway + "/ready", timeout=10, headers={"Authorization": f"Bearer {KEY}"}).json()
    assert {w["url"] for w in ready["workers"]} == {w.url for w in sdxl_workers}
    assert all(w["up"] and w["max_batch"] == 4 for w in ready["workers"])
    assert _metric(gateway, "mgm_gateway_sdxl_worker_up", worker=sdxl_workers[0].url) == 1
    assert _metric(gateway, "mgm_gateway_sdxl_latency_seconds_count") >= 3
    assert _metric(gateway, "mgm_gateway_sdxl_in_flight") == 0
    assert _metric(gateway, "mgm_gateway_sdxl_queue_depth") == 0


def test_gateway_queue_bound_and_client_disconnect(engine, sdxl_workers, gateway_server):
    """One slot, no gateway queue: a second request while the first runs is 429 + retry-after; the first client
    hanging up cancels its job on the worker."""
    worker = sdxl_workers[0]
    config = _config(engine[0], (worker.url,), sdxl_max_in_flight=1, sdxl_max_queue=0)
    slow = {"prompt": "slow", "size": "256x256", "num_inference_steps": 200, "enhance_prompt": False,
            "response_format": "b64_json"}
    with gateway_server(config) as base:
        cancelled = _metric(worker.url, "mgm_sdxl_jobs_total", outcome="cancelled")
        headers = {"Authorization": f"Bearer {KEY}"}
        errors: list[BaseException] = []

        def hang_up() -> None:
            try:
                httpx.post(base + "/v1/images/generations", json=slow, headers=headers, timeout=1.5)
            except httpx.TimeoutException as exc:
                errors.append(exc)

        thread = threading.Thread(target=hang_up)
        thread.start()
        deadline = time.monotonic() + 10
        while _metric(base, "mgm_gateway_sdxl_in_flight") < 1:  # bounded by the deadline
            assert time.monotonic() < deadline
            time.sleep(0.05)
        client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
        with pytest.raises(openai.RateLimitError) as err:
            client.images.generate(model=MODEL, prompt="x", size="64x64", extra_body={"enhance_prompt": False})
        assert err.value.response.headers["retry-after"] and err.value.body["code"] == "queue_full"
        thread.join()
        assert errors, "the slow request should have timed out on the client side"
        _wait_cancelled(worker.url, base, cancelled)


def _events(lines) -> list[tuple[str, dict]]:  # type: ignore[no-untyped-def]
    """(event name, data) of each SSE event in ``lines``."""
    out, name = [], "message"
    for line in lines:
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            out.append((name, json.loads(line[6:])))
            name = "message"
    return out


def test_stream_hang_up_cancels_the_sdxl_job(engine, sdxl_workers, gateway_server):
    """A streamed generation whose client leaves after the first preview: the gateway drops its worker stream, so
    the worker cancels the job and the pool's slot is free again."""
    worker = sdxl_workers[0]
    slow = {"prompt": "slow", "size": "256x256", "num_inference_steps": 200, "enhance_prompt": False,
            "stream": True, "partial_images": 3}
    with gateway_server(_config(engine[0], (worker.url,))) as base:
        cancelled = _metric(worker.url, "mgm_sdxl_jobs_total", outcome="cancelled")
        with httpx.stream("POST", base + "/v1/images/generations", json=slow, timeout=60,
                          headers={"Authorization": f"Bearer {KEY}"}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            lines = []
            for line in r.iter_lines():
                lines.append(line)
                if line.startswith("data: "):
                    break  # the first preview is here: hang up
        (name, first), = _events(lines)
        assert name == first["type"] == "image_generation.partial_image" and first["partial_image_index"] == 0
        assert _img(base64.b64decode(first["b64_json"])).shape == (256, 256, 3)
        _wait_cancelled(worker.url, base, cancelled)


class _SlowCaption(StubEngine):
    """An engine whose answers never come: records each chat request and when its connection was dropped."""

    started: list[float] = []
    dropped: list[float] = []

    def do_POST(self) -> None:
        self.read_body()
        type(self).started.append(time.monotonic())
        self.start_stream()  # headers only, then nothing: the gateway's non-streamed re-caption waits
        for _ in range(300):  # at most 30 s; a dropped connection ends it at the first failed write
            time.sleep(0.1)
            try:
                self.write_chunk(b" ")  # whitespace: still no JSON, but a write that fails once the peer is gone
                self.wfile.flush()
            except OSError:
                type(self).dropped.append(time.monotonic())
                return


def test_stream_hang_up_during_the_recaption_cancels_the_engine_request(sdxl_workers, gateway_server):
    """A client that leaves while MGM is still writing the caption (keep-alive comments only so far): the gateway
    drops the engine request too, and no SDXL job is ever sent."""
    handler = type("SlowCaption", (_SlowCaption,), {"started": [], "dropped": []})
    worker = sdxl_workers[0]
    with http_server(handler) as stub:
        config = _config(stub, (worker.url,), stream_keepalive_s=0.2)
        with gateway_server(config) as base:
            jobs = _metric(worker.url, "mgm_sdxl_jobs_total", outcome="ok")
            body = {"prompt": "a fox", "size": "64x64", "stream": True, "partial_images": 1, **FAST}
            with httpx.stream("POST", base + "/v1/images/generations", json=body, timeout=30,
                              headers={"Authorization": f"Bearer {KEY}"}) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith(":"):  # a keep-alive: the caption is still being written
                        break
            left = time.monotonic()
            deadline = left + 10
            while not handler.dropped:  # bounded by the deadline
                assert time.monotonic() < deadline, "the engine request outlived the client"
                time.sleep(0.05)
            assert len(handler.started) == 1 and handler.dropped[0] - left < 5
            assert _metric(worker.url, "mgm_sdxl_jobs_total", outcome="ok") == jobs


def test_dead_worker_is_retried_on_the_other_then_503(client, gateway, engine, sdxl_workers, gateway_server):
    """Kill the worker listed first (the pool still thinks it is up): the request moves to the second worker and
    the first is marked down. With no worker left the answer is 503 + retry-after."""
    dead = sdxl_workers[1]
    dead.kill()
    retries = _metric(gateway, "mgm_gateway_sdxl_retries_total")
    r = client.images.generate(model=MODEL, prompt="x", size="64x64", response_format="b64_json",
                               extra_body={**FAST, "enhance_prompt": False})
    assert len(r.data) == 1
    assert _metric(gateway, "mgm_gateway_sdxl_retries_total") >= retries + 1
    assert _metric(gateway, "mgm_gateway_sdxl_worker_up", worker=dead.url) == 0
    ready = httpx.get(gateway + "/ready", timeout=10).json()
    assert [w["up"] for w in ready["workers"]] == [False, True]

    with gateway_server(_config(engine[0], (dead.url, f"http://127.0.0.1:{free_port()}"))) as base:
        c = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
        with pytest.raises(openai.InternalServerError) as err:
            c.images.generate(model=MODEL, prompt="x", size="64x64", extra_body={"enhance_prompt": False})
        assert err.value.status_code == 503 and err.value.response.headers["retry-after"] == "2"
        assert err.value.body["code"] == "image_worker_unavailable"
        assert httpx.get(base + "/ready", timeout=10).status_code == 503


class _FakeWorker(StubWorker):
    """/ready → 200 (max_batch 2); /v1/generate → 503 (a worker that is shutting down)."""

    max_batch = 2
    generate_calls = 0

    def do_POST(self) -> None:
        self.read_body()
        type(self).generate_calls += 1
        self.send_object({"error": {"message": "shutting down", "type": "server_error", "param": None,
                                    "code": "shutting_down"}}, 503)


def test_down_worker_is_reprobed_and_a_503_moves_the_job(engine, sdxl_workers, gateway_server):
    """A worker that is not there at start is down; once it answers /ready the background re-probe brings it back
    (with its max_batch). Its 503 on a job marks it down again and the job runs on the real worker."""
    port = free_port()
    fake = f"http://127.0.0.1:{port}"
    with gateway_server(_config(engine[0], (fake, sdxl_workers[0].url), probe_interval_s=0.2)) as base:
        assert _metric(base, "mgm_gateway_sdxl_worker_up", worker=fake) == 0
        handler = type("Fake", (_FakeWorker,), {"generate_calls": 0})
        server = ThreadingHTTPServer(("127.0.0.1", port), handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 10
            while _metric(base, "mgm_gateway_sdxl_worker_up", worker=fake) != 1:  # bounded by the deadline
                assert time.monotonic() < deadline, "the down worker was never re-probed"
                time.sleep(0.05)
            client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
            r = client.images.generate(model=MODEL, prompt="x", size="64x64", response_format="b64_json",
                                       extra_body={**FAST, "enhance_prompt": False})
            assert len(r.data) == 1 and handler.generate_calls == 1  # tried on the fake first (listed first)
            assert _metric(base, "mgm_gateway_sdxl_retries_total") == 1
        finally:
            server.shutdown()
            server.server_close()
