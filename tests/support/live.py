"""Live servers in a thread of the test process, on loopback: an ASGI app under a real uvicorn, or a plain
``http.server`` handler."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import uvicorn


@contextlib.contextmanager
def uvicorn_thread(config: uvicorn.Config, join_timeout: float = 15) -> Iterator[uvicorn.Server]:
    """Run ``config`` (host and port set by the caller) in a daemon thread; yields the started server, asks it to
    exit afterwards and waits for its thread."""
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:  # bounded by the deadline
        assert thread.is_alive() and time.monotonic() < deadline, f"server on {config.host}:{config.port} did not start"
        time.sleep(0.02)
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(timeout=join_timeout)


@contextlib.contextmanager
def http_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """Serve ``handler`` on 127.0.0.1:<free port> in a daemon thread; yields the base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
