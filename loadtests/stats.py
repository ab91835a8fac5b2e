"""Serving metrics as vLLM's ``bench serve`` defines them (vllm/benchmarks/serve.py ``calculate_metrics``).

Per successful request: TTFT = time from sending to the first non-empty content chunk (non-streaming: the whole
latency); E2EL = time to the last byte; TPOT = (E2EL - TTFT) / (output tokens - 1), only for requests with more
than one output token; ITL = the gaps between consecutive content chunks, pooled over all requests. Request
throughput = successful requests / wall time of the run; output throughput = output tokens of successful requests /
wall time. Percentiles interpolate linearly between order statistics (numpy's default, as vLLM uses).
Pure functions: no I/O, unit-tested in tests/loadtests/.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    """What the client saw of one request (times in seconds, from ``time.perf_counter``)."""

    kind: str  # scenario tag, e.g. "chat-image" or "images"
    ok: bool
    start: float  # when the request was sent
    latency: float  # end-to-end: sent → last byte
    ttft: float | None = None  # sent → first non-empty content chunk
    itl: list[float] = field(default_factory=list)  # gaps between consecutive content chunks
    output_tokens: int = 0
    prompt_tokens: int = 0
    images: int = 0  # images in the answer (images API, any-to-any)
    status: int = 0  # HTTP status
    error: str = ""


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between closest ranks (numpy's ``linear``)."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def distribution(values: Sequence[float], scale: float = 1.0) -> dict[str, float | None]:
    """mean, std (population, as numpy's default) and the percentiles of ``values`` × ``scale``; None when empty."""
    keys = ["mean", "std"] + [f"p{q}" for q in PERCENTILES]
    if not values:
        return dict.fromkeys(keys)
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    out: dict[str, float | None] = {"mean": mean * scale, "std": std * scale}
    out.update({f"p{q}": percentile(values, q) * scale for q in PERCENTILES})
    return out


def tpot(result: RequestResult) -> float | None:
    """Time per output token after the first: (E2EL - TTFT) / (output_tokens - 1); None for ≤ 1 token."""
    if not result.ok or result.ttft is None or result.output_tokens <= 1:
        return None
    return (result.latency - result.ttft) / (result.output_tokens - 1)


def summarize(results: Iterable[RequestResult], duration_s: float) -> dict[str, object]:
    """vLLM-style summary of one run (latencies in ms)."""
    results = list(results)
    if duration_s <= 0:
        raise ValueError("duration must be positive")
    good = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in good)
    tpots = [t for t in (tpot(r) for r in good) if t is not None]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            key = f"{r.status} {r.error}".strip()[:120]
            errors[key] = errors.get(key, 0) + 1
    return {
        "requests": len(results),
        "completed": len(good),
        "failed": len(results) - len(good),
        "errors": errors,
        "duration_s": duration_s,
        "request_throughput": len(good) / duration_s,
        "output_throughput": out_tokens / duration_s,
        "total_token_throughput": (out_tokens + sum(r.prompt_tokens for r in good)) / duration_s,
        "output_tokens": out_tokens,
        "mean_output_tokens": out_tokens / len(good) if good else None,
        "images": sum(r.images for r in good),
        "image_throughput": sum(r.images for r in good) / duration_s,
        "ttft_ms": distribution([r.ttft for r in good if r.ttft is not None], 1000),
        "tpot_ms": distribution(tpots, 1000),
        "itl_ms": distribution([g for r in good for g in r.itl], 1000),
        "e2el_ms": distribution([r.latency for r in good], 1000),
    }


def by_kind(results: Iterable[RequestResult], duration_s: float) -> dict[str, dict[str, object]]:
    """:func:`summarize` per request kind (a mixed scenario's breakdown; throughputs over the whole run)."""
    groups: dict[str, list[RequestResult]] = {}
    for r in results:
        groups.setdefault(r.kind, []).append(r)
    return {kind: summarize(rs, duration_s) for kind, rs in sorted(groups.items())}


def poisson_arrivals(rate: float, n: int, seed: int = 0) -> list[float]:
    """Send times (s from the start) of ``n`` requests of a Poisson process with ``rate`` requests/s:
    exponential gaps, the first request at t=0 (as vLLM's ``--request-rate`` with burstiness 1)."""
    if rate <= 0:
        raise ValueError("rate must be positive")
    rnd = random.Random(seed)
    times, t = [], 0.0
    for i in range(n):
        if i:
            t += rnd.expovariate(rate)
        times.append(t)
    return times
