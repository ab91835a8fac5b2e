"""LangChain (``langchain-openai``) and LiteLLM, unchanged, against the shared ``mgm serve`` stack: a chat with two
system messages (the gateway merges them), ``bind_tools`` / ``tools`` with a named tool choice (answered through the
engine's structured outputs), and an any-to-any stream whose image reaches the client.

The random-weight model rarely writes ``<h>…</h>`` by itself, so the any-to-any requests ask vLLM's structured
outputs for a caption-shaped answer in ``extra_body`` (what a user can send too); the drawing is real."""

from __future__ import annotations

import json
import os

import pytest
from support.serve_live import ALIAS, API_KEY, Serve

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network: LiteLLM's bundled price map
litellm = pytest.importorskip("litellm")
langchain_openai = pytest.importorskip("langchain_openai")

CAPTION = r"Sure\. <h>[a-z]{3,8}( [a-z]{3,8}){1,2}</h>"
ANY_TO_ANY = {"modalities": ["text", "image"],
              "image_options": {"size": "64x64", "num_inference_steps": 2},
              "structured_outputs": {"regex": CAPTION}}
WEATHER = {"type": "function", "function": {"name": "weather", "description": "The weather in a city.", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
    "additionalProperties": False}}}
TWO_SYSTEMS = [{"role": "system", "content": "You are terse."}, {"role": "system", "content": "Answer in English."},
               {"role": "user", "content": "Say hi."}]


@pytest.fixture(scope="module")
def base(serve_stack: Serve) -> str:
    return serve_stack.base + "/v1"  # type: ignore[attr-defined]


def _chat_model(base: str, **kwargs):  # type: ignore[no-untyped-def]
    return langchain_openai.ChatOpenAI(model=ALIAS, base_url=base, api_key=API_KEY, max_retries=0, timeout=300,
                                       **kwargs)


def _litellm(base: str, **kwargs):  # type: ignore[no-untyped-def]
    return litellm.completion(model="openai/" + ALIAS, api_base=base, api_key=API_KEY, num_retries=0, timeout=300,
                              **kwargs)


# --- LangChain ---------------------------------------------------------------------------------------------------

def test_langchain_two_system_messages(base: str):
    from langchain_core.messages import HumanMessage, SystemMessage

    msg = _chat_model(base, max_tokens=4).invoke([SystemMessage("You are terse."), SystemMessage("Answer in English."),
                                                  HumanMessage("Say hi.")])
    assert isinstance(msg.content, str) and msg.response_metadata["finish_reason"] in ("stop", "length")
    assert msg.usage_metadata["output_tokens"] <= 4


def test_langchain_bind_tools_with_a_named_choice(base: str):
    llm = _chat_model(base, max_tokens=40).bind_tools([WEATHER], tool_choice="weather")
    msg = llm.invoke("What is the weather in Paris?")
    (call,) = msg.tool_calls
    assert call["name"] == "weather" and set(call["args"]) == {"city"} and isinstance(call["args"]["city"], str)


def test_langchain_any_to_any_stream_brings_the_image(base: str):
    """LangChain keeps only the fields it knows of a streamed delta, so the image is read where it keeps the raw
    chunk: with ``stream_usage`` the stream still ends in the usage chunk, and the image chunk came before it."""
    llm = _chat_model(base, max_tokens=30, streaming=True, stream_usage=True, extra_body=ANY_TO_ANY)
    text, images, usage = "", [], None
    for chunk in llm.stream("Draw a fox."):
        text += chunk.content
        images += chunk.additional_kwargs.get("images", []) if chunk.additional_kwargs else []
        usage = chunk.usage_metadata or usage
    assert "<h>" in text and usage and usage["output_tokens"] > 0
    if not images:  # this langchain-openai drops unknown delta keys: the raw client under it must still see them
        raw = llm.root_client.chat.completions.create(model=ALIAS, messages=[{"role": "user", "content": "Draw."}],
                                                      stream=True, max_tokens=30, extra_body=ANY_TO_ANY)
        for c in raw:
            for choice in c.choices:
                images += (choice.delta.model_extra or {}).get("images") or []
    assert images and images[0]["image_url"]["url"].startswith("data:image/png;base64,")


# --- LiteLLM -----------------------------------------------------------------------------------------------------

def test_litellm_two_system_messages(base: str):
    r = _litellm(base, messages=TWO_SYSTEMS, max_tokens=4)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 4


def test_litellm_named_tool_choice(base: str):
    r = _litellm(base, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER],
                 tool_choice={"type": "function", "function": {"name": "weather"}}, max_tokens=40)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "weather" and set(json.loads(call.function.arguments)) == {"city"}
    assert r.choices[0].finish_reason == "tool_calls"


def test_litellm_any_to_any_stream_brings_the_image(base: str):
    chunks = list(_litellm(base, messages=[{"role": "user", "content": "Draw a fox."}], stream=True, max_tokens=30,
                           stream_options={"include_usage": True}, extra_body=ANY_TO_ANY))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    images = [img for c in chunks if c.choices for img in (getattr(c.choices[0].delta, "images", None) or [])]
    assert "<h>" in text
    assert images, [c.choices[0].delta for c in chunks if c.choices]
    first = images[0] if isinstance(images[0], dict) else images[0].model_dump()
    assert first["image_url"]["url"].startswith("data:image/png;base64,")
