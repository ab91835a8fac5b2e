"""Gateway test fixtures: a real uvicorn per gateway (thread, free loopback port), a local image HTTP server
(127.0.0.1, so gateways under test set the test-only ``allow_loopback``), ONE real ``mgm engine`` on the tiny
checkpoint for the whole session (started with the helpers of loadtests/stack.py), and two real
``mgm sdxl-worker`` processes on a tiny SDXL pipeline for the image tests."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from support.live import http_server, uvicorn_thread

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(str(c) for c in sorted(os.sched_getaffinity(0))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from loadtests import stack
from server.procs import free_port  # noqa: E402


def png_bytes(size: tuple[int, int] = (40, 70), color: tuple[int, int, int] = (30, 60, 200)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="session")
def png() -> bytes:
    return png_bytes()


@contextlib.contextmanager
def serve_app(app) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """Run an ASGI app under a real uvicorn on 127.0.0.1:<free port> in a thread; yields its base URL."""
    import uvicorn

    port = free_port()
    with uvicorn_thread(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")):
        yield f"http://127.0.0.1:{port}"


class GatewayServers:
    """``gateway_servers(config)`` → context manager yielding the base URL of a live gateway; ``apps[url]`` is its
    FastAPI app (``.state.gateway`` for white-box checks)."""

    def __init__(self) -> None:
        self.apps: dict[str, object] = {}

    @contextlib.contextmanager
    def __call__(self, config, **kwargs) -> Iterator[str]:  # type: ignore[no-untyped-def]
        from server.gateway.app import create_app

        app = create_app(config, **kwargs)
        with serve_app(app) as base:
            self.apps[base] = app
            yield base


@pytest.fixture(scope="session")
def gateway_server() -> GatewayServers:
    return GatewayServers()


class _ImageHandler(BaseHTTPRequestHandler):
    """/img.png, /notimage (text/plain), /fake.png (image/png header, text body), /slow.png, /missing (404),
    /redirect?to=URL (302), /loop (redirects to itself). Records each request's Host header."""

    png = b""
    hosts: list[str] = []

    def log_message(self, *args) -> None:  # type: ignore[no-untyped-def]
        pass

    def _send(self, status: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        type(self).hosts.append(self.headers.get("Host", ""))
        url = urlsplit(self.path)
        if url.path == "/img.png":
            self._send(200, self.png, "image/png")
        elif url.path == "/notimage":
            self._send(200, b"hello", "text/plain")
        elif url.path == "/fake.png":
            self._send(200, b"this is not a png", "image/png")
        elif url.path == "/slow.png":
            time.sleep(2)
            self._send(200, self.png, "image/png")
        elif url.path == "/redirect":
            self._send(302, b"", "text/plain", {"Location": parse_qs(url.query)["to"][0]})
        elif url.path == "/loop":
            self._send(302, b"", "text/plain", {"Location": "/loop"})
        else:
            self._send(404, b"not found", "text/plain")


@dataclass
class ImageServer:
    base: str
    hosts: list[str]  # Host header of every request seen


@pytest.fixture(scope="session")
def image_server(png: bytes) -> Iterator[ImageServer]:
    handler = type("Handler", (_ImageHandler,), {"png": png, "hosts": []})
    with http_server(handler) as base:
        yield ImageServer(base, handler.hosts)


@pytest.fixture(scope="session")
def engine_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Llama MGM checkpoint the session's engine serves (its id is the directory's name)."""
    from engine.tiny import build_tiny

    return Path(build_tiny(tmp_path_factory.mktemp("gateway-engine") / "tiny", backbone="llama", hd=False, seed=0))


@pytest.fixture(scope="session")
def engine(engine_checkpoint: Path) -> Iterator[tuple[str, str]]:
    """ONE real `mgm engine` (tiny random Llama checkpoint) on a free loopback port: (base URL, model id)."""
    import httpx

    root = engine_checkpoint.parent
    child = stack.engine(engine_checkpoint, free_port(), root)
    with stack.running([child], timeout=240):  # a start failure shows the end of the engine's log
        base = stack.base_url(child)
        model_id = httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"]
        yield base, model_id


# --- SDXL workers (tiny random pipeline) for the image tests ---------------------------------------------------------

SDXL_FLAGS = ["--threads", "1", "--max-batch", "4", "--max-queue", "8", "--batch-wait-ms", "20", "--warmup-steps", "1",
              "--job-timeout", "120"]


@dataclass
class SDXLWorkerProc:
    url: str
    proc: subprocess.Popen
    log: Path

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


def _start_sdxl_worker(model: Path, log: Path) -> SDXLWorkerProc:
    port = free_port()
    cmd = [sys.executable, "-m", "server", "sdxl-worker", "--model", str(model), "--host", "127.0.0.1", "--port",
           str(port), *SDXL_FLAGS]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[3],
                                env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    return SDXLWorkerProc(f"http://127.0.0.1:{port}", proc, log)


def _wait_sdxl_ready(worker: SDXLWorkerProc, timeout: float = 180) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while True:  # bounded by the deadline
        assert worker.proc.poll() is None, f"sdxl-worker exited:\n{worker.log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"sdxl-worker not ready:\n{worker.log.read_text()[-3000:]}"
        try:
            if httpx.get(worker.url + "/ready", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)


@pytest.fixture(scope="session")
def sdxl_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[SDXLWorkerProc]]:
    """TWO live ``mgm sdxl-worker`` processes on one tiny random SDXL pipeline. Tests may kill the second one
    (``sdxl_workers[1].kill()``); the first stays up for the session."""
    from server.sdxl.tiny import build_tiny_sdxl

    root = tmp_path_factory.mktemp("gateway-sdxl")
    model = build_tiny_sdxl(root / "tiny-sdxl", seed=0)
    workers = [_start_sdxl_worker(model, root / f"worker{i}.log") for i in range(2)]
    try:
        for worker in workers:
            _wait_sdxl_ready(worker)
        yield workers
    finally:
        for worker in workers:
            if worker.proc.poll() is None:
                worker.proc.send_signal(signal.SIGTERM)
                try:
                    worker.proc.wait(30)
                except subprocess.TimeoutExpired:
                    worker.kill()
