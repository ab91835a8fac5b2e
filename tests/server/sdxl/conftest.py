"""Fixtures for the SDXL tests: one tiny SDXL checkpoint and one live ``mgm sdxl-worker`` per session."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from server.procs import free_port

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[3]

#: Worker settings the live tests rely on (queue of 3, batches of up to 4 images, 1 CPU thread: with tiny ops on a
#: busy 2-core machine one thread is ~10x faster than two).
WORKER_FLAGS = ["--threads", "1", "--max-batch", "4", "--max-queue", "3", "--batch-wait-ms", "50",
                "--warmup-steps", "2", "--job-timeout", "120"]


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SDXL pipeline (seed 0), built once through the real CLI entry point."""
    from server.cli import main

    out = tmp_path_factory.mktemp("tiny-sdxl") / "tiny-sdxl"
    assert main(["build-tiny-sdxl", str(out), "--seed", "0"]) == 0
    return out


@dataclass
class LiveWorker:
    url: str
    proc: subprocess.Popen
    log: Path
    startup_ready_responses: list[httpx.Response] = field(default_factory=list)

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


@pytest.fixture(scope="session")
def sdxl_worker(tiny_sdxl: Path, tmp_path_factory: pytest.TempPathFactory):
    """``python -m server sdxl-worker`` as a child process on a free loopback port; stopped with SIGTERM."""
    port = free_port()
    log = tmp_path_factory.mktemp("sdxl-worker") / "worker.log"
    cmd = [sys.executable, "-m", "server", "--log-format", "json", "sdxl-worker", "--model", str(tiny_sdxl),
           "--host", "127.0.0.1", "--port", str(port), *WORKER_FLAGS]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    worker = LiveWorker(url=f"http://127.0.0.1:{port}", proc=proc, log=log)
    try:
        deadline = time.monotonic() + 120
        while True:  # bounded by the deadline
            if proc.poll() is not None:
                pytest.fail(f"sdxl-worker exited with {proc.returncode}:\n{worker.log_tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"sdxl-worker not ready after 120 s:\n{worker.log_tail()}")
            try:
                r = httpx.get(worker.url + "/ready", timeout=5)
            except httpx.TransportError:
                time.sleep(0.1)
                continue
            worker.startup_ready_responses.append(r)
            if r.status_code == 200:
                break
            time.sleep(0.1)
        yield worker
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    # uvicorn re-raises SIGTERM after its graceful shutdown, so the exit status is the signal's; the log tells
    # whether the lifespan shutdown (queue closed, inference thread joined) completed.
    assert proc.returncode in (0, -signal.SIGTERM), f"sdxl-worker exit {proc.returncode}:\n{worker.log_tail()}"
    assert "Application shutdown complete." in worker.log.read_text(errors="replace"), worker.log_tail()
