"""Faults with real processes on loopback: an engine SIGKILLed (in-flight requests move to the survivor; with none
left 503 + /ready false; recovery when it is back, same gateway), an SDXL worker SIGKILLed mid-job (the job is
retried on the other worker; the pool takes the worker back when it returns), a client hanging up (the engine
aborts the request: vLLM's own metrics), and SIGTERM to `mgm gateway` (drains in-flight requests, exits 0).

The session engine (tests/server/gateway/conftest.py) is the survivor; one extra `mgm engine` on the same tiny checkpoint
is the one that gets killed and restarted on the same port."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loadtests import stack
from server.gateway.config import GatewayConfig
from server.procs import Child, free_port, kill_children, stop_children

#: A request that keeps the tiny engine busy for seconds even on an idle machine (4 sequences of 450 tokens with
#: their top-20 logprobs: ~2 s on 2 idle CPU cores, more under load) (less with the engine bound to one core).
LONG = {"max_tokens": 450, "n": 4, "ignore_eos": True, "temperature": 1.0, "logprobs": True, "top_logprobs": 20}
LONG_TOKENS = LONG["max_tokens"] * LONG["n"]
#: The client-disconnect test needs requests that outlast any scheduling hiccup (an engine that finished before the
#: gateway noticed the hang-up would prove nothing): 3500 tokens per sequence on the spare engine's 4096 context.
LONGEST = {**LONG, "max_tokens": 3500}
SPARE_ARGS = ("--max-model-len", "4096")

#: Failover tests need the engine tried first to be the one listed first: least-loaded routing (ties: first listed).
LISTED_FIRST = "least-loaded"


def metric(url: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def wait_for(predicate, timeout: float, what: str, step: float = 0.05) -> float:  # type: ignore[no-untyped-def]
    """Poll until ``predicate()``; returns the seconds it took."""
    start = time.monotonic()
    while not predicate():  # bounded by the timeout
        assert time.monotonic() - start < timeout, f"timed out waiting for {what}"
        time.sleep(step)
    return time.monotonic() - start


def chat(base: str, model: str, **fields) -> dict:  # type: ignore[no-untyped-def,type-arg]
    return {"model": model, "messages": [{"role": "user", "content": "Tell me a long story."}], **fields}


class SpareEngine:
    """A killable `mgm engine` on a fixed loopback port (restartable there)."""

    def __init__(self, model: Path, log_dir: Path) -> None:
        self.model, self.log_dir, self.port = model, log_dir, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.child: Child | None = None
        self.starts = 0

    def start(self) -> float:
        self.starts += 1
        t0 = time.monotonic()
        self.child = stack.engine(self.model, self.port, self.log_dir, f"spare-engine-{self.starts}", SPARE_ARGS)
        stack.launch([self.child], timeout=240)
        return time.monotonic() - t0

    def kill(self) -> None:
        if self.child is not None and self.child.poll() is None:
            kill_children([self.child])
            self.child.proc.wait(30)  # type: ignore[union-attr]

    def stop(self) -> None:
        if self.child is not None:
            stop_children([self.child], timeout=30)


@pytest.fixture(scope="module")
def spare(engine, engine_checkpoint, tmp_path_factory) -> Iterator[SpareEngine]:  # type: ignore[no-untyped-def]
    spare = SpareEngine(engine_checkpoint, tmp_path_factory.mktemp("spare-engine"))
    spare.start()
    try:
        yield spare
    finally:
        spare.stop()


def test_engine_killed_mid_request_then_none_left_then_back(engine, spare, gateway_server, record):
    base_url, model = engine
    both = GatewayConfig(engines=(spare.url, base_url), probe_interval_s=0.3, routing=LISTED_FIRST)
    only_spare = GatewayConfig(engines=(spare.url,), probe_interval_s=0.3)
    with gateway_server(both) as gw, gateway_server(only_spare) as solo:
        assert httpx.get(solo + "/ready", timeout=10).status_code == 200

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=120) as client:
                return list(await asyncio.gather(*(client.post(gw + "/v1/chat/completions",
                                                               json=chat(gw, model, **LONG)) for _ in range(4))))

        # 4 long requests spread over both engines (least in flight); SIGKILL the spare while they run.
        result: list[list[httpx.Response]] = []
        thread = threading.Thread(target=lambda: result.append(asyncio.run(burst())))
        thread.start()
        wait_for(lambda: metric(gw, "mgm_gateway_engine_in_flight", engine=spare.url) >= 1, 30,
                 "requests on the spare engine")
        time.sleep(0.3)  # generating now (vLLM's own gauges are only refreshed now and then)
        t_kill = time.monotonic()
        spare.kill()
        thread.join(180)
        (responses,) = result
        burst_s = time.monotonic() - t_kill
        assert [r.status_code for r in responses] == [200] * 4, [r.text[:200] for r in responses]
        assert all(r.json()["usage"]["completion_tokens"] == LONG_TOKENS for r in responses)
        retried = metric(gw, "mgm_gateway_engine_retries_total")
        assert retried >= 1 and metric(gw, "mgm_gateway_engine_up", engine=spare.url) == 0
        # new requests go to the survivor
        for _ in range(3):
            r = httpx.post(gw + "/v1/chat/completions", json=chat(gw, model, max_tokens=2), timeout=60)
            assert r.status_code == 200
        # the gateway whose only engine died: 503 + retry-after, /ready false
        r = httpx.post(solo + "/v1/chat/completions", json=chat(solo, model, max_tokens=2), timeout=60)
        assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["code"] == "engine_unavailable"
        ready = httpx.get(solo + "/ready", timeout=10)
        assert ready.status_code == 503 and ready.json()["engines"][0]["up"] is False
        # the engine comes back on its port: both gateways take it back without a restart
        restart_s = spare.start()
        t_up = time.monotonic()
        back_s = wait_for(lambda: httpx.get(solo + "/ready", timeout=10).status_code == 200, 30, "recovery")
        wait_for(lambda: metric(gw, "mgm_gateway_engine_up", engine=spare.url) == 1, 30, "recovery")
        r = httpx.post(solo + "/v1/chat/completions", json=chat(solo, model, max_tokens=2), timeout=60)
        assert r.status_code == 200
        back_all_s = time.monotonic() - t_up
    record("engine SIGKILLed with 4 requests in flight (2 engines)",
           "4/4 requests answered in full (the ones on the dead engine retried on the survivor); new requests go "
           "to the survivor", requests_retried=int(retried), burst_done_after_kill_s=round(burst_s, 1))
    record("no engine left", "503 engine_unavailable + retry-after; /ready 503 with the engine down", )
    record("killed engine restarted on its port",
           "both gateways take it back without a restart (background /health re-probe every 0.3 s)",
           engine_restart_s=round(restart_s, 1), ready_again_after_engine_up_s=round(back_s, 2),
           both_gateways_back_s=round(back_all_s, 2))


def test_client_disconnect_aborts_the_engine_request(engine, spare, gateway_server, record):
    """A client that hangs up mid-stream (and one that gives up on a non-streaming request) makes the gateway close
    its engine request, and vLLM aborts it: nothing is running any more while fewer than max_tokens were generated,
    which with ignore_eos only an abort explains (vLLM does not count client aborts in request_success_total)."""
    base_url, model = spare.url, engine[1]  # the spare: its long context makes requests that run for seconds
    figures = {}
    with gateway_server(GatewayConfig(engines=(base_url,))) as gw:
        for kind, asked in (("stream", {**LONGEST, "n": 1}), ("plain", {**LONGEST, "n": 16})):
            total = asked["max_tokens"] * asked["n"]
            before = metric(base_url, "vllm:generation_tokens_total")
            if kind == "stream":
                with httpx.stream("POST", gw + "/v1/chat/completions", timeout=60,
                                  json=chat(gw, model, stream=True, **asked)) as r:
                    assert r.status_code == 200
                    chunks = r.iter_lines()
                    for _ in range(5):  # a few tokens, then hang up
                        next(chunks)
            else:  # a plain socket, closed while the engine works on the answer
                body = json.dumps(chat(gw, model, **asked)).encode()
                host, port = gw.removeprefix("http://").split(":")
                with socket.create_connection((host, int(port)), timeout=10) as sock:
                    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                                 b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                    sock.settimeout(0.01)

                    def at_engine() -> bool:
                        try:  # an answer already would mean there is nothing left to abort: show it
                            raise AssertionError(sock.recv(300))
                        except TimeoutError:
                            return metric(gw, "mgm_gateway_engine_in_flight", engine=base_url) >= 1

                    wait_for(at_engine, 30, "the request to reach the engine")
                    time.sleep(0.2)  # generating now
            # the gateway gave up its engine request at once (it would hold it for seconds otherwise) ...
            figures[f"{kind}_gateway_released_after_s"] = round(wait_for(
                lambda: metric(gw, "mgm_gateway_engine_in_flight", engine=base_url) == 0, 5,
                "the gateway to close its engine request"), 2)
            # ... and vLLM aborted it. vLLM refreshes its metrics now and then: wait until its token counter stands
            # still for 1 s.
            t0, last = time.monotonic(), -1.0
            while (now := metric(base_url, "vllm:generation_tokens_total")) != last:  # bounded below
                assert time.monotonic() - t0 < 30, "the engine kept generating"
                last = now
                time.sleep(1.0)
            generated = last - before
            assert 0 < generated < total, generated  # it ran, and stopped before the end
            assert metric(base_url, "vllm:num_requests_running") == 0
            figures[f"{kind}_tokens_generated"] = f"{int(generated)} of {total}"
        assert metric(gw, "mgm_gateway_client_disconnects_total") >= 1
        assert metric(gw, "mgm_gateway_engine_in_flight", engine=base_url) == 0
        assert metric(gw, "mgm_gateway_chat_in_flight") == 0
    record("client hangs up mid-stream / gives up on a non-streaming request",
           "the engine request is aborted: nothing left running, generation stopped early", **figures)


def test_sdxl_worker_killed_mid_job_and_back(sdxl_workers, engine, gateway_server, tmp_path, record):
    """Two workers: the first listed (ours, killable) gets the job; SIGKILL it while it renders: the job is retried
    on the other worker and the client gets its image. Restarted on its port, the worker is taken back."""
    args = sdxl_workers[0].proc.args
    model = args[args.index("--model") + 1]  # the session workers' tiny pipeline
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    procs: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        log = tmp_path / f"worker-{len(procs)}.log"
        cmd = [sys.executable, "-m", "server", "sdxl-worker", "--model", model, "--host", "127.0.0.1", "--port",
               str(port), "--threads", "1", "--max-batch", "4", "--warmup-steps", "1", "--job-timeout", "120"]
        with open(log, "wb") as fh:
            procs.append(subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                          env={**os.environ, "HF_HUB_OFFLINE": "1"}))

        def ready() -> bool:
            assert procs[-1].poll() is None, log.read_text()[-3000:]
            try:
                return httpx.get(url + "/ready", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 180, "the SDXL worker", step=0.2)
        return procs[-1]

    def kill() -> None:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)

    start()
    try:
        config = GatewayConfig(engines=(engine[0],), sdxl_workers=(url, sdxl_workers[0].url),
                               image_model_name="sdxl-tiny", probe_interval_s=0.3)
        with gateway_server(config) as gw:
            job = {"prompt": "a fox", "size": "128x128", "num_inference_steps": 40, "enhance_prompt": False,
                   "response_format": "b64_json", "seed": 1}
            result: list[httpx.Response] = []
            thread = threading.Thread(target=lambda: result.append(
                httpx.post(gw + "/v1/images/generations", json=job, timeout=300)))
            thread.start()
            wait_for(lambda: metric(url, "mgm_sdxl_in_flight_jobs") >= 1, 30, "our worker to render the job")
            time.sleep(0.3)
            t_kill = time.monotonic()
            kill()
            thread.join(300)
            (r,) = result
            job_s = time.monotonic() - t_kill
            assert r.status_code == 200 and len(r.json()["data"]) == 1, r.text[:300]
            assert metric(gw, "mgm_gateway_sdxl_retries_total") >= 1
            assert metric(gw, "mgm_gateway_sdxl_worker_up", worker=url) == 0
            t0 = time.monotonic()
            start()
            back_s = wait_for(lambda: metric(gw, "mgm_gateway_sdxl_worker_up", worker=url) == 1, 30,
                              "the worker to be taken back")
            restart_s = time.monotonic() - t0 - back_s
            ready = httpx.get(gw + "/ready", timeout=10).json()
            assert all(w["up"] for w in ready["workers"])
    finally:
        kill()
    record("SDXL worker SIGKILLed mid-job (2 workers)",
           "the job is retried on the other worker; the client gets its image (200)",
           job_done_after_kill_s=round(job_s, 1))
    record("killed SDXL worker restarted on its port", "the pool takes it back (background /ready re-probe)",
           worker_restart_s=round(restart_s, 1), taken_back_after_ready_s=round(back_s, 2))


def _start_gateway(engine_url: str, drain_s: float, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "server", "gateway", "--engine", engine_url, "--port", str(port),
                             "--drain-timeout", str(drain_s), "--unsafe-allow-loopback-images"],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            return httpx.get(base + "/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, 60, "mgm gateway", step=0.2)
    return proc, base


def _refused(base: str) -> bool:
    """True when a new request gets no answer (connection refused, or accepted during the close and dropped)."""
    try:
        httpx.get(base + "/health", timeout=1)
        return False
    except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
        return True


def test_sigterm_drains_in_flight_requests_and_exits_0(engine, files, tmp_path, record):
    """In flight at SIGTERM: a stream, and a request whose image download the test holds open (so it is in flight at
    the signal whatever the machine's speed; with a 20 s drain it is let go just after the signal). With a 20 s drain
    both finish; with a 0 s drain the held one is cut.
    Either way new connections are refused at once and the exit status is 0."""
    base_url, model = engine
    for drain_s in (20.0, 0.0):
        log = tmp_path / f"gateway-{drain_s}.log"
        proc, gw = _start_gateway(base_url, drain_s, log)
        tag = f"sigterm-{drain_s}"
        slow = {"model": model, "max_tokens": 2, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"{files.base}/held.png?{tag}"}},
            {"type": "text", "text": "x"}]}]}
        slow_result: list[object] = []

        def send_slow() -> None:
            try:
                slow_result.append(httpx.post(gw + "/v1/chat/completions", json=slow, timeout=60).status_code)
            except httpx.HTTPError as exc:
                slow_result.append(type(exc).__name__)

        files.gate.clear()
        try:
            lines: list[str] = []
            thread = threading.Thread(target=send_slow)
            thread.start()
            wait_for(lambda: any(tag in p for p in files.seen), 10, "the slow image to be requested")
            with httpx.stream("POST", gw + "/v1/chat/completions", timeout=60,
                              json=chat(gw, model, stream=True, **{**LONG, "n": 1})) as r:
                stream = r.iter_lines()
                lines.append(next(stream))
                t_term = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                wait_for(lambda: _refused(gw), 5, "the gateway to stop accepting")
                refused_s = time.monotonic() - t_term
                if drain_s:
                    files.gate.set()  # the held image arrives during the drain
                try:
                    lines.extend(stream)
                except httpx.HTTPError:
                    pass
            thread.join(60)
            rc = proc.wait(drain_s + 15)
            exit_s = time.monotonic() - t_term
        finally:
            files.gate.set()
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
        assert rc == 0, log.read_text()
        lines = [line for line in lines if line]
        if drain_s:
            assert slow_result == [200], slow_result
            assert lines[-1] == "data: [DONE]" and sum('"finish_reason":"length"' in x for x in lines) == 1, lines[-3:]
            record("SIGTERM to `mgm gateway` with requests in flight (drain timeout 20 s)",
                   "stops accepting at once; the stream and the request with a held image finish in full; exit 0",
                   refused_new_connections_after_s=round(refused_s, 2), exit_after_s=round(exit_s, 1))
        else:
            assert slow_result and slow_result[0] != 200 and exit_s < 5, (slow_result, exit_s)
            record("SIGTERM with a drain timeout of 0 s", "the request still in flight is cut; exit 0",
                   exit_after_s=round(exit_s, 1))


# --- faults told apart (issue 13, points 3 and 5): fake engines on loopback, a real gateway --------------------------



_COMPLETION = {"id": "chatcmpl-fake", "object": "chat.completion", "created": 1, "model": "fake",
               "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
               "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
_BODY = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}


class _Fake(BaseHTTPRequestHandler):
    """A fake engine: /health and /v1/models answer; POST is the subclass's :meth:`answer`. Keep-alive (HTTP/1.1);
    ``posts`` keeps each POST's x-request-id, ``health`` counts GET /health."""

    protocol_version = "HTTP/1.1"
    posts: list[str | None]
    health: list[int]

    def log_message(self, *args) -> None:  # type: ignore[no-untyped-def]
        pass

    def _json(self, status: int, payload: object) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})
            return
        type(self).health.append(1)
        self._json(200, {"status": "ok"})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        type(self).posts.append(self.headers.get("x-request-id"))
        self.answer()

    def answer(self) -> None:
        self._json(200, _COMPLETION)

    def drop(self) -> None:
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)


def _fake(answer=None, name: str = "Fake") -> type[_Fake]:  # type: ignore[no-untyped-def]
    attrs: dict[str, object] = {"posts": [], "health": []}
    if answer is not None:
        attrs["answer"] = answer
    return type(name, (_Fake,), attrs)


def _crash(self: _Fake) -> None:  # headers, a few bytes of the body, then the connection is gone
    self.send_response(200)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", "1000")
    self.end_headers()
    self.wfile.write(b'{"id": "cha')
    self.wfile.flush()
    self.drop()


def _fail_fast(self: _Fake) -> None:
    self._json(500, {"error": {"message": "boom", "type": "server_error", "param": None, "code": None}})


def _stale(self: _Fake) -> None:  # the first request on a connection is answered; one reusing it finds it closed
    served = getattr(self, "served", 0)
    self.served = served + 1
    if served:
        self.drop()
    else:
        self._json(200, _COMPLETION)


@contextlib.contextmanager
def _serve(handler: type[_Fake]) -> Iterator[tuple[str, ThreadingHTTPServer]]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server
    finally:
        server.shutdown()
        server.server_close()



def _post(base: str, **kwargs) -> httpx.Response:  # type: ignore[no-untyped-def]
    return httpx.post(base + "/v1/chat/completions", json=_BODY, timeout=30, **kwargs)


def test_ready_flood_does_not_probe_or_mark_down(gateway_server, record):
    """/ready serves the pools' state: 200 concurrent calls reach no engine and mark nothing down; addresses only
    with the key."""
    fake = _fake()
    with _serve(fake) as (url, _), gateway_server(GatewayConfig(engines=(url,), api_keys=("k",))) as gw:
        before = len(fake.health)

        async def flood() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=30) as client:
                return list(await asyncio.gather(*(client.get(gw + "/ready") for _ in range(200))))

        t0 = time.monotonic()
        responses = asyncio.run(flood())
        flood_s = time.monotonic() - t0
        assert [r.status_code for r in responses] == [200] * 200
        assert all(r.json()["engines"] == [{"up": True, "in_flight": 0}] for r in responses)  # no address
        probes = len(fake.health) - before
        assert probes <= 2, probes  # at most the background prober's own ticks
        keyed = httpx.get(gw + "/ready", headers={"Authorization": "Bearer k"}, timeout=10).json()
        assert keyed["engines"] == [{"url": url, "up": True, "in_flight": 0}]
        assert _post(gw, headers={"Authorization": "Bearer k"}).status_code == 200
    record("/ready flood (200 concurrent, keys configured)",
           "all 200 from the pool's state, no engine probed, no address without the key",
           flood_s=round(flood_s, 2), engine_probes_during_flood=probes)


def test_background_health_probe_marks_a_vanished_engine_down(gateway_server, record):
    fake = _fake()
    fake.protocol_version = "HTTP/1.0"  # no keep-alive: a handler thread must not outlive the server
    with _serve(fake) as (url, server), gateway_server(
            GatewayConfig(engines=(url,), probe_interval_s=0.2, health_interval_s=0.2)) as gw:
        pool = gateway_server.apps[gw].state.gateway.pool
        wait_for(lambda: len(fake.health) >= 3, 10, "background health probes of an up engine")
        server.shutdown()
        server.server_close()
        gone_s = wait_for(lambda: not pool.engines[0].up, 10, "the vanished engine to be marked down")
        assert httpx.get(gw + "/ready", timeout=10).status_code == 503
    record("engine vanishes while idle", "the background health probe marks it down (2 misses in a row); /ready 503",
           marked_down_after_s=round(gone_s, 2))


def test_connect_timeout_fails_over(gateway_server, record):
    """An engine that stops accepting connections (full backlog: SYNs dropped) costs one connect timeout: it is
    marked down and the request is answered by the next engine, not 504."""
    good = _fake()
    first = _fake()
    with _serve(good) as (good_url, _), _serve(first) as (url, server):
        port = server.server_address[1]
        config = GatewayConfig(engines=(url, good_url), connect_timeout_s=0.5, routing=LISTED_FIRST)
        with gateway_server(config) as gw:
            pool = gateway_server.apps[gw].state.gateway.pool
            assert [e.up for e in pool.engines] == [True, True]
            server.shutdown()
            server.server_close()
            hole = socket.socket()
            hole.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            hole.bind(("127.0.0.1", port))
            hole.listen(0)
            fill = []
            for _ in range(3):  # fill the accept queue: further connects hang
                c = socket.socket()
                c.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    c.connect(("127.0.0.1", port))
                fill.append(c)
            try:
                t0 = time.monotonic()
                r = _post(gw)
                took = time.monotonic() - t0
                assert r.status_code == 200, r.text
                assert not pool.engines[0].up and len(first.posts) == 0 and len(good.posts) == 1
                assert metric(gw, "mgm_gateway_engine_retries_total") == 1
                assert _post(gw).status_code == 200
            finally:
                for c in fill:
                    c.close()
                hole.close()
    record("engine connect timeout (2 engines)", "marked down, answered by the other engine (no 504)",
           answered_after_s=round(took, 2))


def test_stale_keep_alive_connection_is_resent_not_marked_down(gateway_server, record):
    fake = _fake(_stale)
    with _serve(fake) as (url, _), gateway_server(GatewayConfig(engines=(url,))) as gw:
        state = gateway_server.apps[gw].state.gateway
        assert _post(gw).status_code == 200
        r = _post(gw)  # goes out on the pooled connection, which the engine closes: re-sent on a fresh one
        assert r.status_code == 200, r.text
        assert state.pool.engines[0].up and state.engine_client.stale_retries == 1
        assert metric(gw, "mgm_gateway_engine_retries_total") == 0 and metric(gw, "mgm_gateway_engine_up") == 1
        assert len(fake.posts) == 3
    record("engine closes a pooled keep-alive connection", "re-sent once on a fresh connection; engine stays up")


def test_request_that_crashes_engines_is_retried_once_and_named(gateway_server, record):
    crashers = [_fake(_crash, f"Crash{i}") for i in range(3)]
    good = _fake()
    with contextlib.ExitStack() as stack:
        urls = [stack.enter_context(_serve(h))[0] for h in crashers]
        good_url = stack.enter_context(_serve(good))[0]
        config = GatewayConfig(engines=(*urls, good_url), probe_interval_s=60,  # crashed engines stay down here
                               routing=LISTED_FIRST)
        gw = stack.enter_context(gateway_server(config))
        r = _post(gw)
        assert r.status_code == 502, r.text
        error = r.json()["error"]
        assert error["code"] == "engine_error"
        posts = [h.posts for h in crashers]
        assert [len(p) for p in posts] == [1, 1, 0] and not good.posts  # tried twice, not on every engine
        request_id = posts[0][0]
        assert request_id and request_id.startswith("gw-") and posts[1][0] == request_id
        assert request_id in error["message"]
        assert metric(gw, "mgm_gateway_engine_crashes_total") == 2
        r = _post(gw)  # the third crasher, then (one retry) the good engine
        assert r.status_code == 200, r.text
        assert len(crashers[2].posts) == 1 and len(good.posts) == 1
    record("request that crashes every engine (4 engines)",
           "tried on 2 engines, then 502 engine_error naming the request id; the next request is answered")


def test_engine_failing_fast_with_5xx_is_backed_off(gateway_server, record):
    bad = _fake(_fail_fast)
    good = _fake()
    with _serve(bad) as (bad_url, _), _serve(good) as (good_url, _):
        config = GatewayConfig(engines=(bad_url, good_url), engine_error_threshold=2, engine_cooldown_s=30,
                               routing=LISTED_FIRST)
        with gateway_server(config) as gw:
            answers = [_post(gw, headers={"x-request-id": f"req-5xx-{i}"}) for i in range(12)]
            statuses = [r.status_code for r in answers]
            pool = gateway_server.apps[gw].state.gateway.pool
            assert statuses == [500] * 2 + [200] * 10  # --engine-error-threshold 2
            for i, r in enumerate(answers[:2]):  # the engine's own text stays in the log; the client gets the id
                assert "boom" not in r.text and f"req-5xx-{i}" in r.json()["error"]["message"], r.text
                assert r.json()["error"]["type"] == "server_error"
            assert pool.engines[0].up  # its /health is fine: not down, only cooling down
            assert metric(gw, "mgm_gateway_engine_backoffs_total") == 1
    record("engine answering 500 fast (2 engines)",
           "after --engine-error-threshold 5xx in a row it is skipped for --engine-cooldown seconds; "
           "the rest go to the healthy engine", errors_before_backoff=statuses.count(500))
