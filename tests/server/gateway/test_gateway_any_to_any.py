"""Any-to-any chat (generation mode) end to end: the official openai SDK → a real gateway → the session's real tiny
``mgm engine`` and a real tiny ``mgm sdxl-worker``. The random model writes an honest ``<h>`` caption because THE
TEST asks the engine for constrained decoding (vLLM's ``structured_outputs.regex``, forwarded as an unknown field);
the gateway does nothing special for it."""

from __future__ import annotations

import base64
import io

import openai
import pytest
from PIL import Image

from server.gateway.config import GatewayConfig
from server.gateway.image_generation import extract_caption

KEY = "sk-any-to-any"
#: Two <h> spans: the caption must be the LAST one (the official CLI's rule).
REGEX = r"Sure\. <h>[a-z]{2,6}</h> then <h>[a-z ]{3,24}</h>"
GEN = {"modalities": ["text", "image"], "image_options": {"size": "64x64", "num_inference_steps": 2, "seed": 3},
       "structured_outputs": {"regex": REGEX}}


@pytest.fixture(scope="module")
def client(engine, sdxl_workers, gateway_server):  # type: ignore[no-untyped-def]
    config = GatewayConfig(engines=(engine[0],), api_keys=(KEY,), sdxl_workers=(sdxl_workers[0].url,),
                           image_model_name="sdxl-tiny")
    with gateway_server(config) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _png(url: str) -> Image.Image:
    assert url.startswith("data:image/png;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert image.format == "PNG" and image.size == (64, 64)
    return image


def _ask(client: openai.OpenAI, model: str, stream: bool = False, extra: dict | None = None):  # type: ignore[no-untyped-def]
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Draw a fox in the snow."}], max_tokens=48,
        temperature=0, stream=stream, extra_body=extra if extra is not None else GEN)


def test_generation_mode_returns_the_image_of_the_last_caption(client, engine):
    reply = _ask(client, engine[1])
    message = reply.choices[0].message
    caption = extract_caption(message.content)
    assert caption and message.content.count("<h>") == 2
    assert caption == message.content.split("<h>")[2].split("</h>")[0].strip()  # the last span, not the first
    (image,) = message.model_extra["images"]
    assert image["type"] == "image_url" and image["caption"] == caption
    _png(image["image_url"]["url"])
    # the official " <GEN>" suffix reached the engine: same request without modalities has fewer prompt tokens
    plain = _ask(client, engine[1], extra={"structured_outputs": {"regex": REGEX}})
    assert reply.usage.prompt_tokens > plain.usage.prompt_tokens
    assert "images" not in (plain.choices[0].message.model_extra or {})


def test_generation_mode_streaming_sends_the_image_before_the_finish_chunk(client, engine):
    """Clients stop reading at the finish_reason chunk (and treat the usage chunk as the last one): the images come
    before both."""
    chunks = list(_ask(client, engine[1], stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    caption = extract_caption(text)
    assert caption
    with_images = [i for i, c in enumerate(chunks) if c.choices and (c.choices[0].delta.model_extra or {}).get("images")]
    finish = [i for i, c in enumerate(chunks) if c.choices and c.choices[0].finish_reason]
    assert len(with_images) == 1 and len(finish) == 1 and with_images[0] < finish[0]
    assert all(not c.choices for c in chunks[finish[0] + 1:])  # only the usage chunk may follow
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # the text streamed in pieces
    (image,) = chunks[with_images[0]].choices[0].delta.model_extra["images"]
    assert image["caption"] == caption
    _png(image["image_url"]["url"])


def test_no_caption_no_image_and_bad_options(client, engine):
    reply = _ask(client, engine[1], extra={**GEN, "structured_outputs": {"regex": "[a-z ]{4,12}"}})
    assert "images" not in (reply.choices[0].message.model_extra or {})
    for extra, param in ((({**GEN, "modalities": ["text", "audio"]}), "modalities"),
                         ({**GEN, "image_options": {"size": "65x65"}}, "image_options.size"),
                         ({**GEN, "image_options": {"quality": "ultra"}}, "image_options.quality")):
        with pytest.raises(openai.BadRequestError) as err:
            _ask(client, engine[1], extra=extra)
        assert err.value.body["param"] == param


def test_generation_mode_image_as_gateway_url(client, engine):
    import httpx

    options = {**GEN["image_options"], "response_format": "url"}
    reply = _ask(client, engine[1], extra={**GEN, "image_options": options})
    (image,) = reply.choices[0].message.model_extra["images"]
    url = image["image_url"]["url"]
    assert url.startswith(str(client.base_url) + "files/images/")
    got = httpx.get(url, timeout=10)
    assert got.status_code == 200 and Image.open(io.BytesIO(got.content)).size == (64, 64)


# --- keep-alives while drawing, and errors that are not APIError (fake engine and worker on loopback) ---------------

def _fake_backends(worker_data: list[dict], delay_s: float):  # type: ignore[no-untyped-def,type-arg]
    """A streaming fake engine whose answer has a caption, and a fake SDXL worker that takes ``delay_s`` per job."""
    import json
    import time

    from support.stub_engine import StubEngine, StubWorker

    def chunk(delta: dict, finish: str | None = None) -> bytes:  # type: ignore[type-arg]
        payload = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": "fake",
                   "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        return b"data: " + json.dumps(payload).encode() + b"\n\n"

    class Engine(StubEngine):
        model = "fake"

        def do_POST(self) -> None:
            self.read_body()
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()  # HTTP/1.0: the body ends when the connection closes
            for event in (chunk({"role": "assistant", "content": "Sure. <h>a red fox</h>"}), chunk({}, "stop"),
                          b"data: [DONE]\n\n"):
                self.wfile.write(event)
                self.wfile.flush()

    class Worker(StubWorker):
        def do_POST(self) -> None:
            self.read_body()
            time.sleep(delay_s)
            self.send_object({"data": worker_data})

    return Engine, Worker


def _stream_raw(base: str) -> bytes:
    import httpx

    body = {"model": "fake", "stream": True, "messages": [{"role": "user", "content": "Draw a fox."}],
            "modalities": ["text", "image"], "image_options": {"size": "64x64"}}
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        return b"".join(r.iter_raw())


def test_stream_sends_keep_alives_while_drawing(gateway_server, png, monkeypatch):  # type: ignore[no-untyped-def]
    from server.gateway import sse
    from tests.support.live import http_server

    engine, worker = _fake_backends([{"b64_json": base64.b64encode(png).decode(), "seed": 1}], delay_s=1.3)
    with http_server(engine) as engine_url, http_server(worker) as worker_url:
        config = GatewayConfig(engines=(engine_url,), sdxl_workers=(worker_url,), stream_keepalive_s=0.2)
        with gateway_server(config) as base:
            raw = _stream_raw(base)
    events = raw.split(b"\n\n")
    keepalives = [i for i, e in enumerate(events) if e + b"\n\n" == sse.KEEPALIVE]
    images = [i for i, e in enumerate(events) if b'"images"' in e]
    assert len(keepalives) >= 3, raw[:2000]
    assert images and max(keepalives) < images[0]  # sent while the image was drawn, before the images chunk
    assert raw.endswith(sse.DONE_EVENT)


def test_stream_ends_with_an_error_event_when_drawing_fails_unexpectedly(gateway_server):  # type: ignore[no-untyped-def]
    from server.gateway import sse
    from tests.support.live import http_server

    engine, worker = _fake_backends([{"seed": 1}], delay_s=0)  # no b64_json: a KeyError, not an APIError
    with http_server(engine) as engine_url, http_server(worker) as worker_url:
        config = GatewayConfig(engines=(engine_url,), sdxl_workers=(worker_url,))
        with gateway_server(config) as base:
            raw = _stream_raw(base)
            import httpx

            assert httpx.get(base + "/health", timeout=5).status_code == 200
    last = raw.rstrip(b"\n").split(b"\n\n")[-1] + b"\n\n"
    assert sse.name(last) == "error", raw[-500:]
    error = sse.json_data(last)["error"]
    assert error["code"] == "image_generation_failed" and "chatcmpl-fake" in error["message"]
    assert sse.DONE_EVENT not in raw
