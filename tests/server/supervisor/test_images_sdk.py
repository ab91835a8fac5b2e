"""The Images API through the official SDKs, unchanged, against the shared ``mgm serve`` stack (tiny MGM engine, tiny
SDXL worker, gateway as real processes): ``images.edit`` with one image, with a mask, with two images; streamed
generations and edits with partial images; ``output_format`` jpeg/webp decoding as such. Python here, Node through
``tests/node/images.mjs`` (the ``openai`` npm package, installed by ``make test``)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import openai
import pytest
from PIL import Image
from support.node_sdk import run_node
from support.serve_live import API_KEY, Serve

from server.gateway.config import GatewayConfig

MODEL = GatewayConfig.__dataclass_fields__["image_model_name"].default
FAST = {"num_inference_steps": 2}
#: The first bytes of each format, as the Node script prints them (hex).
MAGIC = {"PNG": "89504e47", "JPEG": "ffd8ff", "WEBP": "52494646"}


def _png(size: tuple[int, int] = (96, 64), alpha_hole: bool = False) -> bytes:
    img = Image.new("RGBA" if alpha_hole else "RGB", size, (200, 40, 40, 255) if alpha_hole else (200, 40, 40))
    if alpha_hole:  # OpenAI's mask: the fully transparent part is repainted
        img.paste((0, 0, 0, 0), (0, 0, size[0] // 2, size[1]))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


@pytest.fixture(scope="module")
def client(serve_stack: Serve) -> openai.OpenAI:
    return openai.OpenAI(base_url=serve_stack.base + "/v1", api_key=API_KEY, max_retries=0,  # type: ignore[attr-defined]
                         timeout=300)


def test_edit_one_image_is_drawn_from_the_image_at_its_size(client: openai.OpenAI):
    r = client.images.edit(model=MODEL, image=("a.png", _png(), "image/png"), prompt="make it snowy",
                           response_format="b64_json", extra_body=FAST)
    assert len(r.data) == 1 and r.size == "96x64" and r.data[0].revised_prompt
    assert r.model_extra["prompt_enhancement"] in ("enhanced", "no_caption")  # type: ignore[index]
    image = _decoded(r.data[0].b64_json)  # type: ignore[arg-type]
    assert (image.format, image.size) == ("PNG", (96, 64))


def test_edit_with_a_mask_and_jpeg_output(client: openai.OpenAI):
    r = client.images.edit(model=MODEL, image=("a.png", _png(), "image/png"),
                           mask=("m.png", _png(alpha_hole=True), "image/png"), prompt="a hat", n=2,
                           response_format="b64_json", output_format="jpeg", output_compression=80, extra_body=FAST)
    assert len(r.data) == 2 and r.output_format == "jpeg"
    assert {_decoded(d.b64_json).format for d in r.data} == {"JPEG"}  # type: ignore[arg-type]


def test_edit_with_two_images_and_webp_output(client: openai.OpenAI):
    r = client.images.edit(model=MODEL, image=[("a.png", _png(), "image/png"), ("b.png", _png((64, 64)), "image/png")],
                           prompt="put them together", response_format="b64_json", output_format="webp",
                           extra_body=FAST)
    assert r.output_format == "webp" and _decoded(r.data[0].b64_json).format == "WEBP"  # type: ignore[arg-type]


def test_streamed_generation_sends_partial_images_then_the_image(client: openai.OpenAI):
    stream = client.images.generate(model=MODEL, prompt="a fox", size="64x64", stream=True, partial_images=2,
                                    extra_body=FAST | {"enhance_prompt": False})
    events = list(stream)
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]  # type: ignore[union-attr]
    for e in events:
        assert _decoded(e.b64_json).size == (64, 64) and e.output_format == "png" and e.size == "64x64"
    assert events[-1].usage is not None


def test_streamed_edit_sends_one_partial_image(client: openai.OpenAI):
    stream = client.images.edit(model=MODEL, image=("a.png", _png(), "image/png"), prompt="at night", stream=True,
                                partial_images=1, extra_body=FAST)
    events = list(stream)
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    assert _decoded(events[-1].b64_json).size == (96, 64)


def test_bad_edits_are_400_naming_the_field(client: openai.OpenAI):
    for kwargs, param in ((dict(mask=("m.png", _png(), "image/png")), "mask"),  # no alpha
                          (dict(mask=("m.png", _png((32, 32), alpha_hole=True), "image/png")), "mask"),
                          (dict(partial_images=4, stream=True), "partial_images"),
                          (dict(background="transparent"), "background"),
                          (dict(extra_body={"strength": 1.5}), "strength")):
        with pytest.raises(openai.BadRequestError) as err:
            client.images.edit(model=MODEL, image=("a.png", _png(), "image/png"), prompt="x", **kwargs)
        assert err.value.body["param"] == param, err.value.body  # type: ignore[index]
    r = client.images.edit(model=MODEL, image=("a.png", _png(), "image/png"), prompt="still fine",
                           response_format="b64_json", extra_body=FAST)
    assert r.data


def test_the_node_sdk_edits_and_streams(serve_stack: Serve, tmp_path: Path):
    image, mask = tmp_path / "a.png", tmp_path / "m.png"
    image.write_bytes(_png())
    mask.write_bytes(_png(alpha_hole=True))
    out = run_node("images.mjs", serve_stack.base + "/v1", API_KEY, MODEL, str(image), str(mask))  # type: ignore[attr-defined]
    assert out["one"]["n"] == 1 and out["one"]["size"] == "96x64" and out["one"]["revised_prompt"]
    assert out["one"]["magic"].startswith(MAGIC["PNG"])
    assert out["mask"]["output_format"] == "jpeg" and out["mask"]["magic"].startswith(MAGIC["JPEG"])
    assert out["two"]["output_format"] == "webp" and out["two"]["magic"].startswith(MAGIC["WEBP"])
    assert [e["type"] for e in out["generate_stream"]] == (["image_generation.partial_image"] * 2
                                                           + ["image_generation.completed"])
    assert [e["partial_image_index"] for e in out["generate_stream"][:2]] == [0, 1]
    assert [e["type"] for e in out["edit_stream"]] == ["image_edit.partial_image", "image_edit.completed"]
    assert out["bad_mask"] == {"status": 400, "param": "mask", "code": "invalid_image"}
