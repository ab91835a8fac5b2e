"""Serving benchmark on CPU: our stack (engine direct, gateway) against the official serving path, in one run.

    python -m bench.serving --out BENCHMARKS.md       # ~10 min on a 2-core CPU; `make bench` runs it

Phases, each with its own servers on loopback (stopped before the next phase, so nothing idles on the cores):

1. baseline — bench/baselines/official_server.py (HF ``generate`` + streamer, batch 1, semaphore 5);
2. stack — `mgm engine` + one `mgm sdxl-worker` + `mgm gateway`: the same closed-loop sweep against the engine
   directly and through the gateway (interleaved per level), open loop, the other scenarios (text only, not
   streaming, mixed any-to-any), and vLLM's own ``bench serve`` against the gateway and the engine;
3. SDXL pool — the images API through a gateway with 1, 2 and 4 workers, and one worker without batching;
4. HD — the tiny HD checkpoint (5 views per image) behind a gateway;
5. small — baseline and engine again on a larger random checkpoint (8 layers, width 512), where compute counts;
6. responses — the same image requests through `/v1/responses` (stored and not) and `/v1/chat/completions` of one
   gateway at concurrency 32, interleaved in rounds: what the Responses layer costs.

Same checkpoint (the tiny random Llama), same template, same images (distinct 64² PNG per request), same fixed
output length (``ignore_eos``, 32 tokens) and the same client for every system. Everything goes to
bench/results/serving_cpu.json; bench/report.py renders BENCHMARKS.md sections and PNG plots from it.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

from bench import report
from bench.baselines import official_server
from loadtests import stack
from loadtests.loadgen import Bounds, run_level
from loadtests.scenarios import Scenario
from server.procs import free_ports

TINY = Path(".cache/tiny-mgm")
TINY_HD = Path(".cache/tiny-mgm-hd")
TINY_SDXL = Path(".cache/tiny-sdxl")
#: A larger random checkpoint (~30 M LLM parameters instead of ~1 M), where the decoder's compute starts to count.
SMALL = Path(".cache/small-mgm")
SMALL_SPEC = {"hidden_size": 512, "num_layers": 8, "num_heads": 8, "head_dim": 64, "intermediate_size": 1408}
LOGS = Path(".cache/bench-logs")  # servers' logs and vLLM's raw result files (not committed)
PHASES = ("baseline", "stack", "sdxl", "hd", "small", "responses")
RESULT = "serving_cpu"


def requests_for(concurrency: int, per_level: int, cap: int) -> int:
    """Requests of one closed-loop level: ``per_level`` per unit of concurrency, at least 16, at most ``cap``."""
    return max(16, min(cap, per_level * concurrency))


def ensure_checkpoints() -> None:
    stack.ensure_tiny(TINY)
    if not (TINY_HD / "config.json").exists():
        from engine.tiny import build_tiny

        build_tiny(TINY_HD, backbone="llama", hd=True, seed=0)
    if not (SMALL / "config.json").exists():
        from engine.tiny import TinySpec, build_tiny

        build_tiny(SMALL, backbone="llama", hd=False, seed=0, spec=TinySpec(**SMALL_SPEC))
    if not (TINY_SDXL / "model_index.json").exists():
        from server.sdxl.tiny import build_tiny_sdxl

        build_tiny_sdxl(TINY_SDXL, seed=0)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.logs = LOGS
        self.logs.mkdir(parents=True, exist_ok=True)
        self.data: dict = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "config": {
            "concurrency": args.concurrency, "rates": args.rates, "max_tokens": args.max_tokens,
            "image_size": args.image_size, "per_level": args.per_level, "cap": args.cap,
            "open_requests": args.open_requests, "time_limit_s": args.time_limit, "engine_args": args.engine_arg},
            "phases_s": {}}

    # -- helpers ------------------------------------------------------------------------------------------------

    def scenario(self, name: str, model: str, **kw: object) -> Scenario:
        s = Scenario(name, model, max_tokens=self.args.max_tokens, image_size=self.args.image_size, **kw)  # type: ignore[arg-type]
        s.prepare(max(self.args.cap, self.args.open_requests))
        return s

    def closed(self, base: str, s: Scenario, c: int, label: str, requests: int | None = None) -> dict:
        n = requests or requests_for(c, self.args.per_level, self.args.cap)
        before = _gateway_counters(base, label)
        level = run_level(base, s.request, Bounds(n, self.args.time_limit), concurrency=c, desc=f"{label} c={c}")
        return self._finish(level, s, label, base, before)

    def open(self, base: str, s: Scenario, rate: float, label: str) -> dict:
        before = _gateway_counters(base, label)
        level = run_level(base, s.request, Bounds(self.args.open_requests, self.args.time_limit), rate=rate,
                          desc=f"{label} rate={rate:g}/s")
        return self._finish(level, s, label, base, before)

    def _finish(self, level: dict, s: Scenario, label: str, base: str, before: dict[str, float]) -> dict:
        level["scenario"] = s.name
        if before:  # what the gateway itself saw during the level: retries on another engine, refusals
            after = _gateway_counters(base, label)
            level["gateway_counters"] = {k: after[k] - before[k] for k in before}
        self._line(label, level)
        return level

    @staticmethod
    def _line(label: str, level: dict) -> None:
        at = f"c={level['concurrency']}" if level["mode"] == "closed" else f"rate={level['rate']}"
        ttft = level["ttft_ms"]["p50"]
        print(f"{label:>9} {level.get('scenario', ''):>14} {at:>9}: {level['request_throughput']:7.2f} req/s "
              f"{level['output_throughput']:8.0f} tok/s  TTFT p50 {ttft if ttft is None else round(ttft, 1)} ms  "
              f"failed {level['failed']}", flush=True)

    def warm(self, base: str, s: Scenario) -> None:
        run_level(base, s.request, Bounds(8, 60), concurrency=4, progress=False)

    def phase(self, name: str, fn) -> None:  # type: ignore[no-untyped-def]
        t0 = time.monotonic()
        try:
            fn()
        finally:
            self.data["phases_s"][name] = round(time.monotonic() - t0, 1)
            self.save()

    def save(self) -> None:
        report.save(RESULT, self.data, self.args.results)

    # -- phases -------------------------------------------------------------------------------------------------

    def baseline(self) -> None:
        port, = free_ports(1)
        with stack.running([official_server.child(TINY, port, self.logs)]) as (child,):
            base = stack.base_url(child)
            s = self.scenario("image", model_id(base))
            self.warm(base, s)
            self.data["baseline"] = {
                "sweep": [self.closed(base, s, c, "baseline") for c in self.args.concurrency],
                "open": [self.open(base, s, r, "baseline") for r in self.args.rates],
                "text": self.closed(base, self.scenario("text", s.model), 32, "baseline")}

    def our_stack(self) -> None:
        p_engine, p_worker, p_gateway = free_ports(3)
        engine = stack.engine(TINY, p_engine, self.logs, extra=self.args.engine_arg)
        worker = stack.sdxl_worker(TINY_SDXL, p_worker, self.logs, "sdxl-worker", threads=1)
        gateway = stack.gateway(p_gateway, [stack.base_url(engine)], [stack.base_url(worker)], self.logs)
        with stack.running([engine, worker, gateway]):
            e_base, g_base = stack.base_url(engine), stack.base_url(gateway)
            model = model_id(e_base)
            s = self.scenario("image", model)
            self.warm(e_base, s)
            self.warm(g_base, s)
            eng: dict = {"sweep": [], "open": []}
            gw: dict = {"sweep": [], "open": []}
            for c in self.args.concurrency:  # interleaved: drift in machine load hits both alike
                eng["sweep"].append(self.closed(e_base, s, c, "engine"))
                gw["sweep"].append(self.closed(g_base, s, c, "gateway"))
            for r in self.args.rates:
                eng["open"].append(self.open(e_base, s, r, "engine"))
                gw["open"].append(self.open(g_base, s, r, "gateway"))
            for name in ("text", "image-nostream"):
                eng[name] = self.closed(e_base, self.scenario(name, model), 32, "engine")
                gw[name] = self.closed(g_base, self.scenario(name, model), 32, "gateway")
            gw["mixed"] = self.closed(g_base, self.scenario("mixed", model), self.args.mixed_concurrency, "gateway",
                                      requests=self.args.mixed_requests)
            self.data["engine"], self.data["gateway"] = eng, gw
            self.save()
            if not self.args.skip_vllm_bench:
                self.data["vllm_bench"] = self.vllm_bench({"gateway": g_base, "engine": e_base}, model)

    def vllm_bench(self, bases: dict[str, str], model: str) -> dict:
        from bench import vllm_bench

        out = {}
        for name, base in bases.items():
            result = LOGS / f"vllm_bench_{name}.json"
            args = vllm_bench.bench_args(base, model, TINY, result, concurrency=32, num_prompts=self.args.cap,
                                         output_len=self.args.max_tokens, image_size=self.args.image_size)
            res = vllm_bench.run(args, result, LOGS / f"vllm_bench_{name}.log")
            out[name] = {k: v for k, v in res.items() if not isinstance(v, (list, dict))}
            print(f"vllm bench serve → {name}: {out[name].get('request_throughput', out[name].get('error'))}",
                  flush=True)
        return out

    def sdxl_pool(self) -> None:
        """Images API through a gateway over n workers (threads per worker = cores / n, at least 1), and one worker
        that never batches. The gateway lets each worker hold as many jobs as it batches."""
        cores = len(os.sched_getaffinity(0))
        rows = []
        p_engine, = free_ports(1)
        # the gateway needs an engine to be ready; the images API without enhance_prompt never calls it
        with stack.running([stack.engine(TINY, p_engine, self.logs, name="pool-engine", extra=self.args.engine_arg)]) as (engine,):
            model = model_id(stack.base_url(engine))
            for n, max_batch in [(1, 4), (2, 4), (4, 4), (1, 1)]:
                p_gateway, *p_workers = free_ports(1 + n)
                threads = max(1, cores // n)
                workers = [stack.sdxl_worker(TINY_SDXL, p, self.logs, f"pool-worker-{i}", threads, max_batch)
                           for i, p in enumerate(p_workers)]
                gateway = stack.gateway(p_gateway, [stack.base_url(engine)], [stack.base_url(w) for w in workers],
                                        self.logs, name="pool-gateway", extra=["--sdxl-max-in-flight", str(max_batch)])
                with stack.running([*workers, gateway]):
                    base = stack.base_url(gateway)
                    s = self.scenario("images", model)
                    self.warm(base, s)
                    before = [batch_stats(stack.base_url(w)) for w in workers]
                    level = self.closed(base, s, self.args.sdxl_concurrency, f"sdxl x{n} b{max_batch}",
                                        requests=self.args.sdxl_requests)
                    after = [batch_stats(stack.base_url(w)) for w in workers]
                    calls = sum(a["calls"] - b["calls"] for a, b in zip(after, before))
                    images = sum(a["images"] - b["images"] for a, b in zip(after, before))
                    busy = sum(a["seconds"] - b["seconds"] for a, b in zip(after, before))
                    level.update({"workers": n, "threads_per_worker": threads, "max_batch": max_batch,
                                  "size": s.sdxl_size, "steps": s.sdxl_steps, "pipeline_calls": calls,
                                  "mean_batch": images / calls if calls else None,
                                  "mean_call_s": busy / calls if calls else None})
                    rows.append(level)
        self.data["sdxl_pool"] = rows

    def small(self) -> None:
        """Baseline and engine on the larger checkpoint, one image per request, at the ends of the sweep."""
        out: dict = {"spec": SMALL_SPEC}
        port, = free_ports(1)
        with stack.running([official_server.child(SMALL, port, self.logs)]) as (child,):
            base = stack.base_url(child)
            s = self.scenario("image", model_id(base))
            self.warm(base, s)
            out["baseline"] = [self.closed(base, s, c, "baseline", requests=r) for c, r in ((1, 8), (32, 64))]
        port, = free_ports(1)
        with stack.running([stack.engine(SMALL, port, self.logs, name="engine-small", extra=self.args.engine_arg)]) as (child,):
            base = stack.base_url(child)
            s = self.scenario("image", model_id(base))
            self.warm(base, s)
            out["engine"] = [self.closed(base, s, c, "engine", requests=r) for c, r in ((1, 8), (32, 64))]
        self.data["small"] = out

    def hd(self) -> None:
        p_engine, p_gateway = free_ports(2)
        engine = stack.engine(TINY_HD, p_engine, self.logs, name="engine-hd", extra=self.args.engine_arg)
        gateway = stack.gateway(p_gateway, [stack.base_url(engine)], [], self.logs, name="gateway-hd")
        with stack.running([engine, gateway]):
            e_base, g_base = stack.base_url(engine), stack.base_url(gateway)
            s = Scenario("hd", model_id(e_base), max_tokens=self.args.max_tokens, image_size=self.args.hd_image_size)
            s.prepare(self.args.cap)
            self.warm(g_base, s)
            self.data["hd"] = {"image_size": self.args.hd_image_size, "sweep": [
                self.closed(g_base, s, c, "gateway") for c in self.args.hd_concurrency]}


    def responses(self) -> None:
        """Chat completions against the Responses API (``store`` true and false) on one gateway, same requests."""
        p_engine, p_gateway = free_ports(2)
        engine = stack.engine(TINY, p_engine, self.logs, name="engine-responses", extra=self.args.engine_arg)
        gateway = stack.gateway(p_gateway, [stack.base_url(engine)], [], self.logs, name="gateway-responses")
        with stack.running([engine, gateway]):
            base = stack.base_url(gateway)
            model = model_id(base)
            apis = {"chat": ("image", True), "responses": ("responses", True), "responses-nostore": ("responses", False)}
            c, n = self.args.responses_concurrency, self.args.responses_requests
            rounds: dict[str, list[dict]] = {name: [] for name in apis}
            for r in range(self.args.responses_rounds + 1):  # interleaved: drift in machine load hits all alike
                for k, (name, (scen, store)) in enumerate(apis.items()):
                    # fresh images for every level, so no engine cache serves one API what another API sent
                    s = self.scenario(scen, model, store=store, seed=100 + 10 * r + k)
                    if r == 0:
                        self.warm(base, s)
                    else:
                        rounds[name].append(self.closed(base, s, c, "gateway", requests=n))
        self.data["responses"] = {"concurrency": c, "requests": n, "rounds": rounds}


def model_id(base: str) -> str:
    return httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"]


def _gateway_counters(base: str, label: str) -> dict[str, float]:
    """The gateway's engine-retry and refusal counters (empty for other servers)."""
    if not label.startswith("gateway"):
        return {}
    names = {"mgm_gateway_engine_retries_total": "engine_retries", "mgm_gateway_rejected_total": "rejected"}
    found = dict.fromkeys(names.values(), 0.0)
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in names:
            found[names[name]] += float(line.rsplit(" ", 1)[1])
    return found


def batch_stats(worker: str) -> dict[str, float]:
    """Pipeline calls, images and busy seconds so far, from the worker's Prometheus histograms."""
    names = {"mgm_sdxl_batch_images_count": "calls", "mgm_sdxl_batch_images_sum": "images",
             "mgm_sdxl_batch_seconds_sum": "seconds"}
    found = dict.fromkeys(names.values(), 0.0)
    for line in httpx.get(f"{worker}/metrics", timeout=10).text.splitlines():
        name, _, value = line.partition(" ")
        if name in names:
            found[names[name]] += float(value)
    return found


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="BENCHMARKS.md", help="markdown file whose sections are rewritten")
    ap.add_argument("--results", type=Path, default=report.RESULTS, help=f"where {RESULT}.json is written")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64])
    ap.add_argument("--rates", type=float, nargs="+", default=[8, 32, 64], help="open-loop request rates (req/s)")
    ap.add_argument("--per-level", type=int, default=2, help="closed loop: requests per unit of concurrency")
    ap.add_argument("--cap", type=int, default=128, help="closed loop: at most this many requests per level")
    ap.add_argument("--open-requests", type=int, default=64, help="open loop: requests per rate")
    ap.add_argument("--time-limit", type=float, default=60.0, help="seconds a level may send requests")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--mixed-concurrency", type=int, default=16)
    ap.add_argument("--mixed-requests", type=int, default=60)
    ap.add_argument("--sdxl-concurrency", type=int, default=8)
    ap.add_argument("--sdxl-requests", type=int, default=96)
    ap.add_argument("--hd-concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--hd-image-size", type=int, default=256)
    ap.add_argument("--responses-concurrency", type=int, default=32)
    ap.add_argument("--responses-requests", type=int, default=128)
    ap.add_argument("--responses-rounds", type=int, default=7)
    ap.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES)
    ap.add_argument("--skip-vllm-bench", action="store_true")
    ap.add_argument("--engine-arg", action="append", default=[], metavar="ARG",
                    help="extra `mgm engine` argument, repeatable, e.g. --engine-arg=--cpu-threads-bind --engine-arg=0")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ensure_checkpoints()
    bench = Bench(args)
    bench.data["machine"] = report.cpu_name()
    stored = args.results / f"{RESULT}.json"
    if stored.exists() and set(args.phases) != set(PHASES):
        old = json.loads(stored.read_text())  # a partial re-run keeps the other phases' results (and says so)
        reruns = [r for r in old.get("reruns", []) if not set(r["phases"]) <= set(args.phases)]
        reruns.append({"phases": list(args.phases), "started": bench.data["started"]})
        bench.data = {**old, **{k: v for k, v in bench.data.items() if k not in ("phases_s", "started")},
                      "phases_s": old.get("phases_s", {}), "reruns": reruns}
    t0 = time.monotonic()
    steps = {"baseline": bench.baseline, "stack": bench.our_stack, "sdxl": bench.sdxl_pool, "hd": bench.hd,
             "small": bench.small, "responses": bench.responses}
    for name in args.phases:
        bench.phase(name, steps[name])
    bench.data["total_s"] = round(time.monotonic() - t0, 1) if "reruns" not in bench.data else round(
        sum(bench.data["phases_s"].values()), 1)  # after partial re-runs: every phase's own time
    bench.save()
    report.render(args.out, ["serving-cpu", "sdxl-pool-cpu"], args.results)


if __name__ == "__main__":
    main()
