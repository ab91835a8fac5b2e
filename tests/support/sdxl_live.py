"""Helpers shared by the live SDXL worker tests: ports, metrics, error shapes (imported by module name, like
tests/engine's helpers)."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families

#: A cheap request: 64×64, 3 steps (~50 ms on the tiny pipeline).
SMALL = {"prompt": "a red fox in the snow", "width": 64, "height": 64, "num_inference_steps": 3}
#: A slow one: 256², 200 steps (several seconds), to keep the single inference thread busy.
SLOW = {"prompt": "slow", "width": 256, "height": 256, "num_inference_steps": 200, "seed": 0}


def metric(url: str, name: str, **labels: str) -> float:
    """Value of one sample of the worker's /metrics (0 when absent)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


async def wait_for(url: str, name: str, ok: Callable[[float], bool], timeout: float = 30.0, **labels: str) -> float:
    deadline = time.monotonic() + timeout
    while True:  # bounded by the deadline
        value = await asyncio.to_thread(metric, url, name, **labels)
        if ok(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{name}{labels} stayed at {value} for {timeout} s")
        await asyncio.sleep(0.05)


def png(item: dict) -> bytes:
    return base64.b64decode(item["b64_json"])


def generate(url: str, **body) -> httpx.Response:
    return httpx.post(url + "/v1/generate", json=body, timeout=60)


def assert_error(r: httpx.Response, status: int, *, param: str | None = None, code: str | None = None) -> dict:
    """The OpenAI error shape with the given status (and param/code)."""
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) and err["message"]
    assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err
