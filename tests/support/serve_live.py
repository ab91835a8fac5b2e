"""Run ``python -m server serve`` as a real child process (stdout and stderr in files); read its ready line and the
pids of its children; check that their process groups are empty."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

#: Small settings for a busy 2-core machine: 1 GiB of KV cache, one SDXL thread, 8 sequences; a 4096-token context so
#: that the playground's Stop test has an answer long enough to stop (vLLM args, passed after --).
ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "MGM_KV_CACHE_GIB": "1", "MGM_SDXL_THREADS": "1",
       "MGM_SDXL_WARMUP_STEPS": "1"}
VLLM_ARGS = ["--", "--max-model-len", "4096", "--max-num-seqs", "8", "--limit-mm-per-prompt", '{"image": 2}']
#: The shared stack's API key (``MGM_API_KEYS``) and chat model alias (``--model-name``); see conftest.py.
API_KEY = "sk-serve-test"
ALIAS = "mgm-tiny"


@dataclass
class Serve:
    proc: subprocess.Popen
    out: Path
    err: Path

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def logs(self) -> str:
        return f"--- stdout ---\n{self.stdout()[-2000:]}\n--- stderr ---\n{self.stderr()[-4000:]}"

    def children(self) -> dict[str, int]:
        """Child name → pid (= its process group), from the "started child=NAME pid=PID" log lines."""
        return {m[1]: int(m[2]) for m in re.finditer(r"started child=(\S+) pid=(\d+)", self.stderr())}

    def wait_for(self, predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not predicate():  # bounded by the deadline
            if self.proc.poll() is not None:
                pytest.fail(f"mgm serve exited with {self.proc.returncode} while waiting for {what}\n{self.logs()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} after {timeout:.0f} s\n{self.logs()}")
            time.sleep(0.2)

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"mgm serve still running {timeout:.0f} s later\n{self.logs()}")

    def stop(self) -> None:
        """Last-resort cleanup: SIGKILL serve's group and every child group it reported."""
        for pid in [self.proc.pid, *self.children().values()]:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.proc.wait(30)


def start_serve(tmp: Path, *args: str, env: dict[str, str] | None = None) -> Serve:
    out, err = tmp / "serve.out", tmp / "serve.err"
    cmd = [sys.executable, "-m", "server", "serve", "--cache-dir", str(tmp / "cache"), *args]
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fo, stderr=fe, cwd=REPO,
                                env={**os.environ, **ENV, **(env or {})}, start_new_session=True)
    return Serve(proc, out, err)


def leftovers(pids) -> list[int]:  # type: ignore[no-untyped-def]
    """Live processes still in any of these process groups."""
    from server.procs import group_members

    return [p for pgid in pids for p in group_members(pgid)]
