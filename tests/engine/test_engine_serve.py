"""``mgm engine``: the vLLM server command line and environment, the serving files (chat template, stop ids), and one
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
from pathlib import Path

import pytest
from PIL import Image

from engine.prompt import chat_template, expand_image_tokens, render_prompt, tokenize_official
from engine.serving import prepare_serving_files
from server.cli import VLLM_SERVER_MODULE, build_parser, engine_command, main
from server.procs import free_port


def _command(argv: list[str], environ: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    args, extra = build_parser().parse_known_args(["engine", *argv])
    return engine_command(args, extra, Path("/s/chat_template.jinja"), Path("/s"), environ or {})


def test_cpu_defaults(tmp_path, monkeypatch):
    monkeypatch.delenv("MGM_KV_CACHE_GIB", raising=False)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)  # flag defaults are read when the parser is built
    argv, env = _command(["--model", str(tmp_path), "--device", "cpu", "--port", "8011", "--max-model-len", "512"])
    assert argv[:3] == [sys.executable, "-m", VLLM_SERVER_MODULE]
    assert argv[3:5] == ["--model", str(tmp_path)]
    assert argv[argv.index("--chat-template") + 1] == "/s/chat_template.jinja"
    assert argv[argv.index("--generation-config") + 1] == "/s"
    assert "--enforce-eager" in argv and argv[-4:] == ["--port", "8011", "--max-model-len", "512"]
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    cpus = sorted(os.sched_getaffinity(0))
    assert env["VLLM_CPU_OMP_THREADS_BIND"].split(",")[0].split("-")[0] == str(cpus[0])
    def bound(*flags: str) -> set[int]:  # "0-2,5" → {0, 1, 2, 5}
        spec = _command(["--model", str(tmp_path), "--device", "cpu", *flags])[1]["VLLM_CPU_OMP_THREADS_BIND"]
        return {c for part in spec.split(",") for a, _, b in [part.partition("-")] for c in range(int(a), int(b or a) + 1)}

    # default 'reserve': every usable CPU but the last, which is left to the API server; 'all': every one
    assert bound() == (set(cpus[:-1]) if len(cpus) > 1 else set(cpus))
    assert bound("--cpu-threads-bind", "all") == set(cpus)
    assert env["VLLM_TARGET_DEVICE"] == "cpu"
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "6")  # an existing vLLM setting is the next default
    assert _command(["--model", str(tmp_path), "--device", "cpu"])[1]["VLLM_CPU_KVCACHE_SPACE"] == "6"


def test_flags_env_and_user_overrides(tmp_path, monkeypatch):
    monkeypatch.setenv("MGM_KV_CACHE_GIB", "3.5")
    args, extra = build_parser().parse_known_args(
        ["engine", "--model", str(tmp_path), "--device", "cpu", "--cpu-threads-bind", "auto",
         "--chat-template", "mine.jinja", "--generation-config=vllm", "--no-enforce-eager"])
    argv, env = engine_command(args, extra, Path("/s/t.jinja"), Path("/s"), {"KEEP": "1"})
    assert argv.count("--chat-template") == 1 and "mine.jinja" in argv and "/s/t.jinja" not in argv
    assert "/s" not in argv and "--enforce-eager" not in argv
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "3.5" and env["KEEP"] == "1"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "auto" and env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    # --compile lets vLLM compile; a GPU run gets no CPU settings at all
    argv, _ = _command(["--model", str(tmp_path), "--device", "cpu", "--compile"])
    assert "--enforce-eager" not in argv
    argv, env = _command(["--model", str(tmp_path), "--device", "gpu"])
    assert "--enforce-eager" not in argv and "VLLM_CPU_KVCACHE_SPACE" not in env
    with pytest.raises(ValueError, match="--kv-cache-gib"):
        _command(["--model", str(tmp_path), "--device", "cpu", "--kv-cache-gib", "0"])


def test_cli_errors(tmp_path, capsys):
    assert main(["engine", "--model", str(tmp_path / "nope")]) == 2
    assert "no config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["build-tiny", str(tmp_path / "x"), "--port", "1"])  # only `engine` passes arguments through
    assert "unrecognized arguments: --port 1" in capsys.readouterr().err


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


def test_openai_server_image_chat(tiny_checkpoint, tiny_tokenizer, tmp_path):
    model = tiny_checkpoint("llama")
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    env = {**os.environ, "MGM_KV_CACHE_GIB": "1", "MGM_SERVING_DIR": str(tmp_path / "serving")}
    server = subprocess.Popen(
        [sys.executable, "-m", "server", "engine", "--model", str(model), "--port", str(port), "--host", "127.0.0.1",
         "--max-model-len", "1024", "--dtype", "float32", "--limit-mm-per-prompt", '{"image": 2}'],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "server did not start in 240 s"
                time.sleep(1)

        image = Image.new("RGB", (40, 70), (30, 60, 200))
        content = [{"type": "image_url", "image_url": {"url": _png_url(image)}}, {"type": "text", "text": "What is this?"}]
        status, reply = _post(base + "/v1/chat/completions", {
            "model": str(model), "messages": [{"role": "user", "content": content}],
            "max_tokens": 5, "temperature": 0, "return_token_ids": True})
        assert status == 200, reply
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
        status, reply = _post(base + "/v1/chat/completions", {
            "model": str(model), "messages": [{"role": "user", "content": "What is this?"}],
            "max_tokens": 1, "temperature": 0, "return_token_ids": True, "add_special_tokens": True})
        assert status == 200, reply
        text_prompt = render_prompt([{"role": "user", "content": "What is this?"}], "vicuna_v1")
        assert reply["prompt_token_ids"] == tokenize_official(tok, text_prompt)[0]
        assert reply["prompt_token_ids"][0] == tok.bos_token_id

        status, reply = _post(base + "/v1/chat/completions", {
            "model": str(model), "max_tokens": 1,
            "messages": [{"role": "user", "content": [content[0]] * 3 + [content[1]]}]})
        assert status == 400 and "At most 2 image" in json.dumps(reply)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
