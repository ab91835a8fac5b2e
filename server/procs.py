"""Child-process helpers shared by ``mgm serve`` (and anything else that starts servers on loopback).

Each child runs in its own session, hence its own process group, with stdout and stderr in a log file: a terminal's
Ctrl-C reaches only the supervisor, which then stops every group (SIGTERM, a bounded wait, then SIGKILL), so the
grandchildren (vLLM's engine-core process, for one) go too. Stdlib only: importing this module stays cheap.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
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


@dataclass
class Child:
    """One supervised child: its own process group (pgid = pid), output in ``log``."""

    name: str
    argv: list[str]
    log: Path
    ready_url: str | None = None
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    ready_after_s: float | None = None

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
                                         env=dict(env) if env is not None else None, cwd=cwd, start_new_session=True)
        self.started_at = time.monotonic()
        return self

    def poll(self) -> int | None:
        assert self.proc is not None
        return self.proc.poll()

    def check_ready(self, timeout: float = 1.0) -> bool:
        """Probe ``ready_url`` once (until the first success); records how long the child took."""
        if not self.ready and self.ready_url and http_ok(self.ready_url, timeout):
            self.ready_after_s = time.monotonic() - self.started_at
        return self.ready

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
