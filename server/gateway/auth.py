"""Optional Bearer API keys on the API routes (keys are compared in constant time and never logged).

Routers declare :data:`require_api_key` as a dependency (it also puts the bearer scheme into the OpenAPI document).
Admission (:mod:`server.gateway.middleware`) runs before FastAPI reads a body and must not hand capacity to callers
without a key, so it asks the same :class:`APIKeys` first.
"""

from __future__ import annotations

import hmac

from fastapi import Depends, Request
from fastapi.security import HTTPBearer

from server.errors import APIError


class APIKeys:
    def __init__(self, keys: tuple[str, ...]) -> None:
        self._keys = tuple(k.encode() for k in keys)

    def check(self, authorization: str | None) -> None:
        """Raise 401 unless no keys are configured or ``authorization`` is ``Bearer <one of the keys>``."""
        if not self._keys:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "You didn't provide an API key. Provide it in the Authorization header "
                           "(Authorization: Bearer YOUR_KEY).", code="missing_api_key")
        given = token.strip().encode()
        ok = False
        for key in self._keys:  # no early exit: timing does not tell which key matched
            ok |= hmac.compare_digest(given, key)
        if not ok:
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")


#: Documents the scheme only; the check below decides (HTTPBearer's own 403 is not the OpenAI answer).
_bearer = HTTPBearer(auto_error=False, scheme_name="bearer")


def _require(request: Request, _credentials: object = Depends(_bearer)) -> None:
    request.app.state.gateway.api_keys.check(request.headers.get("authorization"))


require_api_key = Depends(_require)
