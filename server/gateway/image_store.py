"""Generated images behind ``response_format="url"``: kept in the configured blob store (:mod:`server.store`:
``memory://`` for one replica, ``file://`` or ``redis://`` shared by all) for ``image_store_ttl_s`` (1 h by default,
like OpenAI's URLs) and served at ``GET /v1/files/images/{id}``. The id is a random 192-bit token, so the URL itself
is the credential (no ``Authorization`` needed, e.g. for ``<img src>``); an unknown or expired id is 404. When the
store cannot be reached, what needs it is a 503 with ``retry-after`` and everything else is served as usual."""

from __future__ import annotations

import base64
import logging
import secrets
from typing import Any

from server.errors import APIError
from server.store import Blob, BlobStore, StoreUnavailable

logger = logging.getLogger("mgm.gateway")

#: Where stored images are served (``GET {FILES_PATH}/{id}``).
FILES_PATH = "/v1/files/images"
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


class ImageFiles:
    """The gateway's images in a :class:`~server.store.BlobStore` (ids ``img_<token>``)."""

    def __init__(self, store: BlobStore, ttl_s: float, retry_after_s: int) -> None:
        self.store, self.ttl_s, self.retry_after_s = store, ttl_s, retry_after_s

    def _unavailable(self, exc: StoreUnavailable, action: str) -> APIError:
        logger.warning("image store unavailable", extra={"fields": {"action": action, "error": str(exc)}})
        return APIError(503, "The image store is unavailable right now; retry later, or ask for "
                        "response_format='b64_json'.", code="image_store_unavailable",
                        headers={"retry-after": str(self.retry_after_s)})

    async def check(self) -> None:
        """503 before any work is spent when the store is down (a request that will need it)."""
        try:
            await self.store.check()
        except StoreUnavailable as exc:
            raise self._unavailable(exc, "check") from None

    async def put(self, data: bytes, output_format: str) -> str:
        key = "img_" + secrets.token_urlsafe(24)
        try:
            await self.store.put(key, Blob(data, MEDIA_TYPES.get(output_format, "image/png")), self.ttl_s)
        except StoreUnavailable as exc:
            raise self._unavailable(exc, "put") from None
        return key

    async def get(self, key: str) -> Blob | None:
        try:
            return await self.store.get(key)
        except StoreUnavailable as exc:
            raise self._unavailable(exc, "get") from None

    async def entry(self, item: dict[str, Any], response_format: str, output_format: str,
                    base_url: str) -> dict[str, Any]:
        """A worker data item as ``{"b64_json"}`` or ``{"url"}`` (stored; ``base_url`` ends with ``/``)."""
        if response_format == "b64_json":
            return {"b64_json": item["b64_json"]}
        key = await self.put(base64.b64decode(item["b64_json"]), output_format)
        return {"url": f"{base_url}{FILES_PATH[1:]}/{key}"}

    async def close(self) -> None:
        await self.store.close()
