"""Pure pieces of image generation: caption extraction (the official last-complete-span rule), the <GEN> suffix,
size parsing, quality/style mapping, and how the pool splits n."""

from __future__ import annotations

import pytest

from engine.names import GEN_SUFFIX
from server.gateway.any_to_any import add_gen_suffix
from server.gateway.image_generation import extract_caption, parse_size
from server.gateway.protocol import ImageOptions


def _official(text: str) -> str | None:
    """MGM cli.py l.210-212."""
    if "<h>" in text and "</h>" in text:
        return text.split("</h>")[-2].split("<h>")[-1]
    return None


@pytest.mark.parametrize("text", [
    "Sure! <h>a red fox in the snow</h>",
    "first <h>one</h> then <h>two</h> done",
    "<h>a</h><h>b</h>",
    "intro <h>kept</h> and an open <h>never closed",
])
def test_caption_is_the_last_complete_span_like_the_official_cli(text):
    assert extract_caption(text) == _official(text).strip()


@pytest.mark.parametrize("text", ["no caption", "<h>open only", "</h> close only", "<h>  </h>", ""])
def test_no_caption(text):
    assert extract_caption(text) is None


def test_stray_close_tag_after_the_last_span_is_not_a_caption():
    # the official split would return " b " here (text outside any span)
    assert extract_caption("a <h>x</h> b </h>") == "x"


def test_gen_suffix_goes_on_every_user_text_once():
    messages = [{"role": "user", "content": "old"}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:"}},
                                             {"type": "text", "text": "draw it"}]}]
    add_gen_suffix(messages)
    assert messages[0]["content"] == "old" + GEN_SUFFIX and messages[2]["content"][1]["text"] == "draw it" + GEN_SUFFIX
    assert messages[1]["content"] == "ok"
    add_gen_suffix(messages)  # a stored conversation already carries it: not twice
    assert messages[0]["content"] == "old <GEN>" and messages[2]["content"][1]["text"] == "draw it <GEN>"
    plain = [{"role": "user", "content": "a cat"}]
    add_gen_suffix(plain)
    assert plain[0]["content"] == "a cat <GEN>"
    only_image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:"}}]}]
    add_gen_suffix(only_image)
    assert only_image[0]["content"][-1] == {"type": "text", "text": "<GEN>"}


def test_sizes():
    assert parse_size("1024x1024", 64, 2048) == (1024, 1024)
    assert parse_size("64X128", 64, 2048) == (64, 128)
    for bad in ("1024", "100x100", "32x32", "4096x1024", "axb", "-64x64"):
        with pytest.raises(ValueError):
            parse_size(bad, 64, 2048)


def test_quality_style_mapping_and_overrides():
    p = ImageOptions().worker_payload("p", 1, 64, 64)  # nothing asked: the worker's official defaults (50 steps)
    assert "num_inference_steps" not in p and p["guidance_scale"] == 5.0 and "negative_prompt" not in p
    assert "num_inference_steps" not in ImageOptions(quality="auto").worker_payload("p", 1, 64, 64)
    steps = {q: ImageOptions(quality=q).worker_payload("p", 1, 64, 64)["num_inference_steps"]
             for q in ("low", "medium", "standard", "high", "xhigh", "max")}
    assert steps == {"low": 20, "medium": 30, "standard": 30, "high": 50, "xhigh": 50, "max": 50}
    assert "output_format" not in p  # PNG: the default every worker knows
    p = ImageOptions(output_format="webp", output_compression=70).worker_payload("p", 1, 64, 64)
    assert (p["output_format"], p["output_compression"]) == ("webp", 70)
    p = ImageOptions(quality="hd", style="vivid").worker_payload("p", 1, 64, 64)
    assert (p["num_inference_steps"], p["guidance_scale"]) == (50, 7.5)
    p = ImageOptions(quality="hd", num_inference_steps=3, guidance_scale=0, negative_prompt=None,
                     seed=7).worker_payload("p", 2, 64, 64)
    assert (p["num_inference_steps"], p["guidance_scale"], p["seed"], p["n"]) == (3, 0.0, 7, 2)
    assert "negative_prompt" in p and p["negative_prompt"] is None  # explicit null = no negative prompt


