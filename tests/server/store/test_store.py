"""The blob stores (server.store) against their contract: memory (bounded, expiring), file (a directory two
processes share) and Redis (a real redis-server), plus the URL checks and the record encoding."""

from __future__ import annotations

import asyncio
import time

import pytest
from support.redis_live import start_redis

from server.store import Blob, StoreUnavailable, check_store_url, open_store
from server.store.base import decode, encode
from server.store.memory import MemoryStore


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


@pytest.mark.parametrize("url,word", [("s3://bucket", "unknown scheme"), ("memcached://x", "unknown scheme"),
                                      ("file://relative/path", "absolute path"), ("redis://", "needs a host")])
def test_bad_store_urls_name_the_setting(url, word):
    with pytest.raises(ValueError, match="image_store") as info:
        check_store_url(url)
    assert word in str(info.value)


def test_records_round_trip_and_expire():
    blob = Blob(b"\x89PNG\r\n\x1a\n\x00\n", "image/png", {"route": "/v1/images/edits"})
    record = encode(blob, time.time() + 60)
    assert decode(record) == blob
    assert decode(record, now=time.time() + 61) is None
    assert decode(b"not a record") is None and decode(b"[1]\nxx") is None


def test_memory_store_is_bounded_and_expires(monkeypatch):
    async def scenario() -> None:
        store = MemoryStore(max_items=2, max_bytes=100)
        for key, data in (("a", b"a" * 10), ("b", b"b" * 10), ("c", b"c" * 10)):
            await store.put(key, Blob(data), 10)
        assert await store.get("a") is None and (await store.get("b")).data == b"b" * 10 and len(store) == 2
        await store.put("d", Blob(b"d" * 95), 10)
        assert await store.get("c") is None and await store.get("d") is not None  # the byte cap
        import server.store.memory as mem

        now = mem.time.monotonic()
        monkeypatch.setattr(mem.time, "monotonic", lambda: now + 11)
        assert await store.get("d") is None and len(store) == 0
        assert await store.get("../etc/passwd") is None

    run(scenario())


async def _contract(url: str) -> None:
    """What every backend does: put/get/delete, metadata kept, TTL honoured, invalid keys never touch storage."""
    a = open_store(url, max_items=8, max_bytes=1 << 20, timeout_s=2.0)
    b = open_store(url, max_items=8, max_bytes=1 << 20, timeout_s=2.0)  # another replica
    try:
        await a.check()
        blob = Blob(b"\xff\xd8\xffjpeg bytes\n\nwith newlines", "image/jpeg", {"n": "1"})
        await a.put("img_abc-DEF_1", blob, 30)
        assert await b.get("img_abc-DEF_1") == blob
        assert await b.get("img_unknown") is None
        assert await b.delete("img_abc-DEF_1") is True and await a.get("img_abc-DEF_1") is None
        assert await a.delete("img_abc-DEF_1") is False
        await a.put("img_short", Blob(b"x"), 0.3)
        await asyncio.sleep(0.5)
        assert await b.get("img_short") is None
        for bad in ("../../etc/passwd", "a/b", "", "x" * 300):
            assert await b.get(bad) is None
            with pytest.raises(ValueError):
                await a.put(bad, blob, 30)
    finally:
        await a.close()
        await b.close()


def test_file_store_is_shared_through_its_directory(tmp_path):
    run(_contract(f"file://{tmp_path / 'images'}"))
    assert not [p for p in (tmp_path / "images").iterdir() if p.name.endswith(".tmp")]  # no half-written records


def test_file_store_on_an_unwritable_path_is_unavailable(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    store = open_store(f"file://{tmp_path / 'file' / 'images'}", max_items=1, max_bytes=1, timeout_s=1)
    with pytest.raises(StoreUnavailable):
        run(store.check())
    with pytest.raises(StoreUnavailable):
        run(store.put("img_x", Blob(b"x"), 10))


def test_redis_store_against_a_real_server(tmp_path):
    redis = start_redis(tmp_path)
    try:
        run(_contract(redis.url))
    finally:
        redis.stop()

    async def down() -> None:  # the server is gone: every call is StoreUnavailable, quickly
        store = open_store(redis.url, max_items=1, max_bytes=1, timeout_s=1.0)
        start = time.monotonic()
        for call in (store.check(), store.put("img_x", Blob(b"x"), 10), store.get("img_x")):
            with pytest.raises(StoreUnavailable):
                await call
        assert time.monotonic() - start < 5
        await store.close()

    run(down())
