"""Response declarations for the routers' OpenAPI entries: every status a route can answer, each with its body
schema (errors: the OpenAI shape). The document itself is FastAPI's, built from the routes and their request models;
the property-based fuzz test (tests/server/gateway/reliability/test_reliability_fuzz.py) generates requests from it and
checks every response against it."""

from __future__ import annotations

from typing import Any

from server.gateway.protocol import ErrorResponse

_DESCRIPTIONS = {400: "Invalid request", 401: "Missing or wrong API key", 404: "Unknown model or id",
                 413: "Body or image over its cap", 429: "Queue full (see retry-after)",
                 502: "Engine or worker failed", 503: "No engine or worker available, or no capacity in time "
                 "(see retry-after)", 504: "Engine or worker timed out"}

#: Every status a POST API route may answer besides 200.
API_ERRORS = (400, 401, 404, 413, 429, 502, 503, 504)


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAI-shaped error responses for ``statuses``. ``default`` covers the rest, and its presence keeps FastAPI
    from documenting a 422 this API never sends (validation errors are 400s)."""
    out: dict[int | str, dict[str, Any]] = {s: {"description": _DESCRIPTIONS[s], "model": ErrorResponse}
                                            for s in statuses}
    out["default"] = {"description": "Any other error", "model": ErrorResponse}
    return out


def ok(model: type | None, description: str, content: dict[str, dict[str, Any]] | None = None
       ) -> dict[int | str, dict[str, Any]]:
    """The 200 answer: ``model`` as JSON, and/or other media types (``content``: media type → schema)."""
    entry: dict[str, Any] = {"description": description}
    if model is not None:
        entry["model"] = model
    if content:
        entry["content"] = {media: {"schema": schema} for media, schema in content.items()}
    return {200: entry}
