"""Edits and previews on the live worker (tiny random SDXL): img2img and inpainting built from the loaded pipeline's
components, batched like text-to-image; the SSE stream of previews; output formats; bad edit fields."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import httpx
import pytest
from PIL import Image
from support.sdxl_live import SMALL, assert_error, generate, metric, png
from server.sdxl.pipeline import PipelineOptions, SDXLRunner


def _b64(img: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return base64.b64encode(buf.getvalue()).decode()


def _image(size=(64, 64), color=(200, 40, 40)) -> Image.Image:
    return Image.new("RGB", size, color)


def _mask(size=(64, 64)) -> Image.Image:
    """OpenAI's mask: the left half fully transparent (repaint), the right half opaque (keep)."""
    m = Image.new("RGBA", size, (0, 0, 0, 255))
    m.paste((0, 0, 0, 0), (0, 0, size[0] // 2, size[1]))
    return m


def _decoded(item: dict) -> Image.Image:
    return Image.open(io.BytesIO(png(item)))


def test_img2img_and_inpaint_share_the_loaded_components(tiny_sdxl):
    runner = SDXLRunner(PipelineOptions(model=tiny_sdxl, device="cpu", threads=1))
    for mode in ("img2img", "inpaint"):
        pipe = runner.pipes[mode]
        assert pipe.unet is runner.pipe.unet and pipe.vae is runner.pipe.vae, mode  # never a second copy
        assert pipe.text_encoder_2 is runner.pipe.text_encoder_2, mode
    assert set(runner.describe()["modes"]) == {"text2img", "img2img", "inpaint"}


def test_img2img_keeps_the_size_and_starts_from_the_image(sdxl_worker):
    url = sdxl_worker.url
    body = {**SMALL, "width": 64, "height": 96, "seed": 5, "image": _b64(_image((64, 96)))}
    r = generate(url, **body)
    assert r.status_code == 200, r.text
    out = _decoded(r.json()["data"][0])
    assert out.size == (64, 96)
    # A low strength stays near the input (a red square); text-to-image from the same seed does not.
    near = _decoded(generate(url, **{**body, "strength": 0.2, "num_inference_steps": 5}).json()["data"][0]).convert("RGB")
    r_mean = sum(p[0] for p in near.getdata()) / (64 * 96)
    assert r_mean > 120, r_mean


def test_inpaint_repaints_only_the_transparent_part(sdxl_worker):
    source = _image(color=(10, 200, 30))
    r = generate(sdxl_worker.url, **{**SMALL, "seed": 3, "image": _b64(source), "mask": _b64(_mask())})
    assert r.status_code == 200, r.text
    out = _decoded(r.json()["data"][0]).convert("RGB")
    kept = [out.getpixel((x, y)) for x in range(40, 64) for y in range(0, 64, 8)]  # right half, away from the seam
    assert all(max(abs(a - b) for a, b in zip(p, (10, 200, 30))) <= 12 for p in kept)
    painted = [out.getpixel((x, y)) for x in range(0, 20) for y in range(0, 64, 8)]
    assert any(max(abs(a - b) for a, b in zip(p, (10, 200, 30))) > 12 for p in painted)


def test_edit_jobs_batch_by_mode_and_strength(sdxl_worker):
    url = sdxl_worker.url
    edit = {**SMALL, "image": _b64(_image()), "strength": 0.6}

    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            # Queued behind a slow job so that both edits wait together and ride in one pipeline call.
            slow = asyncio.create_task(client.post("/v1/generate", json={**SMALL, "width": 256, "height": 256,
                                                                         "num_inference_steps": 60}))
            while metric(url, "mgm_sdxl_in_flight_jobs") < 1:
                await asyncio.sleep(0.02)
            jobs = [asyncio.create_task(client.post("/v1/generate", json={**edit, "seed": s})) for s in (1, 2)]
            other = asyncio.create_task(client.post("/v1/generate", json={**edit, "strength": 0.9, "seed": 3}))
            return [await slow, *await asyncio.gather(*jobs), await other]

    before = metric(url, "mgm_sdxl_mode_jobs_total", mode="img2img")
    _slow, a, b, c = asyncio.run(scenario())
    assert a.status_code == b.status_code == c.status_code == 200, (a.text, b.text, c.text)
    assert a.json()["batch"] == b.json()["batch"] == {"jobs": 2, "images": 2}
    assert c.json()["batch"] == {"jobs": 1, "images": 1}  # another strength: another batch
    assert metric(url, "mgm_sdxl_mode_jobs_total", mode="img2img") == before + 3


@pytest.mark.parametrize("fmt,magic", [("jpeg", b"\xff\xd8\xff"), ("webp", b"RIFF")])
def test_output_formats(sdxl_worker, fmt, magic):
    r = generate(sdxl_worker.url, **SMALL, output_format=fmt, output_compression=50)
    assert r.status_code == 200, r.text
    assert r.json()["output_format"] == fmt
    assert png(r.json()["data"][0]).startswith(magic)
    assert _decoded(r.json()["data"][0]).format == fmt.upper()


def _events(r: httpx.Response) -> list[dict | str]:
    out: list[dict | str] = []
    for block in r.text.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_stream_sends_previews_then_images_then_done(sdxl_worker):
    body = {**SMALL, "num_inference_steps": 6, "n": 2, "stream": True, "partial_images": 2, "seed": 9}
    before = metric(sdxl_worker.url, "mgm_sdxl_previews_total")
    r = httpx.post(sdxl_worker.url + "/v1/generate", json=body, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _events(r)
    assert events[-1] == "[DONE]"
    kinds = [e["type"] for e in events[:-1]]
    assert kinds == ["partial_image"] * 4 + ["image"] * 2, kinds
    assert [(e["partial_image_index"], e["index"]) for e in events[:4]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for e in events[:-1]:
        assert _decoded(e).size == (64, 64)
    assert [e["seed"] for e in events[4:6]] == [9, 10]
    # The final images are the images of the same request without streaming.
    plain = generate(sdxl_worker.url, **{k: v for k, v in body.items() if k not in ("stream", "partial_images")})
    assert [d["b64_json"] for d in plain.json()["data"]] == [e["b64_json"] for e in events[4:6]]
    assert metric(sdxl_worker.url, "mgm_sdxl_previews_total") == before + 4


@pytest.mark.parametrize("extra,param", [
    ({"strength": 0.0}, "strength"), ({"strength": 1.5}, "strength"), ({"partial_images": 4}, "partial_images"),
    ({"image": "bm90IGFuIGltYWdl"}, "image"), ({"image": _b64(_image()), "mask": "%%%"}, "mask"),
    ({"mask": _b64(_mask())}, "mask"), ({"output_format": "gif"}, "output_format"),
    ({"output_compression": 101}, "output_compression"),
    ({"image": _b64(_image()), "strength": 0.2, "num_inference_steps": 3}, "strength")])  # 0 denoising steps
def test_bad_edit_fields_are_400s_naming_the_field(sdxl_worker, extra, param):
    assert_error(generate(sdxl_worker.url, **{**SMALL, **extra}), 400, param=param)
    assert generate(sdxl_worker.url, **SMALL).status_code == 200


def test_stream_hang_up_cancels_the_job(sdxl_worker):
    url = sdxl_worker.url
    cancelled = metric(url, "mgm_sdxl_jobs_total", outcome="cancelled")
    body = {**SMALL, "width": 256, "height": 256, "num_inference_steps": 200, "stream": True, "partial_images": 3}
    with httpx.stream("POST", url + "/v1/generate", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):  # the first preview: the job is running; hang up now
                break

    async def wait() -> None:
        from support.sdxl_live import wait_for

        await wait_for(url, "mgm_sdxl_jobs_total", lambda v: v == cancelled + 1, outcome="cancelled")
        await wait_for(url, "mgm_sdxl_in_flight_jobs", lambda v: v == 0)

    asyncio.run(wait())
    assert generate(url, **SMALL).status_code == 200


def test_stream_with_fewer_steps_than_previews_sends_every_preview(sdxl_worker):
    """Previews due on the last step are queued as the job finishes: they still come, before the image."""
    body = {**SMALL, "num_inference_steps": 2, "stream": True, "partial_images": 3}
    events = _events(httpx.post(sdxl_worker.url + "/v1/generate", json=body, timeout=60))
    assert [e["type"] for e in events[:-1]] == ["partial_image"] * 3 + ["image"]
    assert [e["partial_image_index"] for e in events[:3]] == [0, 1, 2]
