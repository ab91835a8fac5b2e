"""`mgm serve` hardening (issue 13, points 7 and 8), with real processes: children die with a supervisor killed by
SIGKILL (parent-death signal + watchdog, process groups included) and the port is freed; SIGHUP stops in order
(gateway first); the ready line comes only once the gateway's /ready lists every backend up; a second instance
using the same log files is refused; a child that loses its port is recognised."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request

from support.serve_live import VLLM_ARGS, leftovers, start_serve

from server.procs import Child, free_port, group_members
from server.supervisor import POOL_COMPLETE, READY_PREFIX, pool_complete


def _wait_gone(pids, timeout: float) -> list[int]:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while leftovers(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return leftovers(pids)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


SUPERVISOR = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from server.procs import Child, Watchdog
    watchdog = Watchdog(grace_s=2).start()
    # a child that ignores SIGTERM (only SIGKILL ends it) with a grandchild in its group
    child = Child("x", ["sh", "-c", "trap '' TERM; sleep 300 & sleep 300"], Path(sys.argv[1]) / "x.log").start()
    watchdog.watch(child)
    print(child.pid, flush=True)
    time.sleep(300)
""")


def test_killed_supervisor_takes_children_and_grandchildren(tmp_path):  # type: ignore[no-untyped-def]
    """Without the whole stack: a supervisor using Child + Watchdog is SIGKILLed; the child's group (a grandchild
    too, and a child that ignores SIGTERM) is gone within a few seconds."""
    sup = subprocess.Popen([sys.executable, "-c", SUPERVISOR, str(tmp_path)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        pgid = int(sup.stdout.readline())  # type: ignore[union-attr]
        deadline = time.monotonic() + 10
        while len(group_members(pgid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(group_members(pgid)) >= 2
        sup.kill()
        sup.wait(10)
        assert _wait_gone([pgid], 10) == []
        assert "the supervisor is gone" in sup.stderr.read()  # type: ignore[union-attr]
    finally:
        if sup.poll() is None:
            sup.kill()
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError, NameError):
            pass


def test_pool_complete():
    engines, workers = ["http://127.0.0.1:1", "http://127.0.0.1:2"], ["http://127.0.0.1:3"]
    up = {"status": "ready", "engines": [{"url": u, "up": True} for u in engines],
          "workers": [{"url": workers[0], "up": True}]}
    assert pool_complete(up, engines, workers)
    assert not pool_complete({**up, "engines": up["engines"][:1]}, engines, workers)  # one engine not taken in yet
    assert not pool_complete({**up, "engines": [{**up["engines"][0], "up": False}, up["engines"][1]]}, engines,
                             workers)
    assert not pool_complete({**up, "workers": []}, engines, workers)
    assert not pool_complete({"error": {}}, engines, workers)
    assert pool_complete({"status": "ready", "engines": [{"up": True}, {"up": True}], "workers": [{"up": True}]},
                         engines, workers)  # a gateway that hides addresses: counted


def test_child_that_lost_its_port_is_recognised(tmp_path):  # type: ignore[no-untyped-def]
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        child = Child("engine-0", [sys.executable, "-c", f"import socket; socket.socket().bind(('127.0.0.1', {port}))"],
                      tmp_path / "engine-0.log").start()
        assert child.proc.wait(30) != 0  # type: ignore[union-attr]
    assert child.address_in_use()
    ok = Child("w", [sys.executable, "-c", "print('fine')"], tmp_path / "w.log").start()
    assert ok.proc.wait(30) == 0 and not ok.address_in_use()  # type: ignore[union-attr]


def _ready_body(base: str) -> dict:  # type: ignore[type-arg]
    with urllib.request.urlopen(f"{base}/ready", timeout=10) as r:
        return json.loads(r.read())


def test_ready_means_pool_complete_second_instance_refused_sighup_stops_in_order(tiny_models, tmp_path):  # type: ignore[no-untyped-def]
    model, image_model = tiny_models
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    serve = start_serve(tmp_path, "--model", str(model), "--image-model", str(image_model), "--port", str(port),
                        "--stop-timeout", "20", *VLLM_ARGS)
    try:
        serve.wait_for(lambda: READY_PREFIX in serve.stdout(), 150, "ready line")
        body = _ready_body(base)  # right after the ready line: every backend is in the pool, up
        assert body["status"] == "ready"
        assert len(body["engines"]) == 1 and all(e["up"] for e in body["engines"]), body
        assert len(body["workers"]) == 1 and all(w["up"] for w in body["workers"]), body
        err = serve.stderr()
        assert POOL_COMPLETE in err, serve.logs()

        # a second instance in the same cache (same log files) is refused at once, nothing of the first touched
        second = tmp_path / "second"
        second.mkdir()
        other = start_serve(second, "--cache-dir", str(tmp_path / "cache"), "--model", str(model),
                            "--image-model", str(image_model), "--port", str(free_port()))
        assert other.wait_exit(30) == 2, other.logs()
        assert "another mgm serve is running" in other.stderr() and "--logs-dir" in other.stderr(), other.logs()
        assert b"\0" not in (tmp_path / "cache" / "logs" / "gateway.log").read_bytes()
        assert _ready_body(base)["status"] == "ready"

        children = serve.children()
        serve.proc.send_signal(signal.SIGHUP)
        assert serve.wait_exit(60) == 0, serve.logs()
        assert leftovers(children.values()) == [], serve.logs()
        err = serve.stderr()
        assert "stopping signal=SIGHUP" in err, serve.logs()
        gateway_stopped = err.index("stopped children children=gateway")
        assert gateway_stopped < err.index("stopping children children=engine-0,sdxl-worker-0"), serve.logs()
        assert "exits=gateway=0" in err, serve.logs()
        assert _port_free(port)
    finally:
        if serve.proc.poll() is None:
            serve.stop()


def test_kill_9_supervisor_leaves_no_child_and_frees_the_port(tiny_models, tmp_path):  # type: ignore[no-untyped-def]
    model, _ = tiny_models
    port = free_port()
    serve = start_serve(tmp_path, "--model", str(model), "--sdxl-workers", "0", "--port", str(port), *VLLM_ARGS)
    try:
        serve.wait_for(lambda: READY_PREFIX in serve.stdout(), 150, "ready line")
        children = serve.children()
        engine = children["engine-0"]
        assert len(group_members(engine)) >= 2, serve.logs()  # vLLM's engine core: a grandchild in the group
        serve.proc.kill()
        serve.proc.wait(10)
        assert _wait_gone(children.values(), 15) == [], serve.logs()
        assert "the supervisor is gone" in serve.stderr(), serve.logs()
        deadline = time.monotonic() + 5
        while not _port_free(port) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _port_free(port)
    finally:
        for pid in [serve.proc.pid, *serve.children().values()]:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
