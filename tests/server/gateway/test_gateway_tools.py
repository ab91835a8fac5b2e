"""Function tools on chat completions through a real gateway (stub engines that answer what structured outputs would
make a model answer): a named choice and "required" become constrained calls returned as tool_calls, streamed or
not; "auto" is a clear 400; tool turns reach the engine as text; bad tools name their field."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from support.live import http_server
from support.stub_engine import StubEngine

from server.gateway.config import GatewayConfig

WEATHER = {"type": "function", "function": {"name": "weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}


class _Constrained(StubEngine):
    """Answers like a model under ``structured_outputs.json``: the arguments for one function, or a name/arguments
    object for an ``anyOf`` of several."""

    model = "tools"
    bodies: list[dict] = []  # type: ignore[type-arg]

    def do_POST(self) -> None:
        body = json.loads(self.read_body())
        type(self).bodies.append(body)
        schema = (body.get("structured_outputs") or {}).get("json") or {}
        text = json.dumps({"name": "time", "arguments": {"zone": "UTC"}} if "anyOf" in schema else {"city": "Paris"})
        self.send_json(json.dumps({"id": "chatcmpl-t", "object": "chat.completion", "created": 1, "model": self.model,
                                   "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                                "finish_reason": "stop"}],
                                   "usage": {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}}).encode())


@pytest.fixture(scope="module")
def client(gateway_server):  # type: ignore[no-untyped-def]
    with http_server(_Constrained) as engine:
        with gateway_server(GatewayConfig(engines=(engine,), probe_interval_s=0.2)) as base:
            yield openai.OpenAI(base_url=base + "/v1", api_key="-", max_retries=0)


def test_a_named_function_is_a_constrained_call(client):
    r = client.chat.completions.create(model="tools", messages=[{"role": "user", "content": "Weather in Paris?"}],
                                       tools=[WEATHER, TIME], tool_choice={"type": "function",
                                                                           "function": {"name": "weather"}})
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert r.choices[0].message.content is None and r.choices[0].finish_reason == "tool_calls"
    sent = _Constrained.bodies[-1]
    assert sent["structured_outputs"] == {"json": WEATHER["function"]["parameters"]}
    assert "tools" not in sent and "tool_choice" not in sent


def test_required_with_several_tools_picks_one_and_streams(client):
    stream = client.chat.completions.create(model="tools", messages=[{"role": "user", "content": "Time?"}],
                                            tools=[WEATHER, TIME], tool_choice="required", stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    (call,) = chunks[0].choices[0].delta.tool_calls
    assert call.function.name == "time" and json.loads(call.function.arguments) == {"zone": "UTC"}
    assert chunks[1].choices[0].finish_reason == "tool_calls" and chunks[-1].usage.total_tokens == 14
    schema = _Constrained.bodies[-1]["structured_outputs"]["json"]
    assert [o["properties"]["name"]["const"] for o in schema["anyOf"]] == ["weather", "time"]


def test_tool_turns_reach_the_engine_as_text(client):
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                    "name": "weather", "arguments": "{\"city\": \"Paris\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
                {"role": "user", "content": "So, shorts?"}]
    r = client.chat.completions.create(model="tools", messages=messages, tools=[WEATHER], tool_choice="none")
    assert r.choices[0].message.content  # "none": an ordinary answer
    sent = _Constrained.bodies[-1]["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]
    assert sent[1]["content"] == 'Called weather({"city": "Paris"})'
    assert sent[2]["content"] == [{"type": "text", "text": "Tool result (tool): sunny, 21 C"},
                                  {"type": "text", "text": "\n\n"}, {"type": "text", "text": "So, shorts?"}] or \
        sent[2]["content"] == "Tool result (tool): sunny, 21 C\n\nSo, shorts?"
    assert "structured_outputs" not in _Constrained.bodies[-1]


@pytest.mark.parametrize("kwargs,param,code", [
    ({"tools": [WEATHER]}, "tool_choice", "unsupported_tool_choice"),  # auto: MGM was not trained to decide
    ({"tools": [WEATHER], "tool_choice": "auto"}, "tool_choice", "unsupported_tool_choice"),
    ({"tools": [{"type": "web_search"}], "tool_choice": "required"}, "tools[0].type", "unsupported_tool"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "invalid_value"),
    ({"tools": [{"type": "function", "function": {}}], "tool_choice": "required"}, "tools[0].function.name",
     "missing_required_parameter"),
])
def test_what_cannot_be_served_is_a_clear_400(client, kwargs, param, code):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tools", messages=[{"role": "user", "content": "x"}], **kwargs)
    assert (err.value.body["param"], err.value.body["code"]) == (param, code), err.value.body
    assert "auto" not in kwargs.get("tool_choice", "") or "Name the function" in err.value.body["message"]
    assert httpx.get(str(client.base_url).rsplit("/v1", 1)[0] + "/health", timeout=5).status_code == 200


def test_arguments_with_raw_control_characters_are_reserialised():
    """Grammar backends let raw control characters into JSON strings (seen with vLLM on the tiny model); clients'
    strict parsers would refuse them, so the call's arguments are re-serialised."""
    from server.gateway.tools import ToolPlan

    payload = {"choices": [{"index": 0, "message": {"content": '{ "city"\t:"a\x1cb" }'}, "finish_reason": "stop"}]}
    (call,) = ToolPlan(["weather"], named=True).shape(payload)["choices"][0]["message"]["tool_calls"]
    assert json.loads(call["function"]["arguments"]) == {"city": "a\x1cb"}
    cut = {"choices": [{"index": 0, "message": {"content": '{"ci'}, "finish_reason": "length"}]}
    (call,) = ToolPlan(["weather"], named=True).shape(cut)["choices"][0]["message"]["tool_calls"]
    assert call["function"]["arguments"] == '{"ci' and cut["choices"][0]["finish_reason"] == "length"
