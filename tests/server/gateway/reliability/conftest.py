"""Reliability fixtures (on top of tests/server/gateway/conftest.py: the session engine, SDXL workers, ``gateway_server``):
a loopback file server with hostile routes, and a resolver for the ``*.reliability.test`` names."""

from __future__ import annotations

import gzip
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit

import pytest
from support.live import http_server
from reliability_cases import PNG
from reliability_table import FAULTS_JSON


class _Files(BaseHTTPRequestHandler):
    """/img.png, /slow.png (3 s), /held.png (answers when the test lets it: :meth:`FileServer.hold`), /huge.png (declares 50 MB, streams zeros), /huge-chunked.png (no length, streams
    zeros), /gzip-bomb.png (50 MB of zeros gzipped twice, ``Content-Encoding: gzip, gzip``), /text, /missing (404),
    /redirect?to=URL (302), /redirect-host?name=NAME (302 to http://NAME:<this port>/img.png), /loop (redirects to
    itself)."""

    protocol_version = "HTTP/1.1"
    seen: list[str] = []  # every request path (with query), in order
    gate: threading.Event  # /held.png waits on it (set: answers at once)
    _bomb: bytes = b""

    def log_message(self, *args) -> None:  # type: ignore[no-untyped-def]
        pass

    def _head(self, status: int, ctype: str, headers: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()

    def _send(self, status: int, body: bytes, ctype: str = "image/png", **headers: str) -> None:
        self._head(status, ctype, {"Content-Length": str(len(body)), **headers})
        self.wfile.write(body)

    def _stream_zeros(self, chunked: bool) -> None:
        block = b"\0" * 65536
        try:
            for _ in range(50 * 16):  # 50 MB at most; the gateway hangs up long before
                self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
        except OSError:
            pass
        self.close_connection = True

    def do_GET(self) -> None:
        type(self).seen.append(self.path)
        url = urlsplit(self.path)
        if url.path == "/img.png":
            self._send(200, PNG)
        elif url.path == "/slow.png":
            time.sleep(3)
            self._send(200, PNG)
        elif url.path == "/held.png":
            type(self).gate.wait(120)
            self._send(200, PNG)
        elif url.path == "/huge.png":
            self._head(200, "image/png", {"Content-Length": str(50 * 1024 * 1024)})
            self._stream_zeros(chunked=False)
        elif url.path == "/huge-chunked.png":
            self._head(200, "image/png", {"Transfer-Encoding": "chunked"})
            self._stream_zeros(chunked=True)
        elif url.path == "/gzip-bomb.png":
            if not _Files._bomb:
                _Files._bomb = gzip.compress(gzip.compress(b"\0" * (50 * 1024 * 1024), 9), 9)
            try:  # the gateway hangs up after the headers
                self._send(200, _Files._bomb, **{"Content-Encoding": "gzip, gzip"})
            except OSError:
                self.close_connection = True
        elif url.path == "/redirect-host":
            port = self.server.server_address[1]
            self._send(302, b"", "text/plain", Location=f"http://{parse_qs(url.query)['name'][0]}:{port}/img.png")
        elif url.path == "/text":
            self._send(200, b"hello", "text/plain")
        elif url.path == "/redirect":
            self._send(302, b"", "text/plain", Location=parse_qs(url.query)["to"][0])
        elif url.path == "/loop":
            self._send(302, b"", "text/plain", Location="/loop")
        else:
            self._send(404, b"not found", "text/plain")


@dataclass
class FileServer:
    base: str
    seen: list[str]  # paths requested so far
    gate: threading.Event

    @contextmanager
    def hold(self) -> Iterator[None]:
        """/held.png answers only when the block ends: a request fetching it holds its admission slot exactly that
        long, however slow the machine (a fixed delay raced the test on loaded CI)."""
        self.gate.clear()
        try:
            yield
        finally:
            self.gate.set()


@pytest.fixture(scope="session")
def files() -> Iterator[FileServer]:
    handler = type("Files", (_Files,), {"seen": [], "gate": threading.Event()})
    handler.gate.set()
    with http_server(handler) as base:
        yield FileServer(base, handler.seen, handler.gate)


@pytest.fixture(scope="session")
def file_server(files: FileServer) -> str:
    return files.base


@pytest.fixture(scope="session")
def record() -> Callable[..., None]:
    """``record(scenario, outcome, **figures)``: keeps what a fault/overload test measured in
    .cache/reliability/faults.json, which reliability_table.py renders into RELIABILITY.md."""

    def _record(scenario: str, outcome: str, **figures: Any) -> None:
        FAULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
        data = json.loads(FAULTS_JSON.read_text()) if FAULTS_JSON.exists() else {}
        data[scenario] = {"outcome": outcome, "figures": figures,
                          "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        FAULTS_JSON.write_text(json.dumps(data, indent=1, sort_keys=True))

    return _record
