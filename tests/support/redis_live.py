"""A real ``redis-server`` (Debian's package; ``make redis`` installs it) as a child process on a free loopback
port, with no persistence. Skipped when it is not installed, except under ``MGM_REQUIRE_REDIS=1`` (``make test``)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from server.procs import free_port


@dataclass
class RedisServer:
    binary: str
    port: int
    workdir: Path
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = open(self.workdir / "redis.log", "ab")
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # bounded
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


def redis_binary() -> str:
    binary = shutil.which("redis-server") or ("/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK)
                                              else None)
    if binary is None:
        if os.environ.get("MGM_REQUIRE_REDIS") == "1":
            pytest.fail("redis-server is not installed (make redis installs Debian's package)")
        pytest.skip("redis-server is not installed (make redis)")
    return binary


def start_redis(workdir: Path) -> RedisServer:
    server = RedisServer(redis_binary(), free_port(), workdir)
    server.start()
    return server
