"""`mgm serve` when a child loses its port before binding it (EADDRINUSE): the supervisor stops what it started,
chooses new ports and starts again, up to :data:`server.supervisor.PORT_ATTEMPTS` times, then gives up (exit 1).

The real supervisor and the real gateway run as processes; only two things are patched in the supervisor process:
the port choice (the first planned ports are one this test holds bound, as if another process had taken it
between the choice and the child's bind) and the engine's command line (a stub engine serving ``/health`` and
``/v1/models`` on its ``--port``, so no vLLM start is needed: each test costs one or two gateway starts)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from support.serve_live import ENV, REPO

from server.procs import free_port
from server.supervisor import PORT_ATTEMPTS, READY_PREFIX

LOST_PORT = "lost its port to another process before binding it: starting again on new ports"

#: Runs ``mgm serve`` with its port choice and engine command patched (argv: busy port, busy calls, serve args).
WRAPPER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import server.supervisor as sup
    from server.procs import free_ports

    busy, busy_calls = int(sys.argv[1]), int(sys.argv[2])
    calls = []

    def patched_free_ports(n, exclude=()):
        calls.append(n)
        return [busy] * n if len(calls) <= busy_calls else free_ports(n, exclude)

    real_argv = sup._module_argv
    STUB = ("import sys; from http.server import ThreadingHTTPServer; from support.stub_engine import StubEngine; "
            "ThreadingHTTPServer(('127.0.0.1', int(sys.argv[sys.argv.index('--port') + 1])), StubEngine)"
            ".serve_forever()")

    def patched_argv(config, *rest):
        if rest and rest[0] == "engine":
            return [sys.executable, "-c", "import sys; sys.path.insert(0, {tests!r}); exec(sys.argv[1])", STUB,
                    *rest]
        return real_argv(config, *rest)

    sup.free_ports = patched_free_ports
    sup._module_argv = patched_argv
    from server.cli import main
    sys.exit(main(["serve", *sys.argv[3:]]))
""").format(tests=str(REPO / "tests"))


def _model_dir(tmp: Path) -> Path:
    model = tmp / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")  # the supervisor only checks the marker; the stub engine reads nothing
    return model


def _start(tmp: Path, busy: int, busy_calls: int, port: int) -> tuple[subprocess.Popen, Path, Path]:
    out, err = tmp / "serve.out", tmp / "serve.err"
    argv = [sys.executable, "-c", WRAPPER, str(busy), str(busy_calls), "--cache-dir", str(tmp / "cache"),
            "--model", str(_model_dir(tmp)), "--sdxl-workers", "0", "--port", str(port), "--stop-timeout", "10"]
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fo, stderr=fe, cwd=REPO,
                                env={**os.environ, **ENV}, start_new_session=True)
    return proc, out, err


def _logs(out: Path, err: Path) -> str:
    return f"--- stdout ---\n{out.read_text()[-2000:]}\n--- stderr ---\n{err.read_text()[-4000:]}"


@pytest.fixture
def held_port():  # type: ignore[no-untyped-def]
    """A loopback port this test holds bound (and listening), as the process that took a child's port would."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_child_that_loses_its_port_is_started_again_on_new_ports(tmp_path, held_port):  # type: ignore[no-untyped-def]
    proc, out, err = _start(tmp_path, held_port, 1, free_port())
    try:
        deadline = time.monotonic() + 120
        while READY_PREFIX not in out.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert READY_PREFIX in out.read_text(), _logs(out, err)
        log = err.read_text()
        assert log.count(LOST_PORT) == 1 and "child=engine-0" in log, _logs(out, err)
        started = [line for line in log.splitlines() if "started child=engine-0" in line]
        assert len(started) == 2, _logs(out, err)  # once on the busy port, once on a new one
        assert "every backend is in the gateway's pool" in log
        ready_line = next(line for line in out.read_text().splitlines() if READY_PREFIX in line)
        assert "chat model 'stub'" in ready_line, ready_line  # the gateway reached the engine on its new port
        proc.terminate()
        assert proc.wait(60) == 0, _logs(out, err)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def test_gives_up_after_port_attempts(tmp_path, held_port):  # type: ignore[no-untyped-def]
    proc, out, err = _start(tmp_path, held_port, PORT_ATTEMPTS, free_port())
    try:
        assert proc.wait(120) == 1, _logs(out, err)
        log = err.read_text()
        assert log.count(LOST_PORT) == PORT_ATTEMPTS - 1, _logs(out, err)
        assert "exited unexpectedly" in log and "child=engine-0" in log, _logs(out, err)
        assert "address already in use" in log.lower()  # the last attempt's log tail, printed
        assert READY_PREFIX not in out.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
