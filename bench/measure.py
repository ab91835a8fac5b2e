"""How the benchmarks measure one call: wall time over repeats, peak resident memory sampled in a thread while the
first call runs (CPU), the CUDA allocator's peak (GPU), and a fresh process per measured row so that one row's
memory never shows in another's."""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any


def rss_mb() -> float:
    """Resident set size of this process (MiB), from /proc (cheap enough to sample every half millisecond)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


class PeakRSS:
    """``with PeakRSS() as peak: work()`` — ``peak.mb``: the highest resident memory above the level at entry."""

    def __init__(self, interval_s: float = 0.0005) -> None:
        self.interval_s = interval_s
        self.before = self.highest = 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.is_set():
            self.highest = max(self.highest, rss_mb())
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakRSS:
        self.before = self.highest = rss_mb()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    @property
    def mb(self) -> float:
        return max(self.highest - self.before, 0.0)


def time_calls(fn: Callable[[], object], repeats: int, interval_s: float = 0.0005,
               warmup: bool = False) -> dict[str, Any]:
    """``repeats`` timed calls of ``fn``; peak memory is the first call's (later calls reuse what it allocated).
    warmup: the first call only measures memory and ``repeats`` calls follow it, so one-time costs (oneDNN's
    primitive creation per shape, first-touch pages) stay out of the times."""
    with PeakRSS(interval_s) as peak:
        t0 = time.perf_counter()
        fn()
        times = [] if warmup else [time.perf_counter() - t0]
    for _ in range(repeats - len(times)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"times_s": times, "median_s": statistics.median(times), "peak_mb": peak.mb}


def run_child(module: str, *args: object) -> dict[str, Any]:
    """``python -m module --child ARGS…`` in a fresh process; the JSON object on the last line of its stdout."""
    out = subprocess.run([sys.executable, "-m", module, "--child", *map(str, args)], check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


class CudaPeak:
    """``with CudaPeak() as peak: work()`` — ``peak.mb``: the CUDA allocator's peak above the level at entry."""

    mb: float

    def __enter__(self) -> CudaPeak:
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self._base = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        torch.cuda.synchronize()
        self.mb = (torch.cuda.max_memory_allocated() - self._base) / 2**20
