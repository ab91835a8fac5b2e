"""``mgm engine``'s serving files (chat template, stop ids), and one
real OpenAI-server start answering an image chat request with the official prompt ids."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from engine.prompt import chat_template, render_prompt, tokenize_official
from engine.serving import prepare_serving_files
from server.procs import free_port
from support.image_tokens import expand_image_tokens
from support.official_images import rotated_jpeg, transparent_png


@pytest.mark.parametrize("backbone", ["llama", "gemma", "mixtral"])
def test_serving_files(tiny_checkpoint, tiny_tokenizer, tmp_path, backbone):
    files = prepare_serving_files(tiny_checkpoint(backbone), tmp_path)
    tok = tiny_tokenizer(backbone)
    name = {"llama": "vicuna_v1", "gemma": "gemma", "mixtral": "mistral_instruct"}[backbone]
    assert files.template == name and files.chat_template.read_text() == chat_template(name)
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    expected = [tok.eos_token_id] + ([tok.convert_tokens_to_ids("<end_of_turn>")] if backbone == "gemma" else [])
    assert list(files.stop_token_ids) == expected
    assert generation["eos_token_id"] == (expected if len(expected) > 1 else expected[0])
    assert generation["bos_token_id"] == tok.bos_token_id and files.stop_strings == ()
    # override; a multi-token stop string is reported for the client to pass
    files = prepare_serving_files(tiny_checkpoint(backbone), tmp_path / "o", template="chatml_direct")
    assert files.template == "chatml_direct" and files.stop_strings == ("<|im_end|>",)
    with pytest.raises(ValueError, match="unknown conversation template"):
        prepare_serving_files(tiny_checkpoint(backbone), tmp_path / "bad", template="alpaca")


def test_official_sampling_defaults_reach_vllm(tiny_checkpoint, tmp_path):
    """The official CLI samples at temperature 0.2 with up to 512 new tokens (HF's top_k 50): written into the
    generation config, read back the way vLLM reads its defaults (non-default values of GenerationConfig)."""
    from vllm.transformers_utils.config import try_get_generation_config

    files = prepare_serving_files(tiny_checkpoint("llama"), tmp_path / "official")
    diff = try_get_generation_config(str(tmp_path / "official"), trust_remote_code=False).to_diff_dict()
    assert {k: diff.get(k) for k in ("temperature", "top_k", "max_new_tokens", "do_sample")} == {
        "temperature": 0.2, "top_k": 50, "max_new_tokens": 512, "do_sample": True}
    assert files.sampling == {"temperature": 0.2, "top_k": 50, "max_new_tokens": 512}
    kept = prepare_serving_files(tiny_checkpoint("llama"), tmp_path / "kept", sampling="checkpoint")
    data = json.loads((tmp_path / "kept" / "generation_config.json").read_text())
    assert not {"temperature", "top_k", "max_new_tokens"} & set(data) and kept.sampling == {}
    with pytest.raises(ValueError, match="unknown sampling defaults"):
        prepare_serving_files(tiny_checkpoint("llama"), tmp_path / "bad", sampling="greedy")


# --- one real server ----------------------------------------------------------------------------------------------


def _post(url: str, body: dict) -> tuple[int, dict]:  # type: ignore[type-arg]
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _png_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@dataclass
class Engine:
    base: str
    model: Path
    trace: Path  # MGM_ENCODER_TRACE: one line per vision front-end run

    def chat(self, content: object, **extra: object) -> dict:  # type: ignore[type-arg]
        status, reply = _post(self.base + "/v1/chat/completions", {
            "model": self.model.name, "messages": [{"role": "user", "content": content}], **extra})
        assert status == 200, reply
        return reply

    def encoder_runs(self) -> int:
        return len(self.trace.read_text().split()) if self.trace.exists() else 0

    def counter(self, name: str) -> float:
        with urllib.request.urlopen(self.base + "/metrics", timeout=10) as r:
            return sum(float(line.rsplit(" ", 1)[1]) for line in r.read().decode().splitlines()
                       if line.startswith(name + "{") or line.startswith(name + " "))


@pytest.fixture(scope="module")
def engine(tiny_checkpoint, tmp_path_factory):  # type: ignore[no-untyped-def]
    """One real `mgm engine` (vLLM's OpenAI server with the plugin) for this module's tests."""
    model = tiny_checkpoint("llama")
    tmp = tmp_path_factory.mktemp("engine-serve")
    port = free_port()
    log = open(tmp / "server.log", "w")
    env = {**os.environ, "MGM_KV_CACHE_GIB": "1", "MGM_SERVING_DIR": str(tmp / "serving"),
           "MGM_ENCODER_TRACE": str(tmp / "encoder.trace")}
    server = subprocess.Popen(
        [sys.executable, "-m", "server", "engine", "--model", str(model), "--port", str(port), "--host", "127.0.0.1",
         "--max-model-len", "1024", "--dtype", "float32", "--limit-mm-per-prompt", '{"image": 2}'],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, (tmp / "server.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "server did not start in 240 s"
                time.sleep(1)
        yield Engine(base, model, tmp / "encoder.trace")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def _image_content(image: Image.Image, text: str = "What is this?") -> list:  # type: ignore[type-arg]
    return [{"type": "image_url", "image_url": {"url": _png_url(image)}}, {"type": "text", "text": text}]


def test_openai_server_image_chat(engine, tiny_tokenizer):
    base, model = engine.base, engine.model
    with urllib.request.urlopen(base + "/v1/models", timeout=10) as r:  # a clean id: the directory's name
        assert [m["id"] for m in json.loads(r.read())["data"]] == [model.name]
    content = _image_content(Image.new("RGB", (40, 70), (30, 60, 200)))
    reply = engine.chat(content, max_tokens=5, temperature=0, return_token_ids=True)
    assert reply["choices"][0]["message"]["content"] and reply["usage"]["completion_tokens"] == 5
    # The OpenAI chat path tokenises without special tokens; the ids are still the official ones, BOS included.
    tok = tiny_tokenizer("llama")
    prompt = render_prompt([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
                           "vicuna_v1")
    official = expand_image_tokens(tokenize_official(tok, prompt)[0], 16, tok.unk_token_id)
    assert reply["prompt_token_ids"] == official

    # Text only: no processor runs, and vLLM's chat path adds no BOS by default; with add_special_tokens (what
    # the gateway sends) the ids are the official ones. A BOS written by the template would not do: the text
    # after a special token is tokenised without SentencePiece's leading space.
    reply = engine.chat("What is this?", max_tokens=1, temperature=0, return_token_ids=True, add_special_tokens=True)
    text_prompt = render_prompt([{"role": "user", "content": "What is this?"}], "vicuna_v1")
    assert reply["prompt_token_ids"] == tokenize_official(tok, text_prompt)[0]
    assert reply["prompt_token_ids"][0] == tok.bos_token_id

    status, reply = _post(base + "/v1/chat/completions", {
        "model": model.name, "max_tokens": 1,
        "messages": [{"role": "user", "content": [content[0]] * 3 + [content[1]]}]})
    assert status == 400 and "At most 2 image" in json.dumps(reply)

    # Two images: the official CLI's "Image k:" numbering, with the official ids.
    reply = engine.chat([content[0], content[0], content[1]], max_tokens=1, temperature=0, return_token_ids=True)
    two = render_prompt([{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                      {"type": "text", "text": "What is this?"}]}], "vicuna_v1")
    assert "USER: Image 1:<image>\nImage 2:<image>\nWhat is this?" in two
    official = expand_image_tokens(tokenize_official(tok, two)[0], 16, tok.unk_token_id)
    assert reply["prompt_token_ids"] == official


def test_images_reach_the_processor_as_the_official_loader_sees_them(engine):
    """A transparent PNG and an EXIF-rotated JPEG answer exactly as their official convert('RGB') decodings do,
    and not as vLLM's white compositing would (engine.media)."""
    def first_logprobs(data: bytes) -> list:  # type: ignore[type-arg]
        url = "data:image/png;base64," + base64.b64encode(data).decode()
        reply = engine.chat([{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is this?"}],
                            max_tokens=1, temperature=0, logprobs=True, top_logprobs=5)
        return reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]

    def png(image: Image.Image) -> bytes:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()

    for data in (transparent_png(), rotated_jpeg()):
        decoded = Image.open(io.BytesIO(data))
        assert first_logprobs(data) == first_logprobs(png(decoded.convert("RGB"))), decoded.mode
    composited = Image.alpha_composite(Image.new("RGBA", (40, 70), (255, 255, 255, 255)),
                                       Image.open(io.BytesIO(transparent_png())))
    assert first_logprobs(png(composited.convert("RGB"))) != first_logprobs(transparent_png())


def test_unset_sampling_gets_the_official_defaults(engine):
    """A request that sets nothing gets the official defaults: here, up to 512 new tokens."""
    reply = engine.chat("Hi", ignore_eos=True)
    assert reply["usage"]["completion_tokens"] == 512, reply["usage"]


BLOCK = 128  # vLLM's KV block on CPU, in tokens


def test_a_repeated_image_is_served_from_the_prefix_cache(engine):
    """The same image with a prompt of several KV blocks, sent twice: the second time vLLM's prefix cache covers
    the blocks holding the image (whole blocks only) and the vision front end does not run; a different image with
    the same text shares no block, since the image sits in the first one (docs/vllm-plugin.md)."""
    text = " ".join(f"word{i}" for i in range(110))  # a few hundred tokens: several full blocks
    first = Image.new("RGB", (48, 48), (200, 30, 30))
    runs, hits = engine.encoder_runs(), engine.counter("vllm:prefix_cache_hits_total")
    reply = engine.chat(_image_content(first, text), max_tokens=1, temperature=0)
    prompt_tokens = reply["usage"]["prompt_tokens"]
    assert prompt_tokens > 3 * BLOCK and engine.encoder_runs() == runs + 1
    assert engine.counter("vllm:prefix_cache_hits_total") == hits  # a new image: nothing cached
    engine.chat(_image_content(first, text), max_tokens=1, temperature=0)
    gained = engine.counter("vllm:prefix_cache_hits_total") - hits
    assert gained >= BLOCK and gained % BLOCK == 0 and gained >= (prompt_tokens - 1) // BLOCK * BLOCK - BLOCK, gained
    assert engine.encoder_runs() == runs + 1  # the image's tokens came from the cache: no tower ran
    hits = engine.counter("vllm:prefix_cache_hits_total")
    engine.chat(_image_content(Image.new("RGB", (48, 48), (30, 200, 30)), text), max_tokens=1, temperature=0)
    assert engine.counter("vllm:prefix_cache_hits_total") == hits and engine.encoder_runs() == runs + 2
