"""Child-process helpers shared by ``mgm serve`` (and anything else that starts servers on loopback).

Each child runs in its own session, hence its own process group, with stdout and stderr in a log file: a terminal's
Ctrl-C reaches only the supervisor, which then stops every group (SIGTERM, a bounded wait, then SIGKILL), so the
grandchildren (vLLM's engine-core process, for one) go too. Stdlib only: importing this module stays cheap.

**Children die with their parent**, even when the supervisor cannot clean up (``kill -9``, the OOM killer), by two
independent means, because neither alone covers every case:

* each child gets a parent-death signal (Linux ``prctl(PR_SET_PDEATHSIG, SIGTERM)``, set between fork and exec, after
  ``setsid``, so it composes with the child's own session): when the supervisor dies the kernel sends the child
  SIGTERM, and a child that shuts down normally takes its own grandchildren with it. It covers only the direct child
  (the setting is not inherited, and a grandchild's parent is the child) and cannot escalate to SIGKILL;
* a :class:`Watchdog`: a tiny Python process in its own session (no terminal signal reaches it) that the supervisor
  tells, over a pipe, the process group of every child it starts. When the pipe reaches end-of-file without the
  "released" word (the supervisor is gone, however it died: the kernel closes its end), the watchdog SIGTERMs every
  recorded *group*, grandchildren included, waits a few seconds and SIGKILLs what is left. After a normal stop the
  supervisor has already emptied the groups and releases the watchdog, which then exits without touching anything.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("mgm.procs")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the usual race: bind it soon)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_ports(n: int, exclude: Sequence[int] = ()) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1, none of them in ``exclude`` (all held open while choosing)."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < n:  # the kernel hands out each port once while it is held; excluded ones are few
            s = socket.socket()
            held.append(s)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            if port not in exclude:
                ports.append(port)
    finally:
        for s in held:
            s.close()
    return ports


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """True when ``GET url`` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def png_data_url(size: tuple[int, int] = (32, 32), color: tuple[int, int, int] = (200, 40, 40)) -> str:
    """A small one-colour PNG as a ``data:`` URL (needs Pillow)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat_curl(base: str, model: str, *, auth_env: str | None = None) -> str:
    """A ready-to-paste ``curl`` for an OpenAI chat request with a small data-URL image; ``auth_env`` names the shell
    variable holding the Bearer key (the key itself is never printed)."""
    body = ('{"model": "%s", "max_tokens": 32, "messages": [{"role": "user", "content": ['
            '{"type": "image_url", "image_url": {"url": "%s"}}, '
            '{"type": "text", "text": "What is in this picture?"}]}]}') % (model, png_data_url())
    auth = f' -H "Authorization: Bearer ${auth_env}"' if auth_env else ""
    return f"curl -s {base}/v1/chat/completions -H 'Content-Type: application/json'{auth} -d '{body}'"


# --- process groups -------------------------------------------------------------------------------------------------


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid`` (Linux /proc)."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses, so split after the last ')'.
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) >= 3 and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# --- dying with the parent -------------------------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def _parent_death_signal(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` setting the parent-death signal (Linux; None elsewhere). libc is resolved here, in the parent,
    so the forked child only makes the call. The kernel ties the signal to the *thread* that forked the child: the
    supervisor starts its children from its main thread. A parent that died between fork and prctl is caught by
    comparing the parent pid afterwards."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the call: nobody would send the signal
            os._exit(1)

    return preexec


class Watchdog:
    """A separate process that stops every registered child process group if the supervisor dies without calling
    :meth:`release` (see the module docstring). ``grace_s``: SIGTERM → SIGKILL delay for those groups."""

    RELEASE = "released"

    def __init__(self, grace_s: float = 5.0) -> None:
        self.grace_s = grace_s
        self.proc: subprocess.Popen | None = None

    def start(self) -> Watchdog:
        # its own session: a terminal's Ctrl-C/SIGHUP reaches the supervisor only; close_fds (the default) keeps the
        # pipe's write end out of every child, so end-of-file means the supervisor is gone
        self.proc = subprocess.Popen([sys.executable, "-m", "server.procs", "watchdog", str(self.grace_s)],
                                     stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True,
                                     text=True)
        return self

    def _send(self, line: str) -> None:
        if self.proc is None or self.proc.stdin is None:
            return
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            logger.warning("the watchdog is gone: children may outlive a killed supervisor",
                           extra={"fields": {"watchdog_exit": self.proc.poll()}})

    def watch(self, child: Child) -> None:
        self._send(str(child.pid))

    def release(self) -> None:
        """Every child is stopped: the watchdog exits without signalling anything."""
        if self.proc is None:
            return
        self._send(self.RELEASE)
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _watchdog_main(grace_s: float) -> int:
    """The watchdog process: read pgids until end-of-file; without the release word, stop every group."""
    for s in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):  # only end-of-file ends the watch
        signal.signal(s, signal.SIG_IGN)
    pgids: list[int] = []
    for line in sys.stdin:
        word = line.strip()
        if word == Watchdog.RELEASE:
            return 0
        if word.isdigit():
            pgids.append(int(word))
    live = [g for g in pgids if group_members(g)]
    print(f"mgm watchdog: the supervisor is gone; stopping child process groups {live}", file=sys.stderr, flush=True)
    for g in live:
        signal_group(g, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while any(group_members(g) for g in live) and time.monotonic() < deadline:
        time.sleep(0.1)
    for g in live:
        if group_members(g):
            signal_group(g, signal.SIGKILL)
    return 0


@dataclass
class Child:
    """One supervised child: its own process group (pgid = pid), output in ``log``. ``ready_check``, when set,
    replaces the plain ``GET ready_url`` probe."""

    name: str
    argv: list[str]
    log: Path
    ready_url: str | None = None
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    ready_after_s: float | None = None
    ready_check: Callable[[], bool] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def ready(self) -> bool:
        return self.ready_after_s is not None

    def start(self, env: Mapping[str, str] | None = None, cwd: Path | None = None) -> Child:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                         env=dict(env) if env is not None else None, cwd=cwd, start_new_session=True,
                                         preexec_fn=_parent_death_signal())
        self.started_at = time.monotonic()
        return self

    def poll(self) -> int | None:
        assert self.proc is not None
        return self.proc.poll()

    def check_ready(self, timeout: float = 1.0) -> bool:
        """Probe ``ready_url`` once (until the first success); records how long the child took."""
        if not self.ready and self.ready_url:
            ok = self.ready_check() if self.ready_check is not None else http_ok(self.ready_url, timeout)
            if ok:
                self.ready_after_s = time.monotonic() - self.started_at
        return self.ready

    def address_in_use(self) -> bool:
        """True when the child's log says it could not bind its port (EADDRINUSE)."""
        return "address already in use" in self.log_tail(40).lower()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def stop_children(children: Sequence[Child], timeout: float = 20.0, kill_timeout: float = 10.0) -> bool:
    """SIGTERM every child's process group, wait up to ``timeout`` for the groups to empty, SIGKILL what is left and
    wait up to ``kill_timeout`` more. Reaps the children. True when nothing had to be killed."""
    started = [c for c in children if c.proc is not None]
    for child in started:
        signal_group(child.pid, signal.SIGTERM)
    clean = _wait_groups(started, timeout)
    if not clean:
        for child in started:
            if child.poll() is None or group_members(child.pid):
                logger.warning("child did not stop in time: SIGKILL", extra={"fields": {
                    "child": child.name, "pid": child.pid, "timeout_s": timeout}})
                signal_group(child.pid, signal.SIGKILL)
        if not _wait_groups(started, kill_timeout):
            logger.error("processes left after SIGKILL", extra={"fields": {
                "pids": [p for c in started for p in group_members(c.pid)]}})
    return clean


def stop_in_order(stages: Sequence[Sequence[Child]], timeout: float = 20.0, kill_timeout: float = 10.0) -> bool:
    """:func:`stop_children` stage after stage (the gateway, so that its drain still has engines to drain to; then
    the engines and workers); each stage gets ``timeout``. True when nothing had to be killed."""
    clean = True
    for stage in stages:
        started = [c for c in stage if c.proc is not None]
        if not started:
            continue
        names = ",".join(c.name for c in started)
        logger.info("stopping children", extra={"fields": {"children": names}})
        clean = stop_children(started, timeout, kill_timeout) and clean
        logger.info("stopped children", extra={"fields": {"children": names, "exits": ",".join(
            f"{c.name}={c.poll()}" for c in started)}})
    return clean


def kill_children(children: Sequence[Child]) -> None:
    """SIGKILL every child's process group now (no wait; a second Ctrl-C)."""
    for child in children:
        if child.proc is not None:
            signal_group(child.pid, signal.SIGKILL)


def _wait_groups(children: Sequence[Child], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:  # bounded by the deadline
        alive = [c for c in children if c.poll() is None or group_members(c.pid)]
        if not alive:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


if __name__ == "__main__" and sys.argv[1:2] == ["watchdog"]:
    sys.exit(_watchdog_main(float(sys.argv[2]) if len(sys.argv) > 2 else 5.0))
