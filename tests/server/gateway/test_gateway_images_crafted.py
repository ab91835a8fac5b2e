"""Crafted image headers, against a live gateway: real bytes that make Pillow's format plugins raise (a PNG whose IHDR
chunk is too short: ValueError; a JPEG cut inside its SOF segment and a WebP with a broken chunk: OSError; a GIF cut
after its signature) sent as data URLs in chat and in Responses, and fetched from a URL, are each a 400
``invalid_image`` naming the part — never a 500 — and the gateway answers the next good request.

A real gateway (uvicorn) in front of a stub engine that answers every chat call."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from http.server import BaseHTTPRequestHandler

import httpx
import pytest
from PIL import Image
from support.live import http_server
from support.stub_engine import StubEngine

from server.gateway.config import GatewayConfig, ImagePolicy


def _encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 40, 40)).save(buf, format=fmt)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _crafted() -> dict[str, tuple[str, bytes]]:
    """name → (MIME type, bytes). Each is checked below to make Pillow raise on open."""
    png, jpeg, webp, gif = (_encoded(f) for f in ("PNG", "JPEG", "WEBP", "GIF"))
    sof = jpeg.index(b"\xff\xc0")
    return {
        "png-short-ihdr": ("image/png", png[:8] + _png_chunk(b"IHDR", b"\0\0\0\x08\0") + png[33:]),
        "jpeg-cut-sof": ("image/jpeg", jpeg[:sof + 2] + b"\x00\x11\x08\x00"),
        "webp-bad-chunk": ("image/webp", webp[:12] + b"VP8X" + struct.pack("<I", 2) + b"\0\0"),
        "gif-cut": ("image/gif", gif[:8]),
    }


CRAFTED = _crafted()
GOOD = "data:image/png;base64," + base64.b64encode(_encoded("PNG")).decode()


def _url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_the_crafted_bytes_do_make_pillow_raise(name):  # type: ignore[no-untyped-def]
    with pytest.raises(Exception):  # noqa: B017 - ValueError, OSError, UnidentifiedImageError: any of them
        with Image.open(io.BytesIO(CRAFTED[name][1])) as img:
            img.load()


class _Engine(StubEngine):
    model = "fake"
    calls = 0

    def do_POST(self) -> None:
        self.read_body()
        type(self).calls += 1
        self.send_json(json.dumps({
            "id": "chatcmpl-fake", "object": "chat.completion", "created": 1, "model": "fake",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "a red square"},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}}).encode())


class _Files(BaseHTTPRequestHandler):
    """/<name> → that crafted image, with its MIME type."""

    def log_message(self, *args) -> None:  # type: ignore[no-untyped-def]
        pass

    def do_GET(self) -> None:
        mime, data = CRAFTED[self.path.strip("/")]
        self.send_response(200)
        self.send_header("Content-Type", mime)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _chat(url: str) -> dict:  # type: ignore[type-arg]
    return {"model": "fake", "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": url}}]}]}


def _responses(url: str) -> dict:  # type: ignore[type-arg]
    return {"model": "fake", "input": [{"role": "user", "content": [
        {"type": "input_text", "text": "What is this?"}, {"type": "input_image", "image_url": url}]}]}


def test_crafted_headers_are_400_invalid_image_and_the_gateway_answers_on(gateway_server):  # type: ignore[no-untyped-def]
    engine = type("Engine", (_Engine,), {"calls": 0})
    with http_server(engine) as engine_url, http_server(_Files) as files:
        config = GatewayConfig(engines=(engine_url,), images=ImagePolicy(allow_loopback=True))
        with gateway_server(config) as gw:
            for name, (mime, data) in CRAFTED.items():
                for route, body, param in (
                        ("/v1/chat/completions", _chat(_url(mime, data)), "messages[0].content[1]"),
                        ("/v1/chat/completions", _chat(f"{files}/{name}"), "messages[0].content[1]"),
                        ("/v1/responses", _responses(_url(mime, data)), "input")):
                    r = httpx.post(gw + route, json=body, timeout=30)
                    assert r.status_code == 400, (name, route, r.status_code, r.text)
                    error = r.json()["error"]
                    assert error["code"] == "invalid_image", (name, route, error)
                    assert (error["param"] or "").startswith(param), (name, route, error)
            assert engine.calls == 0  # refused in the gateway, before the engine
            assert httpx.post(gw + "/v1/chat/completions", json=_chat(GOOD), timeout=30).status_code == 200
            assert httpx.post(gw + "/v1/responses", json=_responses(GOOD), timeout=30).status_code == 200
            assert httpx.get(gw + "/health", timeout=5).status_code == 200
            assert engine.calls == 2
