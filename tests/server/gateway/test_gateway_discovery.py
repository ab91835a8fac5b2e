"""DNS discovery of engines and SDXL workers (a Kubernetes headless Service: one name, one address per pod).

Unit tests drive :class:`BackendDiscovery` with an injected resolver. The live tests run a real gateway whose
resolver maps a made-up name to loopback addresses that the test changes while the gateway runs: behind
``engines.test`` stand two real gateways bound to 127.0.0.2 and 127.0.0.3 on the same port (as pods of one Service
are), both in front of the session's real tiny ``mgm engine``; behind ``workers.test`` the session's first real
``mgm sdxl-worker`` (127.0.0.1) and an address where nothing listens (127.0.0.2)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from support.live import uvicorn_thread

from server.gateway.config import GatewayConfig
from server.gateway.discovery import BackendDiscovery, discoverable, reconcile, with_address
from server.gateway.engine_pool import Engine

# --- unit: URL handling and resolution rules --------------------------------------------------------------------------


def test_which_urls_are_expanded() -> None:
    assert discoverable("http://mgm-engine.ns.svc.cluster.local:8000")
    assert discoverable("http://localhost:8000")
    assert not discoverable("http://10.1.2.3:8000")
    assert not discoverable("http://[fd00::1]:8000")
    assert not discoverable("https://engine.example.com")  # the certificate names the host, not the pod
    assert with_address("http://svc:8000/base", "10.0.0.7") == "http://10.0.0.7:8000/base"
    assert with_address("http://svc:8000", "fd00::7") == "http://[fd00::7]:8000"
    assert with_address("http://svc", "10.0.0.7") == "http://10.0.0.7"


class FakeDNS:
    """Injected resolver: ``answers[host]`` is a list of addresses or an exception to raise."""

    def __init__(self, answers: dict[str, list[str] | OSError]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append((host, port))
        answer = self.answers.get(host, socket.gaierror(socket.EAI_NONAME, "Name or service not known"))
        if isinstance(answer, OSError):
            raise answer
        return list(answer)


def test_resolution_rules() -> None:
    dns = FakeDNS({"eng": ["10.0.0.9", "10.0.0.10", "10.0.0.9"], "other": ["fd00::2", "10.0.0.1"]})
    disc = BackendDiscovery(["http://eng:8000/", "http://192.0.2.1:9000", "http://other:81", "http://eng:8000"],
                            dns)
    # numeric order, duplicates dropped, IP-literal URLs kept as given, configuration order kept
    assert asyncio.run(disc.resolve()) == ["http://10.0.0.9:8000", "http://10.0.0.10:8000", "http://192.0.2.1:9000",
                                           "http://10.0.0.1:81", "http://[fd00::2]:81"]
    assert ("eng", 8000) in dns.calls and ("other", 81) in dns.calls and all(h != "192.0.2.1" for h, _ in dns.calls)

    # DNS trouble (timeout, SERVFAIL) keeps what was last seen; a name that does not exist means no backend
    dns.answers["eng"] = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
    dns.answers["other"] = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    assert asyncio.run(disc.resolve()) == ["http://10.0.0.9:8000", "http://10.0.0.10:8000", "http://192.0.2.1:9000"]
    dns.answers["eng"] = TimeoutError("resolver timed out")
    assert asyncio.run(disc.resolve())[:2] == ["http://10.0.0.9:8000", "http://10.0.0.10:8000"]
    dns.answers["eng"] = []
    assert asyncio.run(disc.resolve()) == ["http://192.0.2.1:9000"]

    # a temporary failure before any answer: nothing to keep yet
    fresh = BackendDiscovery(["http://eng:8000"], FakeDNS({"eng": socket.gaierror(socket.EAI_AGAIN, "again")}))
    assert asyncio.run(fresh.resolve()) == []


def test_reconcile_keeps_backend_state() -> None:
    a, b = Engine("http://10.0.0.1:8000", up=True, in_flight=3), Engine("http://10.0.0.2:8000", up=True)
    engines, added, removed = reconcile([a, b], ["http://10.0.0.2:8000", "http://10.0.0.3:8000"], Engine)
    assert engines[0] is b and engines[1].url == "http://10.0.0.3:8000" and not engines[1].up
    assert added == [engines[1]] and removed == [a]


def test_config_and_flag() -> None:
    from server.cli import build_parser

    with pytest.raises(ValueError, match="discover_interval_s"):
        GatewayConfig(engines=("http://e:1",), discover_interval_s=-1)
    args = build_parser().parse_args(["gateway", "--engine", "http://e:1", "--discover-interval", "5"])
    assert args.discover_interval == 5.0


# --- live: real gateways on loopback ---------------------------------------------------------------------------------


class MutableDNS:
    """The gateway's resolver: names in ``table`` answer what the test put there; other names do not exist."""

    def __init__(self) -> None:
        self.table: dict[str, list[str]] = {}

    async def __call__(self, host: str, port: int) -> list[str]:
        if host in self.table:
            return list(self.table[host])
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


@contextlib.contextmanager
def serve_on(app, host: str, port: int) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """A real uvicorn for ``app`` on ``host:port`` in a thread (what a pod of a headless Service is)."""
    import uvicorn

    with uvicorn_thread(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")):
        yield f"http://{host}:{port}"


def _port_free_on(hosts: tuple[str, ...]) -> int:
    for _ in range(50):  # bounded
        with socket.socket() as s:
            s.bind((hosts[0], 0))
            port = s.getsockname()[1]
        try:
            for host in hosts[1:]:
                with socket.socket() as s:
                    s.bind((host, port))
            return port
        except OSError:
            continue
    raise RuntimeError(f"no port free on all of {hosts}")


def _wait(what: str, cond: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # bounded by the deadline
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _served(app) -> float:  # type: ignore[no-untyped-def]
    """Chat completions a backend gateway answered with 200 (from its own metrics)."""
    value = app.state.gateway.metrics.registry.get_sample_value(
        "mgm_gateway_requests_total", {"route": "/v1/chat/completions", "status": "200"})
    return value or 0.0


def _chat_burst(base: str, model: str, n: int) -> list[int]:
    async def one(client: httpx.AsyncClient) -> int:
        r = await client.post(base + "/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        return r.status_code

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=120) as client:
            return list(await asyncio.gather(*(one(client) for _ in range(n))))

    return asyncio.run(burst())


def test_engines_behind_one_name_join_and_leave_without_restart(engine, gateway_server) -> None:  # type: ignore[no-untyped-def]
    from server.gateway.app import create_app

    engine_url, model = engine
    pods = ("127.0.0.2", "127.0.0.3")
    port = _port_free_on(pods)
    backends = [create_app(GatewayConfig(engines=(engine_url,))) for _ in pods]
    dns = MutableDNS()
    dns.table["engines.test"] = list(pods)
    front = GatewayConfig(engines=(f"http://engines.test:{port}",), discover_interval_s=0.2, probe_interval_s=0.2,
                          routing="least-loaded")  # identical requests share a key: only least-loaded spreads them
    with contextlib.ExitStack() as stack:
        for app, host in zip(backends, pods):
            stack.enter_context(serve_on(app, host, port))
        base = stack.enter_context(gateway_server(front, resolver=dns))
        pool = gateway_server.apps[base].state.gateway.pool

        ready = httpx.get(base + "/ready", timeout=30)
        assert ready.status_code == 200, ready.text
        assert {(e["url"], e["up"]) for e in ready.json()["engines"]} == {
            (f"http://{h}:{port}", True) for h in pods}
        assert [m["id"] for m in httpx.get(base + "/v1/models", timeout=10).json()["data"]] == [model]

        # both pods get traffic (least in flight spreads a concurrent burst)
        before = [_served(a) for a in backends]
        assert _chat_burst(base, model, 6) == [200] * 6
        got = [_served(a) - b for a, b in zip(backends, before)]
        assert sum(got) == 6 and min(got) >= 1, got

        # one pod leaves the Service: it leaves the pool, traffic goes to the other one only
        dns.table["engines.test"] = ["127.0.0.3"]
        _wait("the pool to drop 127.0.0.2", lambda: [e.url for e in pool.engines] == [f"http://127.0.0.3:{port}"])
        before = [_served(a) for a in backends]
        assert _chat_burst(base, model, 4) == [200] * 4
        assert [_served(a) - b for a, b in zip(backends, before)] == [0, 4]
        metrics = httpx.get(base + "/metrics", timeout=10).text
        assert f'engine="http://127.0.0.3:{port}"' in metrics
        assert f'engine="http://127.0.0.2:{port}"' not in metrics  # no stale series of a pod that left

        # no pod at all (NXDOMAIN): not ready, chat answers 503 with retry-after
        del dns.table["engines.test"]
        _wait("the pool to empty", lambda: not pool.engines)
        assert httpx.get(base + "/ready", timeout=10).status_code == 503
        r = httpx.post(base + "/v1/chat/completions", timeout=30,
                       json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable" and "retry-after" in r.headers

        # pods come back (same addresses, as after a rollout): served again, no restart
        dns.table["engines.test"] = list(pods)
        _wait("both pods to be up again", lambda: sum(e.up for e in pool.engines) == 2)
        assert _chat_burst(base, model, 2) == [200, 200]
        assert httpx.get(base + "/ready", timeout=30).status_code == 200


def test_sdxl_workers_behind_one_name(engine, sdxl_workers, gateway_server) -> None:  # type: ignore[no-untyped-def]
    worker_port = int(sdxl_workers[0].url.rsplit(":", 1)[1])
    dns = MutableDNS()
    dns.table["workers.test"] = ["127.0.0.1", "127.0.0.2"]  # the second address: a pod that is not listening
    config = GatewayConfig(engines=(engine[0],), sdxl_workers=(f"http://workers.test:{worker_port}",),
                           discover_interval_s=0.2, probe_interval_s=0.2, image_model_name="sdxl-tiny")
    body = {"prompt": "a red fox", "size": "64x64", "response_format": "b64_json", "enhance_prompt": False,
            "num_inference_steps": 1}
    with gateway_server(config, resolver=dns) as base:
        sdxl = gateway_server.apps[base].state.gateway.sdxl
        status = {w["url"]: w["up"] for w in httpx.get(base + "/ready", timeout=30).json()["workers"]}
        assert status == {f"http://127.0.0.1:{worker_port}": True, f"http://127.0.0.2:{worker_port}": False}
        r = httpx.post(base + "/v1/images/generations", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert len(r.json()["data"]) == 1

        dns.table["workers.test"] = []  # every pod gone
        _wait("the worker pool to empty", lambda: not sdxl.workers)
        r = httpx.post(base + "/v1/images/generations", json=body, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "image_worker_unavailable"
        metrics = httpx.get(base + "/metrics", timeout=10).text
        assert f'worker="http://127.0.0.1:{worker_port}"' not in metrics  # no stale series of a removed worker

        dns.table["workers.test"] = ["127.0.0.1"]
        _wait("the worker to be back", lambda: sdxl.any_up)
        r = httpx.post(base + "/v1/images/generations", json=body, timeout=120)
        assert r.status_code == 200, r.text
