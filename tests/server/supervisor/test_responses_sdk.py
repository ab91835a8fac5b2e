"""The Responses API through the official Python SDK, unchanged, against the shared ``mgm serve`` stack (tiny MGM
engine, tiny SDXL worker, gateway as real processes) and two more gateway replicas sharing one Redis: a response
with an input image, the streamed event sequence, ``previous_response_id`` answered by another replica, the forced
``image_generation`` tool with streamed partial images and a multi-turn edit, retrieve / input_items / delete, and
the errors a client gets for what this server does not run."""

from __future__ import annotations

import base64
import io

import openai
import pytest
from PIL import Image
from support.node_sdk import run_node
from support.serve_live import ALIAS, API_KEY, Serve

#: The tool as the tests ask for it: small, few steps ("low" quality), two previews when streamed.
TOOL = {"type": "image_generation", "size": "64x64", "quality": "low", "partial_images": 2}
TEXT_EVENTS = ["response.created", "response.in_progress", "response.output_item.added",
               "response.content_part.added"]
DONE_EVENTS = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]


def _png(color: tuple[int, int, int] = (200, 40, 40), size: tuple[int, int] = (48, 32)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=API_KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def client(serve_stack: Serve) -> openai.OpenAI:
    return _client(serve_stack.base)  # type: ignore[attr-defined]


def test_create_with_an_input_image(client: openai.OpenAI):
    r = client.responses.create(model=ALIAS, instructions="Answer briefly.", max_output_tokens=8, input=[
        {"role": "user", "content": [{"type": "input_image", "image_url": _png()},
                                     {"type": "input_text", "text": "What is in this picture?"}]}])
    assert r.id.startswith("resp_") and r.object == "response" and r.model == ALIAS
    assert r.status in ("completed", "incomplete") and r.output[0].type == "message"
    assert r.output_text == r.output[0].content[0].text  # (random weights may decode to nothing visible)
    assert r.usage.input_tokens > 0 and 0 < r.usage.output_tokens <= 8
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens"


def test_stream_follows_the_event_sequence(client: openai.OpenAI):
    with client.responses.stream(model=ALIAS, input="Tell me a story.", max_output_tokens=6) as stream:
        events = list(stream)
    # The tiny model never stops by itself: the token limit ends it, so the last event is response.incomplete (the
    # SDK's get_final_response() waits for response.completed only; the final object rides on the last event).
    final = events[-1].response
    kinds = [e.type for e in events]
    assert kinds[:4] == TEXT_EVENTS and kinds[-4:-1] == DONE_EVENTS and kinds[-1] == "response.incomplete"
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert set(kinds[4:-4]) <= {"response.output_text.delta"}  # only deltas between the opening and closing events
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(d.delta for d in deltas) == final.output_text == events[-4].text
    assert final.id == events[0].response.id and final.usage.output_tokens == 6
    assert final.status == "incomplete" and final.incomplete_details.reason == "max_output_tokens"


def test_previous_response_id_is_answered_by_another_replica(replicas):
    _redis, (a, b) = replicas
    first = _client(a).responses.create(model=ALIAS, input="My name is Ada.", max_output_tokens=4)
    second = _client(b).responses.create(model=ALIAS, input="What is my name?", max_output_tokens=4,
                                         previous_response_id=first.id)
    assert second.previous_response_id == first.id
    items = _client(b).responses.input_items.list(second.id)
    assert [i.content[0].text for i in items.data] == ["What is my name?"]
    # the conversation really reached the engine: the second prompt is longer than the first by the first turn
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert _client(a).responses.retrieve(second.id).id == second.id


def test_forced_image_tool_streams_partial_images_then_edits_the_image(client: openai.OpenAI):
    with client.responses.stream(model=ALIAS, input="Draw a red fox in the snow.", max_output_tokens=8,
                                 tools=[TOOL], tool_choice={"type": "image_generation"}) as stream:
        events = list(stream)
    final = events[-1].response  # response.completed, or response.incomplete at the token limit
    kinds = [e.type for e in events]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    image_kinds = [k for k in kinds if k.startswith("response.image_generation_call")]
    assert image_kinds == ["response.image_generation_call.in_progress", "response.image_generation_call.generating",
                           *["response.image_generation_call.partial_image"] * 2,
                           "response.image_generation_call.completed"]
    partials = [e for e in events if e.type == "response.image_generation_call.partial_image"]
    assert [p.partial_image_index for p in partials] == [0, 1]
    call = final.output[1]
    assert call.type == "image_generation_call" and call.status == "completed"
    with Image.open(io.BytesIO(base64.b64decode(call.result))) as image:
        assert image.size == (64, 64)
    # MGM's caption, or (forced, no caption) the user's words
    assert call.to_dict()["revised_prompt"] and call.to_dict()["size"] == "64x64"
    # a follow-up turn draws from the last image (img2img): another image of the same size
    edit = client.responses.create(model=ALIAS, input="Now make it night.", max_output_tokens=8, tools=[TOOL],
                                   tool_choice="required", previous_response_id=final.id)
    (after,) = [o for o in edit.output if o.type == "image_generation_call"]
    assert after.result != call.result
    with Image.open(io.BytesIO(base64.b64decode(after.result))) as image:
        assert image.size == (64, 64)


def test_tool_choice_none_never_draws(client: openai.OpenAI):
    r = client.responses.create(model=ALIAS, input="Draw a cat.", max_output_tokens=4, tools=[TOOL],
                                tool_choice="none")
    assert [o.type for o in r.output] == ["message"]


def test_retrieve_input_items_and_delete(client: openai.OpenAI):
    r = client.responses.create(model=ALIAS, input=[{"role": "user", "content": "one"},
                                                    {"role": "user", "content": "two"}], max_output_tokens=2)
    assert client.responses.retrieve(r.id).output_text == r.output_text
    assert [i.content[0].text for i in client.responses.input_items.list(r.id).data] == ["one", "two"]
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.retrieve(r.id)
    assert err.value.body["param"] == "response_id"  # type: ignore[index]
    unstored = client.responses.create(model=ALIAS, input="x", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


@pytest.mark.parametrize("kwargs,status,param", [
    ({"previous_response_id": "resp_unknown"}, 404, "previous_response_id"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, 400, "tools[0].type"),
    ({"tools": [{"type": "web_search"}]}, 400, "tools[0].type"),
    ({"max_output_tokens": 0}, 400, "max_output_tokens"),
    ({"background": True}, 400, "background"),
    ({"tool_choice": {"type": "image_generation"}}, 400, "tool_choice"),
])
def test_what_this_server_does_not_run_is_a_clear_error(client: openai.OpenAI, kwargs, status, param):
    with pytest.raises(openai.APIStatusError) as err:
        client.responses.create(model=ALIAS, input="hi", **{"max_output_tokens": 2, **kwargs})
    assert err.value.status_code == status and err.value.body["param"] == param  # type: ignore[index]


def test_model_retrieve_request_ids_and_no_embeddings(client: openai.OpenAI):
    assert client.models.retrieve(ALIAS).id == ALIAS
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-nope")
    r = client.responses.create(model=ALIAS, input="hi", max_output_tokens=2)
    assert r._request_id and r._request_id.startswith("gw-")  # the SDK reads x-request-id
    mine = client.with_options(default_headers={"x-request-id": "trace-7"}).responses.create(
        model=ALIAS, input="hi", max_output_tokens=2)
    assert mine._request_id == "trace-7"
    with pytest.raises(openai.NotFoundError) as err:
        client.embeddings.create(model="text-embedding-3-small", input="hi")
    assert "no embedding model" in err.value.body["message"]  # type: ignore[index]


def test_legacy_completions_start_with_the_official_bos(client: openai.OpenAI, tiny_models):
    from transformers import AutoTokenizer

    bos = AutoTokenizer.from_pretrained(tiny_models[0]).bos_token_id
    r = client.completions.create(model=ALIAS, prompt="Once upon a time", max_tokens=4,
                                  extra_body={"return_token_ids": True})
    assert isinstance(r.choices[0].text, str) and r.usage.completion_tokens == 4
    assert r.choices[0].model_extra["prompt_token_ids"][0] == bos  # type: ignore[index]
    chunks = list(client.completions.create(model=ALIAS, prompt="Hi", max_tokens=3, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 3 and any(c.choices for c in chunks)


def test_the_node_sdk(replicas, tmp_path):
    _redis, (a, b) = replicas
    image = tmp_path / "a.png"
    image.write_bytes(base64.b64decode(_png().split(",", 1)[1]))
    out = run_node("responses.mjs", a + "/v1", b + "/v1", API_KEY, ALIAS, str(image))
    assert out["create"]["id"].startswith("resp_") and isinstance(out["create"]["text"], str)
    assert out["create"]["request_id"].startswith("gw-") and out["create"]["usage"]["output_tokens"] <= 6
    kinds = [e["type"] for e in out["stream"]]
    assert kinds[:4] == TEXT_EVENTS and kinds[-4:-1] == DONE_EVENTS and kinds[-1] == "response.incomplete"
    assert [e["seq"] for e in out["stream"]] == list(range(len(kinds)))
    assert out["follow_up"]["previous"] == out["create"]["id"]
    assert "response.image_generation_call.partial_image" in out["tool"]["events"]
    assert out["tool"]["result_magic"] == "89504e47" and out["tool"]["revised_prompt"]
    assert out["retrieved"] == out["create"]["id"] and out["after_delete"] == 404
    assert out["input_items"] == [["input_image", "input_text"]]
    # random weights may decode 3 tokens to nothing visible: the count is what is certain
    assert isinstance(out["completion"]["text"], str) and out["completion"]["tokens"] == 3 and out["model"] == ALIAS


def test_a_named_tool_choice_through_the_real_engine_is_valid_json(client: openai.OpenAI):
    """The real engine honours the structured output the gateway asks for: even random weights produce arguments
    that parse and follow the function's schema."""
    import json

    tool = {"type": "function", "function": {"name": "weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
        "additionalProperties": False}}}
    r = client.chat.completions.create(model=ALIAS, messages=[{"role": "user", "content": "Weather in Paris?"}],
                                       tools=[tool], tool_choice={"type": "function", "function": {"name": "weather"}},
                                       max_tokens=40)
    (call,) = r.choices[0].message.tool_calls
    args = json.loads(call.function.arguments)
    assert call.function.name == "weather" and set(args) == {"city"} and isinstance(args["city"], str)
