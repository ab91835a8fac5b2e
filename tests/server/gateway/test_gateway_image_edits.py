"""The images API against stand-ins (no model runs): a stub engine that records the re-caption request and answers a
set text, and a fake SDXL worker that records each job and answers set images or a set stream. Covers what the live
tests (test_gateway_images_api.py, tiny random weights) cannot pin down: the re-caption's request and its outcome
(``revised_prompt``, ``prompt_enhancement``), JSON-body edits with a mask, ``size: "auto"``, an image stream that fails
after a preview, and the edits route's OpenAPI form."""

from __future__ import annotations

import base64
import contextlib
import io
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from support.live import http_server
from support.stub_engine import StubEngine, StubWorker

from engine.names import GEN_SUFFIX
from server.gateway.config import GatewayConfig
from server.gateway.image_generation import ImagesService
from server.gateway.image_inputs import InputImage

KEY = "sk-edits-test"
HEADERS = {"Authorization": f"Bearer {KEY}"}


def _png(size: tuple[int, int], color: tuple[int, ...], mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + _b64(data)


RED, BLUE = _png((40, 70), (200, 30, 30)), _png((40, 70), (30, 30, 200))
MASK = _png((40, 70), (0, 0, 0, 0), "RGBA")  # fully transparent: redraw everything
PREVIEW, FINAL = _b64(_png((8, 8), (1, 2, 3))), _b64(_png((8, 8), (4, 5, 6)))


class _Engine(StubEngine):
    """Answers every chat request with ``answer`` (and a usage block); records each request body."""

    answer = ""
    bodies: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        type(self).bodies.append(json.loads(self.read_body()))
        self.send_json(json.dumps({
            "id": "chatcmpl-stub", "object": "chat.completion", "created": 0, "model": self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": self.answer}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}).encode())


class _Worker(StubWorker):
    """A fake ``mgm sdxl-worker``: /ready (max_batch 4); /v1/generate records the job and answers FINAL images, or
    streamed one PREVIEW and then ``stream_end``: ``image`` (the final image and [DONE]), ``error`` (the worker's
    error event) or ``cut`` (the connection closes)."""

    max_batch = 4
    stream_end = "image"
    payloads: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        payload = json.loads(self.read_body())
        type(self).payloads.append(payload)
        if not payload.get("stream"):
            self.send_object({"data": [{"b64_json": FINAL, "seed": i} for i in range(payload["n"])]})
            return
        self.start_events()
        self.write_event({"type": "partial_image", "index": 0, "partial_image_index": 0, "b64_json": PREVIEW})
        if self.stream_end == "image":
            self.write_event({"type": "image", "index": 0, "seed": 1, "b64_json": FINAL})
            self.wfile.write(b"data: [DONE]\n\n")
        elif self.stream_end == "error":
            self.write_event({"type": "error", "error": {"message": "CUDA out of memory.", "type": "server_error",
                                                         "param": None, "code": "out_of_memory"}})


@contextlib.contextmanager
def _stack(gateway_server, answer: str = "", stream_end: str = "image") -> Iterator[tuple[str, type, type]]:  # type: ignore[no-untyped-def]
    """A gateway in front of a fresh stub engine and fake worker: (base URL, engine class, worker class)."""
    engine = type("Engine", (_Engine,), {"answer": answer, "bodies": []})
    worker = type("Worker", (_Worker,), {"stream_end": stream_end, "payloads": []})
    with http_server(engine) as engine_url, http_server(worker) as worker_url:
        config = GatewayConfig(engines=(engine_url,), api_keys=(KEY,), sdxl_workers=(worker_url,),
                               image_model_name="sdxl-stub", probe_interval_s=0.3)
        with gateway_server(config) as base:
            yield base, engine, worker


def _events(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of each SSE event; comments (keep-alives) skipped."""
    out = []
    for block in text.split("\n\n"):
        lines = [line for line in block.splitlines() if line and not line.startswith(":")]
        if not lines:
            continue
        name = next((line[7:] for line in lines if line.startswith("event: ")), "message")
        (data,) = [line[6:] for line in lines if line.startswith("data: ")]
        out.append((name, json.loads(data)))
    return out


def _edit_form(*images: bytes, **fields: str) -> dict[str, Any]:
    name = "image" if len(images) == 1 else "image[]"
    return {"data": {"prompt": "make it snowy", **fields},
            "files": [(name, (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]}


# --- the re-caption of an edit --------------------------------------------------------------------------------------


def test_edit_recaption_sees_the_images_first_and_its_caption_is_drawn(gateway_server):
    with _stack(gateway_server, answer="Let me think. <h>a red barn under fresh snow</h>") as (base, engine, worker):
        r = httpx.post(base + "/v1/images/edits", headers=HEADERS, timeout=30,
                       **_edit_form(RED, BLUE, response_format="b64_json"))
        assert r.status_code == 200, r.text
        (body,) = engine.bodies
        (message,) = body["messages"]
        assert message["role"] == "user"
        *images, text = message["content"]
        assert [p["type"] for p in images] == ["image_url", "image_url"]  # every image, in order, before the text
        assert [p["image_url"]["url"] for p in images] == [_data_url(RED), _data_url(BLUE)]
        assert text == {"type": "text", "text": "make it snowy" + GEN_SUFFIX} and text["text"].endswith("<GEN>")
        out = r.json()
        assert out["prompt_enhancement"] == "enhanced"
        assert out["data"][0]["revised_prompt"] == "a red barn under fresh snow"
        assert out["usage"]["input_tokens"] == 7 and out["usage"]["output_tokens"] == 3
        (job,) = worker.payloads  # SDXL draws the caption, from the first image
        assert job["prompt"] == "a red barn under fresh snow" and job["image"] == _b64(RED) and "mask" not in job


def test_edit_without_a_caption_draws_the_instruction(gateway_server):
    with _stack(gateway_server, answer="I would add snow to the roof.") as (base, engine, worker):
        r = httpx.post(base + "/v1/images/edits", headers=HEADERS, timeout=30,
                       **_edit_form(RED, response_format="b64_json"))
        assert r.status_code == 200, r.text
        assert len(engine.bodies) == 1
        out = r.json()
        assert out["prompt_enhancement"] == "no_caption" and out["data"][0]["revised_prompt"] == "make it snowy"
        assert worker.payloads[0]["prompt"] == "make it snowy"


# --- JSON-body edits with a mask, and size "auto" -------------------------------------------------------------------


def test_json_edit_with_a_mask(gateway_server):
    body = {"prompt": "a snowy roof", "image": [_data_url(RED)], "mask": _data_url(MASK), "enhance_prompt": False,
            "response_format": "b64_json"}
    with _stack(gateway_server) as (base, engine, worker):
        r = httpx.post(base + "/v1/images/edits", headers=HEADERS, timeout=30, json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert [d["b64_json"] for d in out["data"]] == [FINAL] and out["data"][0]["revised_prompt"] == "a snowy roof"
        assert out["prompt_enhancement"] == "disabled" and not engine.bodies
        assert out["size"] == "64x112"  # auto: 40x70 scaled up to the 64 px minimum side, multiples of 8
        (job,) = worker.payloads
        assert (job["image"], job["mask"], job["width"], job["height"]) == (_b64(RED), _b64(MASK), 64, 112)


def test_json_edit_with_a_mask_streamed(gateway_server):
    body = {"prompt": "a snowy roof", "image": _data_url(RED), "mask": _data_url(MASK), "enhance_prompt": False,
            "stream": True, "partial_images": 1}
    with _stack(gateway_server) as (base, _engine, worker):
        r = httpx.post(base + "/v1/images/edits", headers=HEADERS, timeout=30, json=body)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
        (partial_name, partial), (done_name, done) = _events(r.text)
        assert partial_name == partial["type"] == "image_edit.partial_image" and partial["b64_json"] == PREVIEW
        assert done_name == done["type"] == "image_edit.completed" and done["b64_json"] == FINAL
        assert (done["revised_prompt"], done["prompt_enhancement"], done["size"]) == ("a snowy roof", "disabled",
                                                                                      "64x112")
        (job,) = worker.payloads
        assert job["stream"] is True and job["partial_images"] == 1 and job["mask"] == _b64(MASK)


def _service(**config: Any) -> ImagesService:
    """Only the config is used by the size rules."""
    return ImagesService(GatewayConfig(engines=("http://e:1",), **config), *[None] * 6)  # type: ignore[arg-type]


def _image(width: int, height: int) -> InputImage:
    return InputImage(b"", "image/png", width, height)


@pytest.mark.parametrize(("size", "expected"), [
    ((4096, 3000), (2048, 1496)),  # scaled down by 0.5 to the 2048 maximum; 1500 → 1496 (a multiple of 8)
    ((8000, 8000), (2048, 2048)),
    ((1000, 777), (1000, 776)),  # within bounds: kept, each side rounded down to a multiple of 8
    ((20, 30), (64, 96)),  # scaled up by 3.2 to the 64 minimum
    ((40, 70), (64, 112)),
    ((20, 1000), (64, 2048)),  # an extreme aspect: both sides clamped into [64, 2048]
])
def test_edit_size_auto_scales_the_first_image_into_bounds(size, expected):
    service = _service()
    for value in (None, "auto"):
        got = service.edit_size(value, _image(*size))
        assert got == expected and all(side % 8 == 0 and 64 <= side <= 2048 for side in got)
    assert service.edit_size("512x256", _image(*size)) == (512, 256)  # an explicit size wins
    assert _service(image_max_side=1024).edit_size("auto", _image(4096, 3000)) == (1024, 744)


def test_generation_size_auto_is_the_default_size(gateway_server):
    with _stack(gateway_server) as (base, _engine, worker):
        r = httpx.post(base + "/v1/images/generations", headers=HEADERS, timeout=30,
                       json={"prompt": "a fox", "size": "auto", "enhance_prompt": False, "response_format": "b64_json"})
        assert r.status_code == 200, r.text
        assert r.json()["size"] == "1024x1024" == GatewayConfig(engines=("http://e:1",)).image_default_size
        assert (worker.payloads[0]["width"], worker.payloads[0]["height"]) == (1024, 1024)
    assert _service(image_default_size="512x768").size("auto") == (512, 768)


# --- a stream that fails after its first preview --------------------------------------------------------------------


@pytest.mark.parametrize(("end", "code", "kind"), [("error", "out_of_memory", "server_error"),
                                                   ("cut", "image_worker_error", "server_error")])
def test_stream_failure_after_a_preview_is_an_error_event_then_the_end(gateway_server, end, code, kind):
    body = {"prompt": "a fox", "size": "64x64", "enhance_prompt": False, "stream": True, "partial_images": 2}
    with _stack(gateway_server, stream_end=end) as (base, _engine, _worker):
        with httpx.stream("POST", base + "/v1/images/generations", headers=HEADERS, timeout=30, json=body) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            text = r.read().decode()  # returns: the gateway ended the stream
        (preview_name, preview), (error_name, error) = _events(text)
        assert preview_name == preview["type"] == "image_generation.partial_image" and preview["b64_json"] == PREVIEW
        assert error_name == "error" and set(error) == {"type", "error"} and error["type"] == "error"
        assert set(error["error"]) == {"message", "type", "param", "code"}
        assert (error["error"]["code"], error["error"]["type"]) == (code, kind) and error["error"]["message"]
        assert "[DONE]" not in text and "completed" not in text  # the error event was the last: nothing after it


# --- the OpenAPI document ---------------------------------------------------------------------------------------------


def test_openapi_edit_form_documents_image_and_image_brackets(gateway_server):
    with _stack(gateway_server) as (base, _engine, _worker):
        doc = httpx.get(base + "/openapi.json", timeout=10).json()
    form = doc["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    binary = {"type": "string", "format": "binary"}
    for name in ("image", "image[]"):
        assert form["properties"][name]["oneOf"] == [binary, {"type": "array", "items": binary}]
    assert form["required"] == ["prompt"] and form["anyOf"] == [{"required": ["image"]}, {"required": ["image[]"]}]


def test_json_edit_with_openai_image_references(gateway_server):
    """OpenAI's JSON shape: ``images: [{image_url}]`` and ``mask: {image_url}``; a ``file_id`` is a clear 400."""
    body = {"prompt": "a snowy roof", "images": [{"image_url": _data_url(RED)}], "mask": {"image_url": _data_url(MASK)},
            "enhance_prompt": False, "response_format": "b64_json"}
    with _stack(gateway_server) as (base, _engine, worker):
        r = httpx.post(base + "/v1/images/edits", headers=HEADERS, timeout=30, json=body)
        assert r.status_code == 200, r.text
        (job,) = worker.payloads
        assert (job["image"], job["mask"]) == (_b64(RED), _b64(MASK))
        for bad, param in (({"images": [{"image_url": _data_url(RED)}, {"file_id": "file-abc"}]}, "images[1].file_id"),
                           ({"images": [{}]}, "images[0]"), ({"mask": {"file_id": "file-abc"}}, "mask.file_id")):
            r = httpx.post(base + "/v1/images/edits", headers=HEADERS, timeout=30, json={**body, **bad})
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        assert len(worker.payloads) == 1  # nothing refused reached the worker
