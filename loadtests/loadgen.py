"""Load generator: closed loop (fixed concurrency) and open loop (Poisson arrivals) against any OpenAI server.

    python -m loadtests.loadgen --base http://127.0.0.1:8000 --scenario image --concurrency 1 4 8 16 32 64
    python -m loadtests.loadgen --base http://127.0.0.1:8000 --scenario mixed --rate 2 8 --requests 40

Bounded in count and time: each level sends at most ``--requests`` requests and stops sending after
``--time-limit`` seconds (requests still in flight get ``--drain-s`` more, then count as failed). Loopback only:
the base URL must point to 127.0.0.1/localhost/::1. Prints one JSON line per level (metrics of loadtests.stats);
``--json`` writes them all.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from loadtests.client import Request, new_session, send
from loadtests.stats import RequestResult, by_kind, poisson_arrivals, summarize

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def check_loopback(base: str) -> str:
    host = urlsplit(base).hostname
    if host not in LOOPBACK:
        raise ValueError(f"the load generator only targets loopback servers, not {host!r}")
    return base.rstrip("/")


@dataclass
class Bounds:
    requests: int
    time_limit_s: float = 120.0  # no new request after this
    drain_s: float = 60.0  # in-flight requests get this much more


def _progress(total: int, desc: str, enabled: bool):  # type: ignore[no-untyped-def]
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="req", leave=False, disable=not enabled, dynamic_ncols=True)


def _timed_out(req: Request, start: float) -> RequestResult:
    return RequestResult(kind=req.kind, ok=False, start=start, latency=time.perf_counter() - start,
                         error="cut: over the level's time bound")


async def _bounded(coro, req: Request, start: float, deadline: float) -> RequestResult:  # type: ignore[no-untyped-def]
    try:
        return await asyncio.wait_for(coro, max(0.0, deadline - time.perf_counter()))
    except asyncio.TimeoutError:
        return _timed_out(req, start)


async def closed_loop(base: str, make: Callable[[int], Request], concurrency: int, bounds: Bounds,
                      progress: bool = True, desc: str = "") -> tuple[list[RequestResult], float]:
    """``concurrency`` workers each send their next request as soon as the previous one finished."""
    results: list[RequestResult] = []
    counter = iter(range(bounds.requests))
    t0 = time.perf_counter()
    stop_at, hard = t0 + bounds.time_limit_s, t0 + bounds.time_limit_s + bounds.drain_s
    bar = _progress(bounds.requests, desc or f"c={concurrency}", progress)
    async with new_session() as session:
        async def worker() -> None:
            for i in counter:
                if time.perf_counter() >= stop_at:
                    return
                req = make(i)
                start = time.perf_counter()
                results.append(await _bounded(send(session, base, req), req, start, hard))
                bar.update(1)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    bar.close()
    return results, time.perf_counter() - t0


async def open_loop(base: str, make: Callable[[int], Request], rate: float, bounds: Bounds, seed: int = 0,
                    progress: bool = True, desc: str = "") -> tuple[list[RequestResult], float]:
    """Requests sent at Poisson arrival times with ``rate`` requests/s, whatever the server's state."""
    arrivals = poisson_arrivals(rate, bounds.requests, seed)
    bar = _progress(bounds.requests, desc or f"rate={rate:g}/s", progress)
    t0 = time.perf_counter()
    stop_at, hard = t0 + bounds.time_limit_s, t0 + bounds.time_limit_s + bounds.drain_s
    async with new_session() as session:
        async def one(req: Request) -> RequestResult:
            start = time.perf_counter()
            res = await _bounded(send(session, base, req), req, start, hard)
            bar.update(1)
            return res

        tasks = []
        for i, at in enumerate(arrivals):
            delay = t0 + at - time.perf_counter()
            if t0 + at >= stop_at:
                break
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(make(i))))
        results = list(await asyncio.gather(*tasks))
    bar.close()
    return results, time.perf_counter() - t0


def run_level(base: str, make: Callable[[int], Request], bounds: Bounds, *, concurrency: int | None = None,
              rate: float | None = None, progress: bool = True, desc: str = "") -> dict[str, object]:
    """One closed-loop (``concurrency``) or open-loop (``rate``) level → its summary, with a per-kind breakdown."""
    if (concurrency is None) == (rate is None):
        raise ValueError("give exactly one of concurrency and rate")
    if concurrency is not None:
        results, wall = asyncio.run(closed_loop(base, make, concurrency, bounds, progress, desc))
        level: dict[str, object] = {"mode": "closed", "concurrency": concurrency}
    else:
        results, wall = asyncio.run(open_loop(base, make, rate, bounds, progress=progress, desc=desc))  # type: ignore[arg-type]
        level = {"mode": "open", "rate": rate}
    level.update(summarize(results, wall))
    kinds = by_kind(results, wall)
    if len(kinds) > 1:
        level["by_kind"] = kinds
    return level


def main(argv: list[str] | None = None) -> None:
    from loadtests.scenarios import SCENARIOS, Scenario

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="server base URL (loopback), e.g. http://127.0.0.1:8000")
    ap.add_argument("--scenario", choices=SCENARIOS, default="image")
    ap.add_argument("--model", default=None, help="model id (default: the first of GET /v1/models)")
    ap.add_argument("--concurrency", type=int, nargs="*", default=[], help="closed-loop levels")
    ap.add_argument("--rate", type=float, nargs="*", default=[], help="open-loop levels, requests/s")
    ap.add_argument("--requests", type=int, default=32, help="requests per level (at most)")
    ap.add_argument("--time-limit", type=float, default=120.0, help="seconds a level may send requests")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--json", type=Path, default=None, help="write every level's summary here")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    base = check_loopback(args.base)
    if not args.concurrency and not args.rate:
        ap.error("give --concurrency and/or --rate levels")
    model = args.model or _first_model(base)
    scenario = Scenario(args.scenario, model, max_tokens=args.max_tokens, image_size=args.image_size)
    scenario.prepare(args.requests)
    bounds = Bounds(args.requests, args.time_limit)
    levels = []
    for c in args.concurrency:
        levels.append(run_level(base, scenario.request, bounds, concurrency=c, progress=not args.no_progress))
        print(json.dumps(levels[-1]), flush=True)
    for r in args.rate:
        levels.append(run_level(base, scenario.request, bounds, rate=r, progress=not args.no_progress))
        print(json.dumps(levels[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(levels, indent=1))


def _first_model(base: str) -> str:
    import httpx

    return httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"]


if __name__ == "__main__":
    main()
