"""``file:///path``: one file per key in a directory (a volume every replica mounts). Writes go to a temporary name
and are renamed into place, so a reader on another replica sees a whole record or none; expired records are dropped
when read and swept at most once a minute on writes."""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from pathlib import Path

from server.store.base import Blob, StoreUnavailable, decode, encode, valid_key

SWEEP_INTERVAL_S = 60.0


class FileStore:
    kind, shared = "file", True

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._last_sweep = 0.0

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.blob"

    def _write(self, key: str, record: bytes) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{key}.{secrets.token_hex(4)}.tmp"
        tmp.write_bytes(record)
        os.replace(tmp, self._path(key))

    def _read(self, key: str) -> Blob | None:
        path = self._path(key)
        try:
            record = path.read_bytes()
        except FileNotFoundError:
            return None
        blob = decode(record)
        if blob is None:
            path.unlink(missing_ok=True)
        return blob

    def _sweep(self) -> None:
        now = time.time()
        for path in self.root.glob("*.blob"):
            try:
                with path.open("rb") as f:
                    head = f.readline(4096)
                if decode(head + b"\n", now) is None:
                    path.unlink(missing_ok=True)
            except OSError:
                continue  # another replica removed it first

    async def put(self, key: str, blob: Blob, ttl_s: float) -> None:
        if not valid_key(key):
            raise ValueError(f"invalid store key {key!r}")
        record = encode(blob, time.time() + ttl_s)
        try:
            await asyncio.to_thread(self._write, key, record)
            if time.monotonic() - self._last_sweep > SWEEP_INTERVAL_S:
                self._last_sweep = time.monotonic()
                await asyncio.to_thread(self._sweep)
        except OSError as exc:
            raise StoreUnavailable(f"file store {self.root}: {exc}") from exc

    async def get(self, key: str) -> Blob | None:
        if not valid_key(key):
            return None
        try:
            return await asyncio.to_thread(self._read, key)
        except OSError as exc:
            raise StoreUnavailable(f"file store {self.root}: {exc}") from exc

    async def delete(self, key: str) -> bool:
        if not valid_key(key):
            return False
        try:
            path = self._path(key)
            existed = path.exists()
            path.unlink(missing_ok=True)
            return existed
        except OSError as exc:
            raise StoreUnavailable(f"file store {self.root}: {exc}") from exc

    async def check(self) -> None:
        try:
            await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)
            if not os.access(self.root, os.W_OK):
                raise StoreUnavailable(f"file store {self.root}: not writable")
        except OSError as exc:
            raise StoreUnavailable(f"file store {self.root}: {exc}") from exc

    async def close(self) -> None:
        return None
