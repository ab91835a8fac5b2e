"""The blob store interface and the one value encoding the shared backends use (metadata header + bytes)."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Protocol

#: Keys are opaque tokens chosen by the caller (e.g. ``img_<random>``): never paths, never user text.
_KEY = re.compile(r"[A-Za-z0-9_-]{1,200}")


def valid_key(key: str) -> bool:
    return bool(_KEY.fullmatch(key))


class StoreUnavailable(Exception):
    """The backend cannot be reached or failed; the message is for logs (it may name the host)."""


@dataclass(frozen=True)
class Blob:
    data: bytes
    media_type: str = "application/octet-stream"
    metadata: dict[str, str] = field(default_factory=dict)


class BlobStore(Protocol):
    #: ``memory``, ``file`` or ``redis``; ``shared``: other processes see what this one puts.
    kind: str
    shared: bool

    async def put(self, key: str, blob: Blob, ttl_s: float) -> None: ...

    async def get(self, key: str) -> Blob | None:
        """The blob, or None when the key is unknown, expired or not a valid key."""

    async def delete(self, key: str) -> bool: ...

    async def check(self) -> None:
        """Raise :class:`StoreUnavailable` when the backend cannot serve now (a cheap round trip)."""

    async def close(self) -> None: ...


def encode(blob: Blob, expires_at: float) -> bytes:
    """One record: a JSON header line (type, metadata, unix expiry), then the bytes."""
    header = {"media_type": blob.media_type, "metadata": blob.metadata, "expires_at": expires_at}
    return json.dumps(header, separators=(",", ":")).encode() + b"\n" + blob.data


def decode(record: bytes, now: float | None = None) -> Blob | None:
    """The blob in ``record``; None when it has expired or is not a record of ours."""
    head, sep, data = record.partition(b"\n")
    try:
        header = json.loads(head) if sep else None
    except ValueError:
        header = None
    if not isinstance(header, dict):
        return None
    if float(header.get("expires_at", 0)) <= (time.time() if now is None else now):
        return None
    return Blob(data, str(header.get("media_type", "application/octet-stream")), dict(header.get("metadata") or {}))
