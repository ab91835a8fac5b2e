"""Stand-ins for gateway tests that inject faults or inspect what the gateway sends: plain ``http.server`` handlers.
:class:`StubEngine`'s GETs answer like an engine (``/v1/models`` lists :attr:`StubEngine.model`, anything else, such
as ``/health``, is 200 ``{}``); :class:`StubWorker`'s like an SDXL worker's ``/ready``. Subclasses implement
``do_POST``; serve them with :func:`support.live.http_server`."""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler


class StubEngine(BaseHTTPRequestHandler):
    model = "stub"

    def log_message(self, *args: object) -> None:
        pass

    def send_json(self, body: bytes, status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def start_stream(self) -> None:
        """Status and headers of a chunked SSE answer; then :meth:`write_chunk` each piece."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def read_body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", "0")))

    def do_GET(self) -> None:
        models = {"object": "list", "data": [{"id": self.model, "object": "model"}]}
        self.send_json(json.dumps(models).encode() if self.path == "/v1/models" else b"{}")


class StubWorker(StubEngine):
    """A stand-in ``mgm sdxl-worker``: every GET is ready with :attr:`max_batch`; helpers for JSON answers and for the
    worker's event stream (HTTP/1.0, no length: the body ends when the connection closes)."""

    max_batch = 1

    def send_object(self, payload: object, status: int = 200) -> None:
        self.send_json(json.dumps(payload).encode(), status)

    def start_events(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()

    def write_event(self, payload: object) -> None:
        self.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
        self.wfile.flush()

    def do_GET(self) -> None:
        self.send_object({"status": "ready", "max_batch": self.max_batch})
