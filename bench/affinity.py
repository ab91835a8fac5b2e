"""Cache-aware routing benchmark on CPU: affinity against least-loaded, two engines, one run.

    python -m bench.affinity --out BENCHMARKS.md      # ~10 min on a 2-core CPU; `make bench` runs it

Two `mgm engine` processes serve a checkpoint with the released vision towers' sizes (``mgm build-tiny --vision
real``: CLIP ViT-L/14-336 + ConvNeXt-L with random weights and the tiny LLM), so a cold image costs what it costs a
real checkpoint. For each policy (:data:`POLICIES`: affinity with the default load bound and a tighter one,
least-loaded) a `mgm gateway --routing POLICY` sits in front of both, and many users talk to it:
``--conversations`` conversations, each opening with its own image and a few hundred words, ``--turns`` turns each,
every turn resending the whole history; in every round each conversation sends its next turn, in shuffled order,
``--in-flight`` at a time. Each policy gets its own images (nothing cached from the other). Reported: TTFT of turn
1 against later turns, vLLM's prefix-cache hit rate (hit tokens / queried tokens, both engines, this policy's
requests only), how often the vision front end ran, the load bound's spills and requests/s. Results go to bench/results/affinity_cpu.json; bench/report.py renders the section.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from datetime import datetime, timezone
from pathlib import Path

import aiohttp
import httpx

from bench import report
from loadtests import stack
from loadtests.client import new_session
from loadtests.scenarios import png_data_url
from loadtests.stats import percentile
from server.gateway import sse
from server.procs import free_ports

CHECKPOINT = Path(".cache/tiny-mgm-realvision")
LOGS = Path(".cache/bench-logs")
RESULT = "affinity_cpu"
ENGINE_ARGS = ("--max-model-len", "4096", "--limit-mm-per-prompt", '{"image": 1}')
TRACE = LOGS / "affinity-encoder.trace"  # MGM_ENCODER_TRACE of both engines: one line per vision front-end run
#: (label, --routing, --routing-epsilon): the default bound, a tighter one, and the policy without affinity
POLICIES = (("affinity", "affinity", 0.5), ("affinity, ε = 0.25", "affinity", 0.25),
            ("least-loaded", "least-loaded", 0.5))
#: a few hundred words after the image: the first turn fills several KV blocks
BRIEF = " ".join(f"Note {i}: describe shapes, colours and the light." for i in range(40))


def ensure_checkpoint() -> Path:
    if not (CHECKPOINT / "config.json").exists():
        from engine.tiny import build_tiny, tiny_spec

        print(f"building {CHECKPOINT} (real vision tower sizes, random weights)", flush=True)
        build_tiny(CHECKPOINT, backbone="llama", seed=0, spec=tiny_spec("real"), progress=True)
    return CHECKPOINT


def engine_counters(engines: list[str]) -> dict[str, float]:
    names = {"vllm:prefix_cache_hits_total": "hits", "vllm:prefix_cache_queries_total": "queries"}
    found = dict.fromkeys(names.values(), 0.0)
    for base in engines:
        for line in httpx.get(base + "/metrics", timeout=10).text.splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in names:
                found[names[name]] += float(line.rsplit(" ", 1)[1])
    return found


async def one_turn(session: aiohttp.ClientSession, base: str, body: dict) -> tuple[float | None, str, bool]:
    """(TTFT, answer text, ok) of one streamed chat request."""
    start, ttft, text = time.perf_counter(), None, ""
    async with session.post(base + "/v1/chat/completions", json=body) as resp:
        if resp.status != 200:
            return None, (await resp.text())[:200], False
        async for event in sse.events(resp.content.iter_any()):
            payload = sse.data(event)
            if payload is None or payload == sse.DONE:
                continue
            for choice in json.loads(payload).get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    ttft = ttft if ttft is not None else time.perf_counter() - start
                    text += piece
    return ttft, text, ttft is not None


async def conversations(base: str, model: str, args: argparse.Namespace, seed: int) -> dict:
    rng = random.Random(seed)
    history = {c: [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_data_url(seed * 10_000 + c, args.image_size)}},
        {"type": "text", "text": f"Picture {c}. {BRIEF}"}]}] for c in range(args.conversations)}
    ttft: dict[int, list[float]] = {k: [] for k in range(args.turns)}
    failed = 0
    gate = asyncio.Semaphore(args.in_flight)
    async with new_session() as session:
        async def turn(c: int, k: int) -> None:
            nonlocal failed
            body = {"model": model, "messages": history[c], "max_tokens": args.max_tokens, "temperature": 0,
                    "ignore_eos": True, "stream": True}
            async with gate:
                first, text, ok = await one_turn(session, base, body)
            if not ok:
                failed += 1
                text = "ok"
            else:
                ttft[k].append(first * 1000)  # type: ignore[operator]
            history[c] += [{"role": "assistant", "content": text},
                           {"role": "user", "content": f"And what about detail {k + 1}?"}]

        t0 = time.perf_counter()
        for k in range(args.turns):
            order = list(range(args.conversations))
            rng.shuffle(order)
            await asyncio.gather(*(turn(c, k) for c in order))
        wall = time.perf_counter() - t0
    requests = args.conversations * args.turns
    return {"ttft_ms": {str(k): v for k, v in ttft.items()}, "failed": failed, "requests": requests,
            "wall_s": wall, "request_throughput": (requests - failed) / wall}


def encoder_runs() -> int:
    """Images encoded so far (a run may batch several: its line holds the count)."""
    return sum(int(n) for n in TRACE.read_text().split()) if TRACE.exists() else 0


def routing_outcomes(gateway: str) -> dict[str, float]:
    found = {"hit": 0.0, "spill": 0.0, "unkeyed": 0.0}
    for line in httpx.get(gateway + "/metrics", timeout=10).text.splitlines():
        if line.startswith("mgm_gateway_routing_total{"):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            found[outcome] = found.get(outcome, 0.0) + float(line.rsplit(" ", 1)[1])
    return found


def summarize(level: dict) -> dict:
    first = level["ttft_ms"]["0"]
    later = [t for k, v in level["ttft_ms"].items() if k != "0" for t in v]
    p50 = lambda xs: percentile(xs, 50) if xs else None  # noqa: E731
    return {"turn1_p50_ms": p50(first), "later_p50_ms": p50(later),
            "hit_rate": level["hits"] / level["queries"] if level["queries"] else None}


def run(args: argparse.Namespace) -> dict:
    checkpoint = ensure_checkpoint()
    LOGS.mkdir(parents=True, exist_ok=True)
    data: dict = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": report.cpu_name(),
                  "config": {k: getattr(args, k) for k in ("conversations", "turns", "in_flight", "max_tokens",
                                                           "image_size")}, "policies": {}}
    ports = free_ports(2)
    engines = [stack.engine(checkpoint, p, LOGS, name=f"affinity-engine-{i}", extra=ENGINE_ARGS)
               for i, p in enumerate(ports)]
    TRACE.unlink(missing_ok=True)
    with stack.running(engines, timeout=900, env={"MGM_ENCODER_TRACE": str(TRACE.resolve())}):
        urls = [stack.base_url(e) for e in engines]
        model = httpx.get(urls[0] + "/v1/models", timeout=10).json()["data"][0]["id"]
        for seed, (label, policy, epsilon) in enumerate(POLICIES, start=1):
            port, = free_ports(1)
            gateway = stack.gateway(port, urls, [], LOGS, name=f"affinity-gateway-{seed}",
                                    extra=["--routing", policy, "--routing-epsilon", str(epsilon)])
            with stack.running([gateway]):
                before, runs = engine_counters(urls), encoder_runs()
                level = asyncio.run(conversations(stack.base_url(gateway), model, args, seed))
                after = engine_counters(urls)
                level["routing"] = routing_outcomes(stack.base_url(gateway))
            level.update({k: after[k] - before[k] for k in before})
            level.update(summarize(level), policy=policy, epsilon=epsilon, vision_runs=encoder_runs() - runs)
            data["policies"][label] = level
            print(f"{label:>16}: turn 1 TTFT p50 {level['turn1_p50_ms']:.0f} ms, later {level['later_p50_ms']:.0f} ms, "
                  f"hit rate {level['hit_rate']:.2f}, vision runs {level['vision_runs']}, spills "
                  f"{level['routing']['spill']:.0f}, {level['request_throughput']:.2f} req/s, failed {level['failed']}",
                  flush=True)
    return data


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="BENCHMARKS.md")
    ap.add_argument("--results", type=Path, default=report.RESULTS)
    ap.add_argument("--conversations", type=int, default=12)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--in-flight", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=336)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    data = run(args)
    data["total_s"] = round(time.monotonic() - t0, 1)
    report.save(RESULT, data, args.results)
    report.render(args.out, ["affinity-cpu"], args.results)


if __name__ == "__main__":
    main()
