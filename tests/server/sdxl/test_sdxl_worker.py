"""A live ``mgm sdxl-worker`` (child process, tiny random SDXL, loopback) driven over HTTP with httpx.

Scenarios that need a busy worker start a *blocker*: a large, slow job (``SLOW``: 256², 200 steps) that
holds the single inference thread while the test queues more jobs; it is ended early by dropping its connection,
which is itself the cancellation path under test. Worker flags: see ``WORKER_FLAGS`` in conftest.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time

import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from support.sdxl_live import SLOW, SMALL, assert_error, generate, metric, png, wait_for
from server.sdxl.pipeline import OFFICIAL_NEGATIVE_PROMPT

BLOCKER = {**SLOW, "prompt": "blocker"}


# --- helpers ---------------------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def blocker(url: str):
    """Hold the inference thread with a slow job; yields the task. Leaving the block drops its connection."""
    client = httpx.AsyncClient(base_url=url, timeout=120)
    task = asyncio.create_task(client.post("/v1/generate", json=BLOCKER))
    try:
        await wait_for(url, "mgm_sdxl_in_flight_jobs", lambda v: v == 1)
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
            await task
        await client.aclose()


async def queue_in_order(client: httpx.AsyncClient, url: str, bodies: list[dict]) -> list[asyncio.Task]:
    """Submit jobs one at a time, each after the previous one is visibly queued, so the queue order is known."""
    tasks = []
    base = await asyncio.to_thread(metric, url, "mgm_sdxl_queue_depth")
    for i, body in enumerate(bodies, 1):
        tasks.append(asyncio.create_task(client.post("/v1/generate", json=body)))
        await wait_for(url, "mgm_sdxl_queue_depth", lambda v, i=i: v == base + i)
    return tasks


# --- health, readiness, metrics --------------------------------------------------------------------------------------


def test_health_ready_and_metrics(sdxl_worker):
    url = sdxl_worker.url
    assert httpx.get(url + "/health").json() == {"status": "ok", "state": "ready"}
    ready = httpx.get(url + "/ready").json()
    assert ready["status"] == "ready" and ready["device"] == "cpu" and ready["dtype"] == "float32"
    assert ready["attention"] == "sdpa" and ready["default_size"] == 64 and ready["max_batch"] == 4
    # While the pipeline was loading, /ready said 503 in the error shape, with a retry hint.
    early = sdxl_worker.startup_ready_responses[0]
    assert_error(early, 503, code="not_ready")
    assert int(early.headers["retry-after"]) >= 1

    r = httpx.get(url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    names = {f.name for f in text_string_to_metric_families(r.text)}
    assert {"mgm_sdxl_queue_depth", "mgm_sdxl_in_flight_jobs", "mgm_sdxl_ready", "mgm_sdxl_jobs", "mgm_sdxl_images",
            "mgm_sdxl_batch_images", "mgm_sdxl_batch_jobs", "mgm_sdxl_job_latency_seconds",
            "mgm_sdxl_queue_wait_seconds", "mgm_sdxl_batch_seconds"} <= names
    assert metric(url, "mgm_sdxl_ready") == 1
    assert metric(url, "mgm_sdxl_jobs_total", outcome="cancelled") >= 0  # every outcome is exported from the start

    ok_before = metric(url, "mgm_sdxl_jobs_total", outcome="ok")
    latency_before = metric(url, "mgm_sdxl_job_latency_seconds_count")
    assert generate(url, **SMALL).status_code == 200
    assert metric(url, "mgm_sdxl_jobs_total", outcome="ok") == ok_before + 1
    assert metric(url, "mgm_sdxl_job_latency_seconds_count") == latency_before + 1


# --- generation ------------------------------------------------------------------------------------------------------


def test_generation_returns_pngs_of_the_requested_size(sdxl_worker):
    r = generate(sdxl_worker.url, **{**SMALL, "width": 64, "height": 96, "n": 2, "seed": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "sdxl.generation" and body["id"].startswith("img-")
    assert (body["width"], body["height"], body["num_inference_steps"]) == (64, 96, 3)
    assert body["guidance_scale"] == 5.0 and body["output_format"] == "png"
    assert [d["seed"] for d in body["data"]] == [5, 6] and [d["index"] for d in body["data"]] == [0, 1]
    assert body["batch"] == {"jobs": 1, "images": 2}
    assert set(body["timing"]) == {"queue_s", "encode_s", "denoise_s", "decode_s", "png_s", "total_s"}
    for item in body["data"]:
        raw = png(item)
        assert raw.startswith(b"\x89PNG\r\n\x1a\n")
        with Image.open(io.BytesIO(raw)) as img:
            img.load()
            assert img.format == "PNG" and img.size == (64, 96) and img.mode == "RGB"
    assert png(body["data"][0]) != png(body["data"][1])  # one generator per image


def test_seed_reproducibility(sdxl_worker):
    url = sdxl_worker.url
    first = generate(url, **SMALL, seed=1234).json()["data"][0]
    again = generate(url, **SMALL, seed=1234).json()["data"][0]
    other = generate(url, **SMALL, seed=1235).json()["data"][0]
    assert png(first) == png(again)
    assert png(first) != png(other)
    # Without a seed the worker picks one and reports it; asking for it reproduces the image.
    random_pick = generate(url, **SMALL).json()["data"][0]
    assert png(generate(url, **SMALL, seed=random_pick["seed"]).json()["data"][0]) == png(random_pick)


def test_default_negative_prompt_is_the_official_one(sdxl_worker):
    url = sdxl_worker.url
    default = png(generate(url, **SMALL, seed=7).json()["data"][0])
    explicit = png(generate(url, **SMALL, seed=7, negative_prompt=OFFICIAL_NEGATIVE_PROMPT).json()["data"][0])
    none = png(generate(url, **SMALL, seed=7, negative_prompt=None).json()["data"][0])
    empty = png(generate(url, **SMALL, seed=7, negative_prompt="").json()["data"][0])
    assert default == explicit
    assert none == empty != default  # null and "" both mean "no negative prompt"


def test_guidance_without_cfg_and_default_size(sdxl_worker):
    r = generate(sdxl_worker.url, prompt="a boat", num_inference_steps=2, guidance_scale=1.0)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["width"], body["height"]) == (64, 64)  # the model's default (SDXL base: 1024)
    with Image.open(io.BytesIO(png(body["data"][0]))) as img:
        assert img.size == (64, 64)


# --- validation ------------------------------------------------------------------------------------------------------

BAD_REQUESTS = [
    ({**SMALL, "width": 65}, "width", "invalid_value"),
    ({**SMALL, "height": 0}, "height", "invalid_value"),
    ({**SMALL, "height": 4096}, "height", "invalid_value"),  # above --max-side
    ({**SMALL, "num_inference_steps": 0}, "num_inference_steps", "invalid_value"),
    ({**SMALL, "num_inference_steps": -3}, "num_inference_steps", "invalid_value"),
    ({**SMALL, "num_inference_steps": 201}, "num_inference_steps", "invalid_value"),  # above --max-steps
    ({**SMALL, "n": 5}, "n", "invalid_value"),  # above --max-batch 4
    ({**SMALL, "n": 0}, "n", "invalid_value"),
    ({**SMALL, "guidance_scale": -1}, "guidance_scale", "invalid_value"),
    ({**SMALL, "seed": -1}, "seed", "invalid_value"),
    ({k: v for k, v in SMALL.items() if k != "prompt"}, "prompt", "missing_required_parameter"),
    ({**SMALL, "prompt": ""}, "prompt", "invalid_value"),
    ({**SMALL, "prompt": 123}, "prompt", "invalid_type"),
    ({**SMALL, "width": "64"}, "width", "invalid_type"),
    ({**SMALL, "width": 64.0}, "width", "invalid_type"),
    ({**SMALL, "n": True}, "n", "invalid_type"),
    ({**SMALL, "guidance_scale": "high"}, "guidance_scale", "invalid_type"),
    ({**SMALL, "negative_prompt": ["ugly"]}, "negative_prompt", "invalid_type"),
    ({**SMALL, "steps": 4}, "steps", "unknown_parameter"),
]


@pytest.mark.parametrize(("body", "param", "code"), BAD_REQUESTS,
                         ids=[f"{p}-{c}-{i}" for i, (_, p, c) in enumerate(BAD_REQUESTS)])
def test_bad_input_is_a_400_naming_the_field(sdxl_worker, body, param, code):
    err = assert_error(generate(sdxl_worker.url, **body), 400, param=param, code=code)
    assert err["type"] == "invalid_request_error" and param in err["message"]


def test_malformed_bodies_and_unknown_routes(sdxl_worker):
    url = sdxl_worker.url
    headers = {"content-type": "application/json"}
    assert_error(httpx.post(url + "/v1/generate", content=b"{not json", headers=headers), 400, code="invalid_json")
    assert_error(httpx.post(url + "/v1/generate", content=b"[1, 2]", headers=headers), 400, code="invalid_body")
    assert_error(httpx.get(url + "/v1/nope"), 404, code="not_found")
    assert_error(httpx.get(url + "/v1/generate"), 405, code="method_not_allowed")
    invalid = metric(url, "mgm_sdxl_jobs_total", outcome="invalid")
    generate(url, **{**SMALL, "width": 65})
    assert metric(url, "mgm_sdxl_jobs_total", outcome="invalid") == invalid + 1


# --- queueing, batching, cancellation ---------------------------------------------------------------------------------


def test_queue_full_is_a_429_with_retry_after(sdxl_worker):
    url = sdxl_worker.url

    async def scenario() -> None:
        rejected = metric(url, "mgm_sdxl_jobs_total", outcome="rejected")
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            async with blocker(url):
                queued = await queue_in_order(client, url, [{**SMALL, "seed": i} for i in range(3)])  # --max-queue 3
                r = await client.post("/v1/generate", json=SMALL)
                err = assert_error(r, 429, code="queue_full")
                assert err["type"] == "rate_limit_error"
                assert 1 <= int(r.headers["retry-after"]) <= 60
                assert metric(url, "mgm_sdxl_jobs_total", outcome="rejected") == rejected + 1
            # The blocker is gone: the queued jobs run (one batch) and succeed.
            results = await asyncio.gather(*queued)
        assert [r.status_code for r in results] == [200, 200, 200]
        assert {r.json()["batch"]["jobs"] for r in results} == {3}

    asyncio.run(scenario())


def test_batches_compatible_jobs_and_keeps_fifo_between_groups(sdxl_worker):
    url = sdxl_worker.url
    a1 = {**SMALL, "seed": 1, "n": 2}
    b1 = {**SMALL, "seed": 2, "height": 96}  # another size: another group
    a2 = {**SMALL, "seed": 3, "prompt": "a blue bird", "negative_prompt": None}  # same group, other prompts

    async def scenario() -> None:
        batches = metric(url, "mgm_sdxl_batch_jobs_count")
        jobs_in_batches = metric(url, "mgm_sdxl_batch_jobs_sum")
        finished: list[str] = []
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            async with blocker(url):
                tasks = await queue_in_order(client, url, [a1, b1, a2])
                for name, task in zip(["a1", "b1", "a2"], tasks):
                    task.add_done_callback(lambda _t, name=name: finished.append(name))
            r_a1, r_b1, r_a2 = await asyncio.gather(*tasks)
        for r in (r_a1, r_b1, r_a2):
            assert r.status_code == 200, r.text
        # a2 rode along with a1 (same size/steps/guidance); b1 ran alone after them, not before: a1 was older.
        assert r_a1.json()["batch"] == r_a2.json()["batch"] == {"jobs": 2, "images": 3}
        assert r_b1.json()["batch"] == {"jobs": 1, "images": 1}
        assert finished.index("b1") > max(finished.index("a1"), finished.index("a2"))
        assert len(r_a1.json()["data"]) == 2 and len(r_a2.json()["data"]) == 1
        # Three pipeline calls since the snapshot: the blocker's, [a1, a2] and [b1].
        assert metric(url, "mgm_sdxl_batch_jobs_count") == batches + 3
        assert metric(url, "mgm_sdxl_batch_jobs_sum") == jobs_in_batches + 1 + 3
        # A batched image is the image of its own seed and prompt (same pixels up to float rounding of batching).
        solo = generate(url, **a2).json()["data"][0]
        with Image.open(io.BytesIO(png(solo))) as x, Image.open(io.BytesIO(png(r_a2.json()["data"][0]))) as y:
            diff = max(abs(p - q) for p, q in zip(x.tobytes(), y.tobytes()))
        assert diff <= 8, diff

    asyncio.run(scenario())


def test_client_disconnect_cancels_waiting_and_running_jobs(sdxl_worker):
    url = sdxl_worker.url

    async def scenario() -> None:
        cancelled = metric(url, "mgm_sdxl_jobs_total", outcome="cancelled")
        async with blocker(url) as running:
            # A waiting job whose client leaves is dropped from the queue at once.
            waiting_client = httpx.AsyncClient(base_url=url, timeout=120)
            [waiting] = await queue_in_order(waiting_client, url, [SMALL])
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiting
            await waiting_client.aclose()
            await wait_for(url, "mgm_sdxl_queue_depth", lambda v: v == 0)
            await wait_for(url, "mgm_sdxl_jobs_total", lambda v: v == cancelled + 1, outcome="cancelled")
            assert metric(url, "mgm_sdxl_in_flight_jobs") == 1 and not running.done()
            start = time.monotonic()
        # Leaving the block dropped the blocker's connection: its denoising loop stops within a step.
        await wait_for(url, "mgm_sdxl_jobs_total", lambda v: v == cancelled + 2, outcome="cancelled")
        await wait_for(url, "mgm_sdxl_in_flight_jobs", lambda v: v == 0)
        assert time.monotonic() - start < 15  # the full blocker would take much longer
        # The slot is free again: the next job runs and succeeds.
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            r = await client.post("/v1/generate", json=SMALL)
        assert r.status_code == 200 and r.json()["batch"]["jobs"] == 1

    asyncio.run(scenario())


def test_structured_logs(sdxl_worker):
    records = []
    for line in sdxl_worker.log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
    msgs = {r["msg"] for r in records}
    assert {"starting SDXL worker", "pipeline loaded", "warm-up done", "SDXL worker ready", "job done"} <= msgs
    warning = next(r for r in records if "RANDOM WEIGHTS" in r["msg"])
    assert warning["level"] == "warning"
    done = next(r for r in records if r["msg"] == "job done")
    assert {"job", "n", "width", "height", "steps", "batch_jobs", "queue_s", "total_s"} <= set(done)
