"""The gateway's OpenAPI document (``GET /openapi.json``).

The POST handlers read and validate their bodies themselves (body cap, OpenAI error shapes), so FastAPI cannot infer
their schemas: this module declares them from the same pydantic models the handlers validate with, and lists every
status each route can answer with its body schema (errors: the OpenAI shape). The property-based fuzz test
(tests/gateway/reliability/test_reliability_fuzz.py) generates requests from this document and checks every response
against it.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from server.gateway.generation import ImageGenerationRequest
from server.gateway.schemas import ChatCompletionRequest

_REF = "#/components/schemas/{model}"
_ERROR = {"$ref": "#/components/schemas/ErrorResponse"}

_SCHEMAS: dict[str, Any] = {
    "ErrorResponse": {
        "type": "object", "required": ["error"],
        "properties": {"error": {
            "type": "object", "required": ["message", "type", "param", "code"],
            "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                           "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}},
    "ChatCompletion": {
        "type": "object", "required": ["id", "object", "created", "model", "choices"],
        "properties": {
            "id": {"type": "string"}, "object": {"const": "chat.completion"}, "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {"type": "array", "items": {
                "type": "object", "required": ["index", "message", "finish_reason"],
                "properties": {"index": {"type": "integer"}, "finish_reason": {"type": ["string", "null"]},
                               "message": {"type": "object", "required": ["role"], "properties": {
                                   "role": {"const": "assistant"}, "content": {"type": ["string", "null"]},
                                   "images": {"type": "array"}}}}}},
            "usage": {"type": ["object", "null"]}}},
    # One event of a chat stream: data is a chat.completion.chunk (JSON) or [DONE]; event "error" ends a failed one.
    "ServerSentEvent": {
        "type": "object", "required": ["data"],
        "properties": {"data": {"type": "string", "anyOf": [{"const": "[DONE]"}, {"pattern": "^\\{"}]},
                       "event": {"enum": ["message", "error"]}}},
    "ImagesResponse": {
        "type": "object", "required": ["created", "data"],
        "properties": {"created": {"type": "integer"}, "size": {"type": "string"},
                       "prompt_enhancement": {"enum": ["enhanced", "no_caption", "disabled"]},
                       "data": {"type": "array", "items": {"type": "object", "properties": {
                           "url": {"type": "string"}, "b64_json": {"type": "string"},
                           "revised_prompt": {"type": "string"}}}}}},
    "ModelList": {
        "type": "object", "required": ["object", "data"],
        "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": {
            "type": "object", "required": ["id", "object"],
            "properties": {"id": {"type": "string"}, "object": {"const": "model"}}}}}},
}

_DESCRIPTIONS = {200: "OK", 400: "Invalid request", 401: "Missing or wrong API key", 404: "Unknown model or id",
                 413: "Body or image over its cap", 429: "Queue full (see retry-after)",
                 502: "Engine or worker failed", 503: "No engine or worker available, or no capacity in time "
                 "(see retry-after)", 504: "Engine or worker timed out"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): {"description": _DESCRIPTIONS[s], **_json(_ERROR)} for s in statuses}


def _body(model: type, name: str, components: dict[str, Any]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template=_REF)  # type: ignore[attr-defined]
    components.update(schema.pop("$defs", {}))
    components[name] = schema
    return {"required": True, **_json({"$ref": f"#/components/schemas/{name}"})}


def build(app: FastAPI) -> dict[str, Any]:
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components: dict[str, Any] = dict(_SCHEMAS)
    bearer = [{"bearer": []}]
    ops: dict[tuple[str, str], dict[str, Any]] = {
        ("/v1/chat/completions", "post"): {
            "summary": "Chat completion (OpenAI)", "security": bearer,
            "requestBody": _body(ChatCompletionRequest, "ChatCompletionRequest", components),
            "responses": {"200": {"description": "The completion, or an SSE stream when stream is true", "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletion"}},
                "text/event-stream": {"schema": {"$ref": "#/components/schemas/ServerSentEvent"}}}},
                **_errors(400, 401, 404, 413, 429, 502, 503, 504)}},
        ("/v1/images/generations", "post"): {
            "summary": "Image generation (OpenAI)", "security": bearer,
            "requestBody": _body(ImageGenerationRequest, "ImageGenerationRequest", components),
            "responses": {"200": {"description": "The images", **_json({"$ref": "#/components/schemas/"
                                                                                 "ImagesResponse"})},
                          **_errors(400, 401, 404, 413, 429, 502, 503, 504)}},
        ("/v1/models", "get"): {
            "summary": "Models", "security": bearer,
            "responses": {"200": {"description": "The models", **_json({"$ref": "#/components/schemas/ModelList"})},
                          **_errors(401)}},
        ("/health", "get"): {"summary": "Liveness", "responses": {"200": {"description": "Alive", **_json({
            "type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}})}}},
        ("/ready", "get"): {"summary": "Readiness (engines and workers)", "responses": {
            "200": {"description": "Ready", **_json({"type": "object", "required": ["status", "engines"]})},
            "503": {"description": "Not ready", **_json({"type": "object", "required": ["error", "engines"]})}}},
        ("/metrics", "get"): {"summary": "Prometheus metrics", "responses": {
            "200": {"description": "Metrics", "content": {"text/plain": {"schema": {"type": "string"}}}}}},
        ("/v1/files/images/{image_id}", "get"): {"summary": "A generated image (response_format=url)", "responses": {
            "200": {"description": "PNG", "content": {"image/png": {"schema": {"type": "string",
                                                                             "format": "binary"}}}},
            **_errors(404)}},
    }
    for (path, method), spec in ops.items():
        op = doc.get("paths", {}).get(path, {}).get(method)
        if op is None:
            continue
        op.update(spec)
        if "security" not in spec:
            op.pop("security", None)
    doc.setdefault("components", {}).setdefault("schemas", {}).update(components)
    doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return doc


def install(app: FastAPI) -> None:
    """Serve :func:`build`'s document (built once, on first request) at the app's ``openapi_url``."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
