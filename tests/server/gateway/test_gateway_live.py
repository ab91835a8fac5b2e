"""End to end: ONE real `mgm engine` (tiny random checkpoint, session fixture) behind a real gateway (uvicorn on a
free loopback port), driven by the official openai SDK."""

from __future__ import annotations

import base64

import httpx
import openai
import pytest

from server.procs import free_port
from server.gateway.config import GatewayConfig, ImagePolicy

KEY = "sk-live-test"
ALIAS = "mini-gemini-tiny"


@pytest.fixture(scope="module")
def gateway(engine, gateway_server):  # type: ignore[no-untyped-def]
    base, _model = engine
    # The image server of the tests lives on 127.0.0.1: allowed only through the explicit test setting.
    config = GatewayConfig(engines=(base,), api_keys=(KEY,), model_name=ALIAS,
                           images=ImagePolicy(allow_loopback=True, timeout_s=10))
    with gateway_server(config) as url:
        yield url


@pytest.fixture(scope="module")
def client(gateway) -> openai.OpenAI:  # type: ignore[no-untyped-def]
    return openai.OpenAI(base_url=gateway + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _ask(client: openai.OpenAI, content, **kwargs):  # type: ignore[no-untyped-def]
    kwargs.setdefault("max_tokens", 8)
    kwargs.setdefault("temperature", 0)
    return client.chat.completions.create(model=ALIAS, messages=[{"role": "user", "content": content}], **kwargs)


def test_models_list(client, engine, engine_checkpoint):
    ids = [m.id for m in client.models.list()]
    assert ids == [ALIAS, engine[1]] and engine[1] == engine_checkpoint.name  # a clean id, never a path


def test_text_chat(client, engine):
    reply = _ask(client, "Hello, who are you?")
    assert reply.object == "chat.completion" and len(reply.choices) == 1
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 8 and reply.usage.prompt_tokens > 0
    # the engine's own id works as well
    direct = client.chat.completions.create(model=engine[1], messages=[{"role": "user", "content": "Hello, who are you?"}],
                                            max_tokens=8, temperature=0)
    assert direct.choices[0].message.content == choice.message.content


def test_text_chat_gets_the_official_prompt_ids(client, engine, engine_checkpoint):
    """vLLM's chat path adds no BOS by itself; through the gateway a text-only chat has the official ids."""
    from transformers import AutoTokenizer

    from engine.prompt import render_prompt, tokenize_official

    messages = [{"role": "user", "content": "Hello, who are you?"}]
    reply = client.chat.completions.create(model=engine[1], messages=messages, max_tokens=1, temperature=0,
                                           extra_body={"return_token_ids": True})
    tok = AutoTokenizer.from_pretrained(engine_checkpoint)
    official = tokenize_official(tok, render_prompt(messages, "vicuna_v1"))[0]
    assert reply.prompt_token_ids == official and official[0] == tok.bos_token_id


def test_image_data_url_and_http_url_give_the_same_answer(client, png, image_server):
    as_data = "data:image/png;base64," + base64.b64encode(png).decode()
    parts = [{"type": "text", "text": "What is in the picture?"}]
    a = _ask(client, [{"type": "image_url", "image_url": {"url": as_data}}, *parts])
    b = _ask(client, [{"type": "image_url", "image_url": {"url": image_server.base + "/img.png", "detail": "low"}},
                      *parts])
    text = _ask(client, "What is in the picture?")
    assert a.choices[0].message.content and a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens > text.usage.prompt_tokens  # image tokens were added


def test_remote_image_errors(client, image_server):
    for url, code in ((image_server.base + "/notimage", "invalid_image"),
                      ("http://10.0.0.1/a.png", "image_url_not_allowed"),
                      (f"{image_server.base}/redirect?to=http://169.254.169.254/", "image_url_not_allowed")):
        with pytest.raises(openai.BadRequestError) as info:
            _ask(client, [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "x"}])
        assert info.value.code == code


def test_stream_with_include_usage(client):
    plain = _ask(client, "Tell me a story.", max_tokens=12)
    chunks = list(_ask(client, "Tell me a story.", max_tokens=12, stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    # without include_usage the gateway drops the usage chunk it asked the engine for
    chunks = list(_ask(client, "Tell me a story.", max_tokens=12, stream=True))
    assert chunks and all(c.choices and c.usage is None for c in chunks)


def test_n_seed_stop_logprobs(client):
    two = _ask(client, "Pick a word.", n=2, temperature=1.0, seed=3)
    assert sorted(c.index for c in two.choices) == [0, 1]
    a = _ask(client, "Pick a word.", temperature=1.0, seed=1234, max_tokens=10)
    b = _ask(client, "Pick a word.", temperature=1.0, seed=1234, max_tokens=10)
    assert a.choices[0].message.content == b.choices[0].message.content
    # stop: cut the greedy answer at one of its own later characters
    full = _ask(client, "Count with me.", max_tokens=16).choices[0].message.content
    assert full and len(full) > 2
    stop = full[len(full) // 2:len(full) // 2 + 1]
    cut = _ask(client, "Count with me.", max_tokens=16, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and stop not in cut.message.content
    assert full.startswith(cut.message.content)
    lp = _ask(client, "Hi", max_tokens=3, logprobs=True, top_logprobs=2, response_format={"type": "text"},
              max_completion_tokens=3)
    assert lp.choices[0].logprobs is not None and len(lp.choices[0].logprobs.content[0].top_logprobs) == 2


def test_errors_map_to_sdk_exceptions(client, gateway):
    with pytest.raises(openai.BadRequestError):
        _ask(client, "x", temperature=5)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=gateway + "/v1", api_key="nope", max_retries=0).models.list()
    # an engine-side validation error (too many images for --limit-mm-per-prompt) comes back as 400
    img = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(
        _png()).decode()}}
    with pytest.raises(openai.BadRequestError):
        _ask(client, [img, img, {"type": "text", "text": "x"}])


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


def test_unknown_fields_are_accepted_and_logged(client, caplog):
    with caplog.at_level("INFO", logger="mgm.gateway"):
        reply = _ask(client, "Hi", max_tokens=4, extra_body={"top_k": 1, "ignore_eos": True, "some_future_field": 1})
    assert reply.usage.completion_tokens == 4  # ignore_eos reached the engine
    logged = [r for r in caplog.records if "outside the OpenAI schema" in r.getMessage()]
    assert logged and logged[0].fields == {"fields": "ignore_eos,some_future_field,top_k"}


def test_failover_to_the_next_engine(engine, gateway_server):
    """An engine that was up but refuses connections is marked down and the request moves on; the client never
    sees the failure."""
    dead = f"http://127.0.0.1:{free_port()}"
    # least-loaded: ties go to the first listed, the dead one (affinity could pick the live one for this key)
    with gateway_server(GatewayConfig(engines=(dead, engine[0]), probe_interval_s=60, routing="least-loaded")) as base:
        app_gateway = gateway_server.apps[base].state.gateway
        app_gateway.pool.engines[0].up = True  # as if it had answered before it died
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model=engine[1], messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=3)
        assert reply.choices[0].message.content is not None
        assert app_gateway.pool.engines[0].up is False and app_gateway.pool.engines[1].up is True
        app_gateway.pool.engines[0].up = True  # again, for a stream: retried before anything reached the client
        chunks = list(client.chat.completions.create(model=engine[1], messages=[{"role": "user", "content": "Hi"}],
                                                     max_tokens=3, stream=True))
        assert chunks and chunks[0].choices[0].delta.role == "assistant"
        metrics = httpx.get(base + "/metrics").text
        assert "mgm_gateway_engine_retries_total 2.0" in metrics
        assert f'mgm_gateway_engine_up{{engine="{dead}"}} 0.0' in metrics


def test_metrics_after_traffic(gateway):
    text = httpx.get(gateway + "/metrics").text
    assert 'mgm_gateway_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert 'mgm_gateway_tokens_total{kind="completion"}' in text
    assert "mgm_gateway_ttft_seconds_count" in text and "mgm_gateway_ttft_seconds_count 0.0" not in text
    assert 'mgm_gateway_image_fetches_total{outcome="ok"}' in text


def test_32_concurrent_streams(gateway):
    import asyncio

    async def run() -> list[str]:
        client = openai.AsyncOpenAI(base_url=gateway + "/v1", api_key=KEY, max_retries=0, timeout=120)

        async def one(i: int) -> str:
            stream = await client.chat.completions.create(
                model=ALIAS, messages=[{"role": "user", "content": f"Story number {i}"}], max_tokens=4,
                temperature=0, stream=True, stream_options={"include_usage": True})
            parts, usage = [], None
            async for chunk in stream:
                if chunk.choices:
                    parts.append(chunk.choices[0].delta.content or "")
                usage = chunk.usage or usage
            assert usage is not None and usage.completion_tokens > 0
            return "".join(parts)

        try:
            return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(32))), timeout=120)
        finally:
            await client.close()

    texts = asyncio.run(run())
    assert len(texts) == 32 and all(texts)
    state = httpx.get(gateway + "/ready").json()
    assert state["engines"][0]["in_flight"] == 0


def test_mgm_gateway_command(engine, tmp_path):
    """`mgm gateway` as its own process: flags, env API key, readiness against the live engine, then SIGTERM."""
    import os
    import signal
    import subprocess
    import sys
    import time

    port = free_port()
    log = (tmp_path / "gateway.log").open("w")
    env = {**os.environ, "MGM_API_KEYS": "sk-one-secret,sk-two-secret"}
    proc = subprocess.Popen([sys.executable, "-m", "server", "gateway", "--engine", engine[0], "--port", str(port),
                             "--model-name", ALIAS], stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:  # bounded by the deadline
            assert proc.poll() is None, (tmp_path / "gateway.log").read_text()
            try:
                if httpx.get(base + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "gateway did not become ready"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=base + "/v1", api_key="sk-two-secret", max_retries=0)
        assert ALIAS in [m.id for m in client.models.list()]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="k3", max_retries=0).models.list()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
        log.close()
    text = (tmp_path / "gateway.log").read_text()
    assert "gateway started" in text and "secret" not in text
