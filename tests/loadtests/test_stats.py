"""loadtests.stats: percentiles, the TPOT/ITL/TTFT definitions of vLLM's bench serve, summaries, Poisson arrivals."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from loadtests.stats import (RequestResult, by_kind, distribution, percentile, poisson_arrivals, summarize, tpot)


def ok(kind: str = "chat", *, latency: float, ttft: float, tokens: int, itl: list[float] | None = None,
       start: float = 0.0, images: int = 0) -> RequestResult:
    return RequestResult(kind=kind, ok=True, start=start, latency=latency, ttft=ttft, itl=itl or [],
                         output_tokens=tokens, prompt_tokens=10, images=images, status=200)


def failed(kind: str = "chat", status: int = 500, error: str = "boom") -> RequestResult:
    return RequestResult(kind=kind, ok=False, start=0.0, latency=0.1, status=status, error=error)


@pytest.mark.parametrize("n", [1, 2, 3, 10, 101])
@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 99, 99.9, 100])
def test_percentile_matches_numpy_linear(n, q):
    rnd = random.Random(n * 1000 + int(q * 10))
    values = [rnd.expovariate(1.0) for _ in range(n)]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12, abs=1e-15)


def test_percentile_hand_values():
    # sorted [1, 2, 3, 4]: position (n-1)·q/100 → p50 at 1.5 → 2.5; p90 at 2.7 → 3.7; p99 at 2.97 → 3.97
    assert percentile([4, 1, 3, 2], 50) == 2.5
    assert percentile([4, 1, 3, 2], 90) == pytest.approx(3.7)
    assert percentile([4, 1, 3, 2], 99) == pytest.approx(3.97)
    assert percentile([7], 99) == 7
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_distribution_mean_std_and_scale():
    d = distribution([0.001, 0.002, 0.003, 0.004], scale=1000)
    assert d["mean"] == pytest.approx(2.5)
    assert d["std"] == pytest.approx(float(np.std([1, 2, 3, 4])))  # population std, as numpy's default
    assert d["p50"] == pytest.approx(2.5) and d["p99"] == pytest.approx(3.97)
    assert distribution([]) == {"mean": None, "std": None, "p50": None, "p90": None, "p99": None}


def test_tpot_definition():
    # 11 tokens: the first arrives at TTFT, the other 10 share E2EL - TTFT
    assert tpot(ok(latency=1.2, ttft=0.2, tokens=11)) == pytest.approx(0.1)
    # not the E2EL / tokens average, and not the ITL mean (chunks may carry several tokens)
    r = ok(latency=1.2, ttft=0.2, tokens=11, itl=[0.5, 0.5])
    assert tpot(r) != pytest.approx(1.2 / 11) and tpot(r) != pytest.approx(0.5)
    assert tpot(ok(latency=1.0, ttft=0.4, tokens=1)) is None  # undefined for one token
    assert tpot(failed()) is None


def test_summarize_vllm_definitions():
    results = [
        ok(latency=1.0, ttft=0.1, tokens=10, itl=[0.1] * 9),
        ok(latency=2.0, ttft=0.2, tokens=10, itl=[0.2] * 9),
        ok(latency=0.5, ttft=0.5, tokens=1),  # one token: in TTFT and E2EL, not in TPOT
        failed(status=503, error="overloaded"),
        failed(status=503, error="overloaded"),
    ]
    s = summarize(results, duration_s=4.0)
    assert (s["requests"], s["completed"], s["failed"]) == (5, 3, 2)
    assert s["errors"] == {"503 overloaded": 2}
    assert s["request_throughput"] == pytest.approx(3 / 4.0)  # successful requests only
    assert s["output_throughput"] == pytest.approx(21 / 4.0)
    assert s["total_token_throughput"] == pytest.approx((21 + 30) / 4.0)
    assert s["mean_output_tokens"] == pytest.approx(7.0)
    assert s["ttft_ms"]["mean"] == pytest.approx(800 / 3)
    assert s["ttft_ms"]["p50"] == pytest.approx(200)
    assert s["tpot_ms"]["mean"] == pytest.approx((100 + 200) / 2)  # (1.0-0.1)/9 and (2.0-0.2)/9
    assert s["itl_ms"]["mean"] == pytest.approx((9 * 100 + 9 * 200) / 18)  # pooled over requests
    assert s["itl_ms"]["p50"] == pytest.approx(150)
    assert s["e2el_ms"]["p99"] == pytest.approx(1000 * percentile([1.0, 2.0, 0.5], 99))
    with pytest.raises(ValueError):
        summarize(results, 0)


def test_summarize_all_failed_and_images():
    s = summarize([failed(), failed(status=0, error="ClientConnectorError")], 1.0)
    assert s["completed"] == 0 and s["request_throughput"] == 0 and s["mean_output_tokens"] is None
    assert s["ttft_ms"]["p99"] is None
    s = summarize([ok("images", latency=1.0, ttft=1.0, tokens=0, images=2)], 2.0)
    assert s["image_throughput"] == 1.0 and s["tpot_ms"]["mean"] is None


def test_by_kind_groups():
    results = [ok("a", latency=1, ttft=0.1, tokens=5), ok("b", latency=2, ttft=0.2, tokens=5), failed("b")]
    kinds = by_kind(results, 2.0)
    assert list(kinds) == ["a", "b"]
    assert kinds["b"]["requests"] == 2 and kinds["b"]["failed"] == 1
    assert kinds["a"]["request_throughput"] == 0.5  # over the whole run's wall time


def test_poisson_arrivals():
    times = poisson_arrivals(50.0, 20000, seed=1)
    assert times[0] == 0.0 and all(b >= a for a, b in zip(times, times[1:]))
    gaps = np.diff(times)
    assert gaps.mean() == pytest.approx(1 / 50, rel=0.03)
    assert gaps.std() == pytest.approx(1 / 50, rel=0.05)  # exponential: std = mean
    assert poisson_arrivals(5.0, 10, seed=3) == poisson_arrivals(5.0, 10, seed=3)
    assert poisson_arrivals(5.0, 10, seed=3) != poisson_arrivals(5.0, 10, seed=4)
    assert not math.isclose(poisson_arrivals(5.0, 3, 0)[2], poisson_arrivals(10.0, 3, 0)[2])
    with pytest.raises(ValueError):
        poisson_arrivals(0, 3)
