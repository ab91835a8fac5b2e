"""Property-based fuzzing of a live gateway from its own OpenAPI document (schemathesis, pinned in the dev extra).

Against a real gateway on loopback in front of the session's tiny engine and one tiny SDXL worker, with an API key:

* **positive** examples (requests the schema allows) for every operation (chat, completions, responses and its
  stored-response routes, images, models, files, health), from a copy of the document with small caps so that
  valid requests stay fast (max_tokens ≤ 4, n ≤ 2, one user turn, one 64x64 image with ≤ 2 steps);
* **negative** examples (requests the schema forbids) for every POST route, from the document as served;

checked for: no 5xx, the status is one the document lists, the content type and body match the document, and
(negative) the request is refused with a 4xx. Budget: ``MGM_FUZZ_EXAMPLES`` examples per operation and mode
(default 25), derandomized so a run is reproducible."""

from __future__ import annotations

import copy
import os
from typing import Any

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from server.gateway.config import GatewayConfig  # noqa: E402

KEY = "sk-fuzz"
EXAMPLES = int(os.environ.get("MGM_FUZZ_EXAMPLES", "25"))
POSTS = {("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/v1/responses"),
         ("POST", "/v1/images/generations"), ("POST", "/v1/images/edits")}
OPERATIONS = POSTS | {
    ("GET", "/v1/models"), ("GET", "/v1/models/{model_id}"), ("GET", "/health"), ("GET", "/ready"),
    ("GET", "/metrics"), ("GET", "/v1/files/images/{image_id}"), ("GET", "/v1/responses/{response_id}"),
    ("DELETE", "/v1/responses/{response_id}"), ("GET", "/v1/responses/{response_id}/input_items"),
    ("POST", "/v1/embeddings")}
NEGATIVE = POSTS
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def fuzz_gateway(engine, sdxl_workers, gateway_server):  # type: ignore[no-untyped-def]
    config = GatewayConfig(engines=(engine[0],), api_keys=(KEY,), sdxl_workers=(sdxl_workers[0].url,),
                           image_model_name="sdxl-tiny", image_default_size="64x64", enhance_max_tokens=4,
                           probe_interval_s=0.5)
    with gateway_server(config) as base:
        yield base


def _capped(doc: dict[str, Any], chat_model: str) -> dict[str, Any]:
    """The fuzzer's copy of the document for positive examples: same shapes, small numbers, existing models."""
    doc = copy.deepcopy(doc)
    schemas = doc["components"]["schemas"]
    chat = schemas["ChatCompletionRequest"]["properties"]
    chat["model"] = {"const": chat_model}
    # One user turn (the chat template wants user/assistant turns alternating) with non-null content; the cross-field
    # rules (top_logprobs needs logprobs, stream_options needs stream) are the bad-input table's business.
    chat["messages"]["maxItems"] = 1
    chat["top_logprobs"] = chat["stream_options"] = {"type": "null"}
    message = schemas["Message"]
    message["properties"]["role"] = {"const": "user"}
    message["properties"]["content"]["anyOf"] = [o for o in message["properties"]["content"]["anyOf"]
                                                 if o.get("type") != "null"]
    message["required"] = sorted({*message.get("required", []), "content"})
    schemas["ImageGenerationRequest"]["properties"]["model"] = {"enum": ["sdxl-tiny", None]}

    def cap(model: str, field: str, maximum: int) -> None:
        prop = schemas[model]["properties"][field]
        for option in prop.get("anyOf", [prop]):
            if option.get("type") == "integer":
                option["maximum"] = maximum

    for field, maximum in (("max_tokens", 4), ("max_completion_tokens", 4), ("n", 2)):
        cap("ChatCompletionRequest", field, maximum)
    # /v1/completions: the same small numbers, our model, at most 2 prompts
    completion = schemas["CompletionRequest"]["properties"]
    completion["model"] = {"const": chat_model}
    completion["stream_options"] = {"type": "null"}
    for option in completion["prompt"]["anyOf"]:
        if option.get("type") == "array":
            option["maxItems"] = 2
    for field, maximum in (("max_tokens", 4), ("n", 2)):
        cap("CompletionRequest", field, maximum)
    # /v1/responses: our model, one user message, no tools and no structured output (its grammar, as above)
    responses = schemas["ResponsesRequest"]["properties"]
    responses["model"] = {"const": chat_model}
    responses["input"]["anyOf"][1]["maxItems"] = 1
    responses["text"] = responses["tools"] = responses["tool_choice"] = {"type": "null"}
    schemas["InputMessage"]["properties"]["role"] = {"const": "user"}
    cap("ResponsesRequest", "max_output_tokens", 4)
    for field, maximum in (("n", 1), ("num_inference_steps", 2)):
        cap("ImageGenerationRequest", field, maximum)
    images = schemas["ImageGenerationRequest"]
    images["required"] = sorted({*images.get("required", []), "num_inference_steps"})  # quality=hd is 50 steps
    images["properties"]["size"] = {"enum": ["64x64", "64x128", "auto", "100x100"]}
    # A random JSON schema for structured output can make the engine compile a huge grammar: keep it simple.
    schemas["ResponseFormat"]["properties"]["json_schema"] = {"type": "null"}
    return doc


def _run(doc: dict[str, Any], base: str, mode: GenerationMode, wanted: set[tuple[str, str]],
         checks: list[Any]) -> dict[str, dict[int, int]]:
    """Fuzz every operation in ``wanted``; returns, per operation, how many responses had each status."""
    schema = schemathesis.openapi.from_dict(doc)
    seen: dict[str, dict[int, int]] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        if (operation.method.upper(), operation.path) not in wanted:
            continue
        counts = seen.setdefault(f"{operation.method.upper()} {operation.path}", {})

        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def fuzz(case: Any) -> None:
            response = case.call_and_validate(base_url=base, headers={"Authorization": f"Bearer {KEY}"},
                                              checks=checks, timeout=120)
            counts[response.status_code] = counts.get(response.status_code, 0) + 1

        fuzz()
    return seen


def test_positive_examples_from_the_openapi_document(fuzz_gateway, engine):
    doc = httpx.get(fuzz_gateway + "/openapi.json", timeout=10).json()
    seen = _run(_capped(doc, engine[1]), fuzz_gateway, GenerationMode.POSITIVE, OPERATIONS, CHECKS)
    print("positive:", seen)
    assert len(seen) == len(OPERATIONS)
    # valid requests really reached the engine and the SDXL worker
    assert seen["POST /v1/chat/completions"].get(200, 0) >= 5 and seen["POST /v1/images/generations"].get(200, 0) >= 1
    assert seen["POST /v1/completions"].get(200, 0) >= 5 and seen["POST /v1/responses"].get(200, 0) >= 5
    assert httpx.get(fuzz_gateway + "/ready", timeout=10).status_code == 200  # still serving


def test_negative_examples_are_refused_with_4xx(fuzz_gateway):
    doc = httpx.get(fuzz_gateway + "/openapi.json", timeout=10).json()
    seen = _run(doc, fuzz_gateway, GenerationMode.NEGATIVE, NEGATIVE, CHECKS + [negative_data_rejection])
    print("negative:", seen)
    assert len(seen) == len(NEGATIVE) and all(sum(counts.values()) >= 5 for counts in seen.values())
    assert httpx.get(fuzz_gateway + "/ready", timeout=10).status_code == 200
