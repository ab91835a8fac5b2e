"""Servers under test as child processes on loopback — `mgm engine`, `mgm sdxl-worker`, `mgm gateway` — each in its
own process group with its log under ``logs`` (server.procs.Child): the harness the live tests and the serving
benchmark (bench/serving.py, which adds the official-path baseline) share."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from server.procs import Child, stop_children

#: The engine's vLLM flags for the benchmarks: room for 64 concurrent sequences with one image each.
ENGINE_ARGS = ("--max-model-len", "512", "--max-num-seqs", "64", "--limit-mm-per-prompt", '{"image": 1}')


def ensure_tiny(path: Path) -> Path:
    """The tiny random-weight Llama MGM checkpoint at ``path``, built there once."""
    if not (path / "config.json").exists():
        from engine.tiny import build_tiny
        build_tiny(path, backbone="llama", hd=False, seed=0)
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


def _mgm(*args: str) -> list[str]:
    return [sys.executable, "-m", "server", *args]


def engine(model: Path, port: int, logs: Path, name: str = "engine", extra: Sequence[str] = ()) -> Child:
    """`mgm engine` with the benchmark flags (``extra`` after them wins)."""
    return Child(name, _mgm("engine", "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
                            *ENGINE_ARGS, *extra), logs / f"{name}.log", ready_url=f"http://127.0.0.1:{port}/health")


def sdxl_worker(model: Path, port: int, logs: Path, name: str, threads: int, max_batch: int = 4) -> Child:
    return Child(name, _mgm("sdxl-worker", "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
                            "--threads", str(threads), "--max-batch", str(max_batch), "--warmup-steps", "1",
                            "--no-access-log"),
                 logs / f"{name}.log", ready_url=f"http://127.0.0.1:{port}/ready")


def gateway(port: int, engines: Sequence[str], workers: Sequence[str], logs: Path, name: str = "gateway",
            extra: Sequence[str] = ()) -> Child:
    argv = _mgm("gateway", "--host", "127.0.0.1", "--port", str(port), *extra)
    for url in engines:
        argv += ["--engine", url]
    for url in workers:
        argv += ["--sdxl-worker", url]
    return Child(name, argv, logs / f"{name}.log", ready_url=f"http://127.0.0.1:{port}/ready")


def base_url(child: Child) -> str:
    assert child.ready_url is not None
    return child.ready_url.rsplit("/", 1)[0]


def wait_ready(children: Sequence[Child], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not all(c.check_ready() for c in children):  # bounded by the deadline
        for c in children:
            if c.poll() is not None:
                raise RuntimeError(f"{c.name} exited with {c.poll()} before it was ready:\n{c.log_tail(30)}")
        if time.monotonic() > deadline:
            late = [c.name for c in children if not c.ready]
            raise TimeoutError(f"not ready after {timeout:.0f} s: {late}")
        time.sleep(0.5)


def launch(children: Sequence[Child], timeout: float = 600, env: Mapping[str, str] | None = None) -> None:
    """Start ``children`` (in order; ``env`` added to their environment) and wait until all are ready."""
    for c in children:
        c.start(env={**_env(), **(env or {})})
    wait_ready(children, timeout)


@contextlib.contextmanager
def running(children: Sequence[Child], timeout: float = 600,
            env: Mapping[str, str] | None = None) -> Iterator[list[Child]]:
    """:func:`launch` ``children``, stop them all on exit."""
    try:
        launch(children, timeout, env)
        yield list(children)
    finally:
        stop_children(children, timeout=30)
