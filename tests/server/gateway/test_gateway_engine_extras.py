"""What reaches the engine: OpenAI fields and the allow-listed vLLM extras pass, other unknown top-level fields
(engine switches such as ``chat_template``) are dropped and logged. An http.server stands in for the engine and
records the body it got; the gateway is real."""

from __future__ import annotations

import json

import httpx
import pytest

from server.gateway.config import GatewayConfig
from support.live import http_server
from support.stub_engine import StubEngine


class _Recorder(StubEngine):
    model = "rec"
    bodies: list[dict] = []  # type: ignore[type-arg]
    request_ids: list[str | None] = []

    def do_POST(self) -> None:
        type(self).bodies.append(json.loads(self.read_body()))
        type(self).request_ids.append(self.headers.get("x-request-id"))
        self.send_json(json.dumps({"id": "c", "object": "chat.completion", "created": 1, "model": "rec", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}]}).encode())


@pytest.fixture(scope="module")
def recording_gateway(gateway_server):  # type: ignore[no-untyped-def]
    with http_server(_Recorder) as engine:
        with gateway_server(GatewayConfig(engines=(engine,), probe_interval_s=0.2)) as base:
            yield base


def test_only_allow_listed_extras_reach_the_engine(recording_gateway, caplog):
    body = {"model": "rec", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "top_k": 5,
            "ignore_eos": True, "structured_outputs": {"regex": "a+"}, "user": "u1",
            "chat_template": "{{ 'pwned' }}", "mm_processor_kwargs": {"x": 1}, "kv_transfer_params": {}}
    with caplog.at_level("INFO", logger="mgm.gateway"):
        for _ in range(20):  # the engine may not have been probed yet on the first try
            r = httpx.post(recording_gateway + "/v1/chat/completions", json=body, timeout=10)
            if r.status_code == 200:
                break
    assert r.status_code == 200, r.text
    got = _Recorder.bodies[-1]
    assert {k: got[k] for k in ("top_k", "ignore_eos", "structured_outputs", "user", "max_tokens")} == {
        "top_k": 5, "ignore_eos": True, "structured_outputs": {"regex": "a+"}, "user": "u1", "max_tokens": 3}
    assert not {"chat_template", "mm_processor_kwargs", "kv_transfer_params"} & set(got)
    assert got["add_special_tokens"] is True  # the gateway's own addition
    dropped = [r for r in caplog.records if r.getMessage() == "fields not passed to the engine"]
    assert dropped and dropped[-1].fields == {"fields": "chat_template,kv_transfer_params,mm_processor_kwargs"}


def test_responses_forwards_the_same_extras(recording_gateway):
    body = {"model": "rec", "input": "Hi", "max_output_tokens": 3, "ignore_eos": True, "top_k": 7, "store": False,
            "chat_template": "{{ 'pwned' }}"}
    r = httpx.post(recording_gateway + "/v1/responses", json=body, timeout=10)
    assert r.status_code == 200, r.text
    got = _Recorder.bodies[-1]
    assert (got["ignore_eos"], got["top_k"], got["max_tokens"]) == (True, 7, 3)
    assert "chat_template" not in got and "store" not in got


def test_responses_tool_without_a_user_message_names_input(recording_gateway):
    """The image_generation tool runs the turn in generation mode, which needs a user message: the 400 names
    Responses' ``input`` (not chat's ``messages`` or ``modalities``); chat keeps its own wording."""
    calls = len(_Recorder.bodies)
    r = httpx.post(recording_gateway + "/v1/responses", timeout=10, json={
        "model": "rec", "input": [{"role": "developer", "content": "Draw."}], "tools": [{"type": "image_generation"}]})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"]) == ("input", "invalid_value") and "input" in err["message"], err
    assert "messages" not in err["message"] and "modalities" not in err["message"], err
    assert len(_Recorder.bodies) == calls  # never reached the engine


def test_responses_instructions_belong_to_their_turn(recording_gateway):
    """As on OpenAI, a follow-up does not carry the previous turn's instructions: its own replace them."""
    first = httpx.post(recording_gateway + "/v1/responses", json={
        "model": "rec", "input": "Hi", "instructions": "Be brief."}, timeout=10)
    assert first.status_code == 200, first.text
    assert _Recorder.bodies[-1]["messages"][0] == {"role": "system", "content": "Be brief."}
    second = httpx.post(recording_gateway + "/v1/responses", json={
        "model": "rec", "input": "More", "instructions": "Be long.", "previous_response_id": first.json()["id"]},
        timeout=10)
    assert second.status_code == 200, second.text
    assert [(m["role"], m["content"]) for m in _Recorder.bodies[-1]["messages"]] == [
        ("system", "Be long."), ("user", "Hi"), ("assistant", "ok"), ("user", "More")]


def test_the_clients_request_id_reaches_the_engine(recording_gateway):
    body = {"model": "rec", "messages": [{"role": "user", "content": "Hi"}]}
    for given, expect_own in (("trace-42.a:b", True), ("not a token", False), ("x" * 300, False)):
        r = httpx.post(recording_gateway + "/v1/chat/completions", json=body, headers={"x-request-id": given},
                       timeout=10)
        assert r.status_code == 200, r.text
        got = _Recorder.request_ids[-1]
        assert (got == given) if expect_own else (got and got != given and got.startswith("gw-"))
        # the answer names the same id (the SDKs' request id) and the gateway's processing time
        assert r.headers["x-request-id"] == got and int(r.headers["openai-processing-ms"]) >= 0
    # every answer has one, refusals and other routes included
    for r in (httpx.get(recording_gateway + "/v1/models", timeout=10),
              httpx.post(recording_gateway + "/v1/chat/completions", json={}, timeout=10),
              httpx.get(recording_gateway + "/v1/nothing", timeout=10)):
        assert r.headers["x-request-id"].startswith("gw-"), (r.status_code, r.headers)


class _SmallContext(_Recorder):
    """An engine whose model card says its context is 64 tokens (vLLM's ``max_model_len`` field)."""

    bodies: list[dict] = []  # type: ignore[type-arg]
    request_ids: list[str | None] = []

    def do_GET(self) -> None:
        card = {"id": self.model, "object": "model", "max_model_len": 64}
        self.send_json(json.dumps({"object": "list", "data": [card]}).encode() if self.path == "/v1/models" else b"{}")


def test_text_that_cannot_fit_the_context_never_reaches_the_engine(gateway_server):
    """64 tokens × 4 characters per token (--max-prompt-chars-per-token 4) = 256 characters of text at most, counted
    over every message and text part; beyond that a 400 before the engine tokenises anything."""
    with http_server(_SmallContext) as engine, gateway_server(
            GatewayConfig(engines=(engine,), probe_interval_s=0.2, max_prompt_chars_per_token=4)) as base:
        def post(*texts: str) -> httpx.Response:
            messages = [{"role": "system", "content": texts[0]},
                        {"role": "user", "content": [{"type": "text", "text": t} for t in texts[1:]]}]
            return httpx.post(base + "/v1/chat/completions", json={"model": "rec", "messages": messages}, timeout=10)

        assert post("a" * 100, "b" * 100, "c" * 56).status_code == 200  # exactly 256
        sent = len(_SmallContext.bodies)
        r = post("a" * 100, "b" * 100, "c" * 57)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert (err["code"], err["param"]) == ("context_length_exceeded", "messages") and "64 tokens" in err["message"]
        assert len(_SmallContext.bodies) == sent  # the engine saw nothing
        assert post("ok", "fine").status_code == 200


def test_turns_are_merged_for_the_chat_template(recording_gateway):
    """Two system messages, a developer message and two user turns in a row (OpenAI accepts them; MGM's template
    wants alternating turns) reach the engine as one system turn and one user turn, in order."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "developer", "content": "Be kind."},
                {"role": "user", "content": "Hi"}, {"role": "user", "content": [{"type": "text", "text": "again"}]}]
    r = httpx.post(recording_gateway + "/v1/chat/completions", timeout=10,
                   json={"model": "rec", "messages": messages})
    assert r.status_code == 200, r.text
    assert _Recorder.bodies[-1]["messages"] == [
        {"role": "system", "content": "Be brief.\n\nBe kind."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "\n\n"},
                                     {"type": "text", "text": "again"}]}]
