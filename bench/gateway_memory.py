"""Peak memory of one `mgm gateway` process under the worst bodies and images it accepts or refuses.

The gateway runs as its own process (default limits) in front of a stand-in engine (an http.server that answers every
chat with a short completion: the engine's memory is not what is measured) and an image server on loopback. Each case
sends its request(s) while a thread samples the gateway's resident memory every millisecond; a case's figure is the
peak above the idle level just before it. One case re-runs the many-values body with the JSON item cap lifted, to show
what the cap prevents. Results go to bench/results/gateway_memory.json and RELIABILITY.md (section ``memory``).

    python -m bench.gateway_memory [--out RELIABILITY.md]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import psutil

from server.procs import free_port

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "gateway_memory.json"
MiB = 1024 * 1024


class _Engine(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def _json(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._json(b'{"object":"list","data":[{"id":"stub","object":"model"}]}' if self.path == "/v1/models" else b"{}")

    def do_POST(self) -> None:
        remaining = int(self.headers.get("Content-Length", "0"))
        while remaining > 0:  # read and drop: the stand-in keeps nothing
            remaining -= len(self.rfile.read(min(remaining, MiB)))
        self._json(b'{"id":"c","object":"chat.completion","created":1,"model":"stub","choices":[{"index":0,'
                   b'"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}]}')


def _png(side: int) -> bytes:
    """A PNG of random pixels (does not compress: its file is about side² × 3 bytes)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(buf, format="PNG", compress_level=0)
    return buf.getvalue()


class _Images(BaseHTTPRequestHandler):
    big = b""

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(self.big)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(self.big)


@contextlib.contextmanager
def _serve(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def _gateway(engine: str, *extra: str) -> Iterator[tuple[str, psutil.Process]]:
    port = free_port()
    # loopback image targets may use any port under --unsafe-allow-loopback-images (the image server's is random)
    cmd = [sys.executable, "-m", "server", "gateway", "--engine", engine, "--port", str(port),
           "--unsafe-allow-loopback-images", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "MGM_LOG_LEVEL": "WARNING"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:  # bounded by the deadline
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base + "/ready", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the gateway did not become ready")
            time.sleep(0.2)
        yield base, psutil.Process(proc.pid)
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(15)
        if proc.poll() is None:
            proc.kill()


def _peak(proc: psutil.Process, send: Callable[[], list[int]]) -> dict[str, Any]:
    """Run ``send`` while sampling ``proc``'s RSS; the peak above the level just before, and the statuses."""
    idle = proc.memory_info().rss / MiB
    highest = idle
    done = threading.Event()

    def sample() -> None:
        nonlocal highest
        while not done.is_set():
            with contextlib.suppress(psutil.Error):
                highest = max(highest, proc.memory_info().rss / MiB)
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    try:
        statuses = send()
    finally:
        done.set()
        thread.join()
    return {"idle_mb": round(idle, 1), "peak_mb": round(highest, 1), "above_idle_mb": round(highest - idle, 1),
            "seconds": round(time.perf_counter() - t0, 2), "statuses": statuses}


def _post(base: str, body: bytes, n: int = 1) -> Callable[[], list[int]]:
    def send() -> list[int]:
        out: list[int] = []

        def one() -> None:
            r = httpx.post(base + "/v1/chat/completions", content=body, timeout=300,
                           headers={"Content-Type": "application/json"})
            out.append(r.status_code)

        threads = [threading.Thread(target=one) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sorted(out)

    return send


def _chat(content: list[dict[str, Any]]) -> bytes:
    return json.dumps({"model": "stub", "max_tokens": 1, "messages": [{"role": "user", "content": content}]}).encode()


def measure() -> dict[str, Any]:
    png = _png(2560)  # ~19 MiB: just under the 20 MiB image cap
    data_url = "data:image/png;base64," + base64.b64encode(png).decode()
    two_images = _chat([{"type": "image_url", "image_url": {"url": data_url}}] * 2 + [{"type": "text", "text": "x"}])
    values = b'{"model": "stub", "messages": [{"role": "user", "content": "x"}], "junk": [' + b"0," * (
        30 * MiB // 2) + b"0]}"  # ~30 MiB of small JSON values
    _Images.big = png
    rows: list[dict[str, Any]] = []
    with _serve(_Engine) as engine, _serve(_Images) as images:
        remote = _chat([{"type": "image_url", "image_url": {"url": f"{images}/big.png"}}] * 2
                       + [{"type": "text", "text": "x"}])
        with _gateway(engine) as (base, proc):
            cases = [
                ("two data-URL images of 19 MiB each (51 MiB body), 1 request", _post(base, two_images)),
                ("the same, 4 requests at once", _post(base, two_images, 4)),
                ("two remote images of 19 MiB each, fetched by the gateway, 4 requests at once", _post(base, remote, 4)),
                ("30 MiB body of 15.7 M small JSON values (item cap 200000)", _post(base, values, 4)),
            ]
            for name, send in cases:
                rows.append({"case": name, **_peak(proc, send)})
        with _gateway(engine, "--max-json-items", str(10**9)) as (base, proc):
            rows.append({"case": "the 30 MiB body of small values with the item cap lifted (what the cap prevents), "
                                 "1 request", **_peak(proc, _post(base, values))})
    return {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                       f"{round(psutil.virtual_memory().total / 2**30)} GiB",
            "date": time.strftime("%Y-%m-%d"), "rows": rows}


def render(results: dict[str, Any]) -> str:
    lines = [f"Peak resident memory of one `mgm gateway` process (default limits; 64 MiB body cap), measured by "
             f"`python -m bench.gateway_memory` on {results['machine']}"
             + (f" on {results['date']}" if results.get("date") else "") + ". \"Above idle\" is the peak minus the "
             "process's resident memory just before the case.", "",
             "| case | statuses | peak above idle (MiB) | peak (MiB) | seconds |", "|---|---|---|---|---|"]
    for row in results["rows"]:
        statuses = ", ".join(f"{s}" for s in row["statuses"])
        lines.append(f"| {row['case']} | {statuses} | {row['above_idle_mb']} | {row['peak_mb']} | {row['seconds']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "RELIABILITY.md")
    parser.add_argument("--render-only", action="store_true", help="re-render from the stored results")
    args = parser.parse_args(argv)
    if args.render_only:
        results = json.loads(RESULTS.read_text())
    else:
        results = measure()
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    text = args.out.read_text()
    start, end = "<!-- memory:start -->", "<!-- memory:end -->"
    block = f"{start}\n{render(results)}\n{end}"
    if start in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n## Gateway memory under the worst bodies\n\n" + block + "\n"
    args.out.write_text(text)
    print(render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
