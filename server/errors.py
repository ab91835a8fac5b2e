"""Errors in the OpenAI shape ``{"error": {"message", "type", "param", "code"}}`` for every failure path of the
gateway and of the SDXL worker (docs/api.md, "Errors")."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("mgm.errors")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error"}


class APIError(StarletteHTTPException):
    """Raised anywhere in a handler (or in a middleware's ``receive``); rendered as an OpenAI error response.

    It is an HTTPException so that FastAPI passes it through unchanged when it surfaces while the body is read (the
    body cap raises it there) instead of turning it into a generic 400."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 type_: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(status, message, headers)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.type = type_ or _TYPES.get(status, "server_error")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def __str__(self) -> str:
        return self.message


_UNION_LABELS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _param(loc: Any) -> str | None:
    """pydantic's error location as an OpenAI ``param``: ``messages[0].content[1].image_url.url``. Drops ``body``,
    union member labels (``str``, ``list[...]``) and the repeated tag of a tagged union."""
    out = ""
    prev: Any = None
    for part in loc:
        if part == "body" or (isinstance(part, str) and ("[" in part or part in _UNION_LABELS)) or part == prev:
            prev = part
            continue
        prev = part
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def validation_error(exc: RequestValidationError | list[Any]) -> APIError:
    """The first validation error (FastAPI's or a pydantic ``ValidationError.errors()`` list) as a 400."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else exc
    # A union reports one error per member: the deepest one is the informative one, and at equal depth a wrong value
    # (a list too long) says more than a wrong type (it is not a string either).
    err = dict(max(errors, key=lambda e: (len(e.get("loc", ())), not str(e.get("type", "")).endswith("_type")))
               ) if errors else {}
    kind = str(err.get("type", ""))
    param = _param(err.get("loc", ()))
    if kind == "json_invalid" or (kind == "missing" and param is None):  # malformed or empty body
        return APIError(400, "We could not parse the JSON body of your request.", code="invalid_json")
    if param is None and isinstance(err.get("input"), (bytes, bytearray)):  # FastAPI read it as non-JSON
        return APIError(400, "The request body must be JSON, sent with Content-Type: application/json.",
                        code="invalid_body")
    if param is None and kind in ("model_type", "dict_type", "model_attributes_type"):
        return APIError(400, "The request body must be a JSON object.", code="invalid_body")
    if param is None:
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        return APIError(400, f"Invalid request: {msg}.", code="invalid_value")
    if kind == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    if kind == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: '{param}'.", param=param,
                        code="unknown_parameter")
    if kind.endswith("_type") or kind.endswith("_parsing") or kind.startswith("union_tag"):
        return APIError(400, f"Invalid type for '{param}': {err.get('msg', '')}.", param=param, code="invalid_type")
    msg = str(err.get("msg", "")).removeprefix("Value error, ")
    return APIError(400, f"Invalid value for '{param}': {msg}.", param=param, code="invalid_value")


#: The ``type`` values of OpenAI errors; anything else an upstream sends (vLLM: ``BadRequestError``) is replaced.
OPENAI_TYPES = frozenset({"invalid_request_error", "authentication_error", "permission_error", "not_found_error",
                          "rate_limit_error", "server_error"})


def normalize_upstream(status: int, payload: Any, request_id: str | None = None, upstream: str = "engine") -> APIError:
    """An engine's error body (vLLM puts the HTTP status int in ``code`` and its exception name in ``type``) as our
    error in the OpenAI shape. A 5xx's text is the upstream's internals (exception text, paths): it is logged with
    ``request_id`` and the client gets a generic message naming that id instead."""
    err = payload.get("error") if isinstance(payload, dict) else None
    if status >= 500:
        detail = err.get("message") if isinstance(err, dict) else None
        code = err.get("code") if isinstance(err, dict) and isinstance(err.get("code"), str) else None
        logger.warning(f"{upstream} answered {status}", extra={"fields": {
            "request_id": request_id, "status": status, "code": code, "detail": str(detail)[:2000]}})
        where = f" (request {request_id})" if request_id else ""
        return APIError(status, f"The {upstream} failed to answer this request{where}; see the server logs.",
                        type_="server_error", code=code or f"{upstream.replace(' ', '_')}_error")
    if isinstance(err, dict):
        message = str(err.get("message") or "engine error")
        code = err.get("code") if isinstance(err.get("code"), str) else None
        param = err.get("param") if isinstance(err.get("param"), str) else None
        if code is None and "maximum context length" in message:
            code, param = "context_length_exceeded", "messages"  # what OpenAI answers for a prompt over the context
        elif code is None and status == 400 and param:
            code = "invalid_value"
        elif code is None and status == 400 and ("template" in message.lower() or "roles must" in message.lower()):
            code, param = "invalid_messages", "messages"  # the chat template refused the conversation
        kind = str(err.get("type") or "")
        return APIError(status, message, code=code, param=param, type_=kind if kind in OPENAI_TYPES else None)
    return APIError(status, f"engine returned HTTP {status}", code="engine_error")


#: What FastAPI raises when reading or decoding a body fails other than as a JSON syntax error.
_FASTAPI_BODY_ERROR = "There was an error parsing the body"


def install(app: Any, on_validation_error: Callable[[], None] = lambda: None) -> None:
    """Exception handlers: our APIError, FastAPI validation errors (``on_validation_error`` hears each), 404/405 and
    any other HTTP exception, and a last-resort 500 that never shows internals."""

    @app.exception_handler(APIError)
    async def _api(_request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        on_validation_error()
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == _FASTAPI_BODY_ERROR:
            if isinstance(exc.__cause__, ClientDisconnect):  # the client hung up mid-upload: not our failure
                return APIError(499, "The client closed the request.", code="client_closed").response()
            # e.g. JSON nested too deep to parse
            return APIError(400, "We could not parse the JSON body of your request.", code="invalid_json").response()
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, str(exc.detail), code=code,
                        headers=dict(exc.headers) if exc.headers else None).response()

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error", exc_info=exc)
        return APIError(500, "The server hit an internal error.", type_="server_error", code="internal_error").response()
