"""Every bad-input case of RELIABILITY.md (reliability_cases.CASES) against live gateways in front of the session's
real tiny engine: the expected status, the OpenAI error shape with the expected ``code``/``param``, and after each
case the gateway still serves a good chat request. Also: RELIABILITY.md's table is what reliability_table.py renders
from the cases (regenerate with ``.venv/bin/python tests/server/gateway/reliability/reliability_table.py``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from reliability_cases import BODY_CAP, CASES, KEY, Case, dns_resolver
from reliability_table import render_bad_input, update_doc

from server.gateway.config import GatewayConfig, ImagePolicy

DOC = Path(__file__).resolve().parents[4] / "RELIABILITY.md"


@pytest.fixture(scope="module")
def gateways(engine, gateway_server, file_server):  # type: ignore[no-untyped-def]
    common = {"engines": (engine[0],), "api_keys": (KEY,), "max_body_bytes": BODY_CAP,
              "sdxl_workers": ("http://127.0.0.1:1",), "image_model_name": "sdxl-reliability", "probe_interval_s": 60}
    strict = GatewayConfig(**common)
    loopback = GatewayConfig(**common, images=ImagePolicy(allow_loopback=True, timeout_s=1.0, max_bytes=1024 * 1024))
    with gateway_server(strict, resolver=dns_resolver) as s, gateway_server(loopback, resolver=dns_resolver) as lo:
        yield {"strict": s, "loopback": lo}


def _fill(value: Any, names: dict[str, str]) -> Any:
    if isinstance(value, str):
        for k, v in names.items():
            value = value.replace("{" + k + "}", v)
        return value
    if isinstance(value, list):
        return [_fill(v, names) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, names) for k, v in value.items()}
    return value


def send(base: str, case: Case, names: dict[str, str]) -> httpx.Response:
    headers = dict(case.headers)
    if case.auth is not None:
        headers["Authorization"] = f"Bearer {case.auth}"
    if case.files:  # multipart, built by httpx as the SDKs build it
        return httpx.request(case.method, base + case.path, headers=headers, timeout=60, data=case.form,
                             files=[(f, (name, data, mime)) for f, name, data, mime in case.files])
    if case.raw is not None:
        content: Any = case.raw
        if case.chunked:
            content = iter([case.raw[i:i + 65536] for i in range(0, len(case.raw), 65536)])
        headers["Content-Type"] = "application/json"
    elif case.body is not None:
        content = json.dumps(_fill(case.body, names)).encode()
        headers["Content-Type"] = "application/json"
    else:
        content = None
    return httpx.request(case.method, base + _fill(case.path, names), content=content, headers=headers, timeout=60)


def _good_request(base: str, model: str) -> None:
    r = httpx.post(base + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                   json={"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 200 and r.json()["choices"], r.text


@pytest.mark.parametrize("case", CASES, ids=[f"{c.group}: {c.name}" for c in CASES])
def test_bad_input(case: Case, gateways, engine, file_server):  # type: ignore[no-untyped-def]
    base = gateways[case.gateway]
    r = send(base, case, {"model": engine[1], "files": file_server})
    if case.status == 200:
        assert r.status_code == 200, r.text
    else:
        body = r.json()
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
        err = body["error"]
        assert (r.status_code, err["code"], err["param"]) == (case.status, case.code, case.param), err
        assert err["type"] == {401: "authentication_error", 429: "rate_limit_error"}.get(
            r.status_code, "invalid_request_error"), err
        assert err["message"] and KEY not in r.text
    _good_request(base, engine[1])


def test_reliability_md_table_is_up_to_date():
    text = DOC.read_text()
    assert update_doc(text, "bad-input", render_bad_input(CASES)) == text, (
        "RELIABILITY.md's bad-input table is out of date: run .venv/bin/python tests/server/gateway/reliability/"
        "reliability_table.py")
