"""Optional Bearer API keys on inference routes (keys are compared in constant time and never logged)."""

from __future__ import annotations

import hmac

from server.gateway.errors import APIError


def check_bearer(authorization: str | None, keys: tuple[str, ...]) -> None:
    """Raise 401 unless ``keys`` is empty or ``authorization`` is ``Bearer <one of keys>``."""
    if not keys:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(401, "You didn't provide an API key. Provide it in the Authorization header "
                       "(Authorization: Bearer YOUR_KEY).", code="missing_api_key")
    token = token.strip().encode()
    ok = False
    for key in keys:  # no early exit: timing does not tell which key matched
        ok |= hmac.compare_digest(token, key.encode())
    if not ok:
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
