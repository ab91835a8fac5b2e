"""The worker app in this process (real pipeline, real uvicorn on loopback in a thread) for the paths the shared
child-process worker cannot reach: requests while the pipeline loads, the job timeout, and stopping with jobs
queued and running. Tests run in file order (the first needs the pipeline still loading, the last stops the
worker); each one that needs a ready worker opens the gate itself, so any subset runs.

Settings: one image per batch and per request, one waiting job, 1 s job timeout, no warm-up. The pipeline load is
held back by a gate around the real ``SDXLRunner`` until the first test has seen the loading state.

Failing pipeline calls (a plain error, a CUDA out-of-memory) use a second app whose runner is a stand-in that raises
what the test queues up: clients get a generic message naming the job, never the exception text; after an
out-of-memory the worker frees memory and is not ready for its cool-down, then ready again.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time

import httpx
import pytest
from support.live import uvicorn_thread
import torch
from support.sdxl_live import SLOW, SMALL, assert_error, metric, wait_for

from PIL import Image

from server.procs import free_port
from server.sdxl import worker as worker_module
from server.sdxl.pipeline import BatchResult, SDXLRunner
from server.sdxl.worker import WorkerConfig, create_app


@pytest.fixture(scope="module")
def local_worker(tiny_sdxl):
    import uvicorn

    gate = threading.Event()

    def gated_runner(options):
        gate.wait(60)
        return SDXLRunner(options)

    config = WorkerConfig(model=tiny_sdxl, threads=1, max_batch=1, max_queue=1, job_timeout_s=1.0, warmup_steps=0,
                          batch_wait_s=0.0)
    app = create_app(config, runner_factory=gated_runner)
    port = free_port()
    server_config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False,
                                   timeout_graceful_shutdown=5)
    threads = torch.get_num_threads()  # SDXLRunner(threads=1) sets this process-wide; restored below
    try:
        with uvicorn_thread(server_config, join_timeout=30):
            try:
                yield f"http://127.0.0.1:{port}", gate, app.state.worker
            finally:
                gate.set()  # before the server stops: a job blocked on the gate would hold it
    finally:
        torch.set_num_threads(threads)


def _open_gate(url: str, gate: threading.Event) -> None:
    gate.set()
    deadline = time.monotonic() + 60
    while httpx.get(url + "/ready").status_code != 200:  # bounded by the deadline
        assert time.monotonic() < deadline, "worker never became ready"
        time.sleep(0.05)


def test_requests_while_loading_get_503(local_worker):
    url, gate, _worker = local_worker
    assert httpx.get(url + "/health").json() == {"status": "ok", "state": "loading"}
    assert_error(httpx.get(url + "/ready"), 503, code="not_ready")
    unavailable = metric(url, "mgm_sdxl_jobs_total", outcome="unavailable")
    r = httpx.post(url + "/v1/generate", json=SMALL)
    err = assert_error(r, 503, code="not_ready")
    assert err["type"] == "server_error" and int(r.headers["retry-after"]) >= 1
    assert metric(url, "mgm_sdxl_jobs_total", outcome="unavailable") == unavailable + 1
    assert metric(url, "mgm_sdxl_ready") == 0

    _open_gate(url, gate)
    assert httpx.post(url + "/v1/generate", json=SMALL, timeout=30).status_code == 200
    assert_error(httpx.post(url + "/v1/generate", json={**SMALL, "n": 2}), 400, param="n")  # --max-batch 1


def test_job_timeout_is_a_504_and_frees_the_slot(local_worker):
    url, gate, _worker = local_worker
    _open_gate(url, gate)
    timeouts = metric(url, "mgm_sdxl_jobs_total", outcome="timeout")
    start = time.monotonic()
    r = httpx.post(url + "/v1/generate", json=SLOW, timeout=60)
    assert_error(r, 504, code="timeout")
    assert time.monotonic() - start < 10
    deadline = time.monotonic() + 30
    while metric(url, "mgm_sdxl_in_flight_jobs") != 0:  # the running batch stops at its next step
        assert time.monotonic() < deadline, "timed-out job kept running"
        time.sleep(0.05)
    assert metric(url, "mgm_sdxl_jobs_total", outcome="timeout") == timeouts + 1
    assert httpx.post(url + "/v1/generate", json=SMALL, timeout=30).status_code == 200


def test_stop_fails_waiting_and_running_jobs_with_503(local_worker):
    url, gate, worker = local_worker
    _open_gate(url, gate)

    async def scenario() -> None:
        shutdowns = metric(url, "mgm_sdxl_jobs_total", outcome="shutdown")
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            running = asyncio.create_task(client.post("/v1/generate", json={**SLOW, "num_inference_steps": 50}))
            await wait_for(url, "mgm_sdxl_in_flight_jobs", lambda v: v == 1)
            waiting = asyncio.create_task(client.post("/v1/generate", json=SMALL))
            await wait_for(url, "mgm_sdxl_queue_depth", lambda v: v == 1)
            await asyncio.to_thread(worker.stop)
            for r in await asyncio.gather(running, waiting):
                assert_error(r, 503, code="shutting_down")
            assert metric(url, "mgm_sdxl_jobs_total", outcome="shutdown") == shutdowns + 2
            assert_error(await client.post("/v1/generate", json=SMALL), 503, code="not_ready")
            assert httpx.get(url + "/health").status_code == 503  # the inference thread has ended

    asyncio.run(scenario())


# --- failing pipeline calls (stand-in runner) ------------------------------------------------------------------------

SECRET = "Tried to allocate 20.00 GiB (GPU 0; 79.35 GiB total capacity; /opt/secret/path)"


class OutOfMemoryError(RuntimeError):
    """Named like ``torch.cuda.OutOfMemoryError`` (the worker matches the name, not the torch class)."""


class FailingRunner:
    """Raises the queued exceptions one per call, then returns blank images."""

    failures: list[Exception] = []

    def __init__(self, _options) -> None:
        pass

    def describe(self) -> dict:
        return {"device": "cpu", "default_size": 64}

    def generate(self, specs, *, width, height, steps, guidance_scale, cancelled=lambda i: False,
                 **_mode) -> BatchResult:
        if self.failures:
            raise self.failures.pop(0)
        images = [[Image.new("RGB", (width, height)) for _ in spec.seeds] for spec in specs]
        return BatchResult(images=images, encode_s=0.0, denoise_s=0.0, decode_s=0.0)


@pytest.fixture(scope="module")
def failing_worker(tmp_path_factory):
    import uvicorn

    config = WorkerConfig(model=tmp_path_factory.mktemp("no-model") / "sdxl", max_batch=1, max_queue=1,
                          job_timeout_s=10.0, warmup_steps=0, batch_wait_s=0.0, oom_cooldown_s=0.5)
    app = create_app(config, runner_factory=FailingRunner)
    worker = app.state.worker
    port = free_port()
    server_config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False,
                                   timeout_graceful_shutdown=5)
    with uvicorn_thread(server_config, join_timeout=30):
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url)
        yield url, worker


def _wait_ready(url: str, timeout: float = 30) -> float:
    start = time.monotonic()
    while httpx.get(url + "/ready").status_code != 200:  # bounded by the deadline
        assert time.monotonic() - start < timeout, "worker never became ready"
        time.sleep(0.02)
    return time.monotonic() - start


def _job_id(message: str) -> str:
    (job,) = re.findall(r"img-[0-9a-f]{24}", message)
    return job


def test_pipeline_error_is_a_generic_500_naming_the_job(failing_worker, caplog):
    url, _worker = failing_worker
    FailingRunner.failures.append(ValueError(f"tensor shape mismatch at {SECRET}"))
    with caplog.at_level(logging.ERROR, logger="mgm.sdxl"):
        r = httpx.post(url + "/v1/generate", json=SMALL, timeout=30)
    err = assert_error(r, 500, code="generation_failed")
    job = _job_id(err["message"])
    assert "ValueError" not in r.text and "Tried to allocate" not in r.text and "/opt/secret" not in r.text
    (rec,) = [r for r in caplog.records if r.getMessage() == "pipeline call failed"]
    assert rec.fields["jobs"] == [job] and rec.fields["out_of_memory"] is False
    assert SECRET in "".join(logging.Formatter().formatException(rec.exc_info))  # the detail is in the log
    assert httpx.get(url + "/ready").status_code == 200  # a plain failure leaves the worker serving
    assert httpx.post(url + "/v1/generate", json=SMALL, timeout=30).status_code == 200


@pytest.mark.parametrize("exc", [OutOfMemoryError(f"CUDA out of memory. {SECRET}"),
                                 RuntimeError(f"CUDA error: out of memory ({SECRET})")],
                         ids=["OutOfMemoryError", "text"])
def test_out_of_memory_frees_memory_and_recovers(failing_worker, monkeypatch, exc):
    url, worker = failing_worker
    freed: list[float] = []
    monkeypatch.setattr(worker_module, "release_memory", lambda: freed.append(time.monotonic()))
    FailingRunner.failures.append(exc)
    r = httpx.post(url + "/v1/generate", json=SMALL, timeout=30)
    err = assert_error(r, 503, code="out_of_memory")
    _job_id(err["message"])
    assert int(r.headers["retry-after"]) >= 1
    assert "Tried to allocate" not in r.text and "/opt/secret" not in r.text and "CUDA" not in r.text
    # Not ready from before the client heard of it until the memory is freed and the cool-down is over; alive.
    assert_error(httpx.get(url + "/ready"), 503, code="not_ready")
    assert httpx.get(url + "/health").json() == {"status": "ok", "state": "recovering"}
    assert_error(httpx.post(url + "/v1/generate", json=SMALL), 503, code="not_ready")
    assert metric(url, "mgm_sdxl_ready") == 0
    waited = _wait_ready(url, timeout=10)
    assert 0.1 < waited < 10 and len(freed) == 1
    assert metric(url, "mgm_sdxl_ready") == 1
    assert httpx.post(url + "/v1/generate", json=SMALL, timeout=30).status_code == 200


def test_release_memory_runs_without_cuda():
    worker_module.release_memory()  # gc only on this CPU box; torch.cuda.empty_cache when CUDA is there
    assert worker_module.is_out_of_memory(OutOfMemoryError("x"))
    assert worker_module.is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert not worker_module.is_out_of_memory(RuntimeError("shape mismatch"))
