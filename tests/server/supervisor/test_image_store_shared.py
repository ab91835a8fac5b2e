"""The shared image store across gateway replicas: two ``mgm gateway`` processes in front of the shared stack's
engine and SDXL worker, both on one real ``redis-server``. A URL minted by one replica is served by the other (in the
format it was drawn in); with Redis down, ``url`` requests are 503 with retry-after while ``b64_json`` requests and
everything else keep working, and they recover once Redis is back."""

from __future__ import annotations

import base64
import time

import httpx
from support.serve_live import API_KEY

FAST = {"prompt": "a lighthouse", "size": "64x64", "num_inference_steps": 2, "enhance_prompt": False}
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _generate(url: str, **extra) -> httpx.Response:  # type: ignore[no-untyped-def]
    return httpx.post(url + "/v1/images/generations", json={**FAST, **extra}, headers=AUTH, timeout=120)


def test_a_url_from_one_replica_is_served_by_the_other(replicas):
    _redis, (a, b) = replicas
    assert httpx.get(a + "/ready", timeout=5).json()["image_store"] == {"kind": "redis", "shared": True}
    r = _generate(a, response_format="url", output_format="jpeg", n=2)
    assert r.status_code == 200, r.text
    urls = [d["url"] for d in r.json()["data"]]
    assert all(u.startswith(a + "/v1/files/images/img_") for u in urls)
    for u in urls:
        got = httpx.get(u.replace(a, b), timeout=10)  # the other replica, no API key (the id is the credential)
        assert got.status_code == 200 and got.headers["content-type"] == "image/jpeg"
        assert got.content.startswith(b"\xff\xd8\xff")
        assert httpx.get(u, timeout=10).content == got.content
    assert httpx.get(b + "/v1/files/images/img_nope", timeout=10).status_code == 404


def test_redis_down_fails_only_what_needs_it_and_recovers(replicas):
    redis, (a, b) = replicas
    minted = _generate(a, response_format="url").json()["data"][0]["url"]
    redis.stop()
    try:
        start = time.monotonic()
        r = _generate(a, response_format="url")
        assert r.status_code == 503 and r.json()["error"]["code"] == "image_store_unavailable", r.text
        assert int(r.headers["retry-after"]) >= 1 and time.monotonic() - start < 10
        assert "127.0.0.1" not in r.text  # the store's address stays in the log
        got = httpx.get(minted.replace(a, b), timeout=10)
        assert got.status_code == 503 and got.json()["error"]["code"] == "image_store_unavailable"
        inline = _generate(b, response_format="b64_json")  # needs no store
        assert inline.status_code == 200 and base64.b64decode(inline.json()["data"][0]["b64_json"])[:4] == b"\x89PNG"
        models = httpx.get(a + "/v1/models", headers=AUTH, timeout=10)
        assert models.status_code == 200
        assert httpx.get(a + "/ready", timeout=5).status_code == 200  # a store outage never takes a replica out
    finally:
        redis.start()  # same port, empty (no persistence): what was stored before is gone
    r = _generate(b, response_format="url")
    assert r.status_code == 200, r.text
    assert httpx.get(r.json()["data"][0]["url"].replace(b, a), timeout=10).status_code == 200
