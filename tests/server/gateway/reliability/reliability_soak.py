"""Soak test (opt-in: ``make soak``): the whole stack on loopback under a bounded loop of mixed traffic.

    .venv/bin/python tests/server/gateway/reliability/reliability_soak.py [--seconds 180] [--concurrency 8] [--no-doc]

Starts one `mgm engine` (tiny checkpoint, .cache/tiny-mgm), one `mgm sdxl-worker` (tiny pipeline, .cache/tiny-sdxl)
and `mgm gateway` (loopback image URLs allowed, for a local file server), then for ``--seconds`` (at most 600) keeps
``--concurrency`` clients busy with a fixed mix: text chat, streaming chat, chat with a data-URL image, chat with an
http image URL, clients hanging up mid-stream, bad requests (expected 4xx), images API calls. Every answer is checked
against the status its kind expects; anything else is an unexpected error. The gateway's, engine's and worker's
memory (RSS of their process trees) is sampled every 5 s. Prints the figures and writes them into RELIABILITY.md's
``soak`` section; exits 1 on any unexpected error.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reliability_cases import PNG, data_url  # noqa: E402
from reliability_table import ROOT, update_doc  # noqa: E402

from server.procs import Child, free_ports, stop_children  # noqa: E402

#: kind → (weight, statuses that count as expected)
MIX = {"chat": (30, {200}), "stream": (25, {200}), "data-url image": (15, {200}), "http image": (10, {200}),
       "hang up mid-stream": (5, {200}), "bad request": (10, {400, 404}), "images API": (5, {200}),
       "image edit": (3, {200}), "responses": (5, {200}), "responses stream": (4, {200}), "tool call": (4, {200})}
TOOL = {"type": "function", "function": {"name": "lookup", "description": "Look a number up.", "parameters": {
    "type": "object", "properties": {"number": {"type": "integer"}}, "required": ["number"]}}}


class _Files(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # type: ignore[no-untyped-def]
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(PNG)))
        self.end_headers()
        self.wfile.write(PNG)


def _checkpoints(cache: Path) -> tuple[Path, Path]:
    from loadtests.stack import ensure_tiny

    model = ensure_tiny(cache / "tiny-mgm")
    sdxl = cache / "tiny-sdxl"
    if not (sdxl / "model_index.json").exists():
        from server.sdxl.tiny import build_tiny_sdxl

        build_tiny_sdxl(sdxl, seed=0)
    return model, sdxl


def _stack(model: Path, sdxl: Path, logs: Path) -> tuple[list[Child], str]:
    e_port, w_port, g_port = free_ports(3)
    run = [sys.executable, "-m", "server"]
    engine = Child("engine", [*run, "engine", "--model", str(model), "--host", "127.0.0.1", "--port", str(e_port),
                              "--max-model-len", "512", "--limit-mm-per-prompt", '{"image": 1}'],
                   logs / "soak-engine.log", ready_url=f"http://127.0.0.1:{e_port}/health")
    worker = Child("sdxl-worker", [*run, "sdxl-worker", "--model", str(sdxl), "--host", "127.0.0.1", "--port",
                                   str(w_port), "--threads", "1", "--max-batch", "4", "--warmup-steps", "1"],
                   logs / "soak-sdxl-worker.log", ready_url=f"http://127.0.0.1:{w_port}/ready")
    gateway = Child("gateway", [*run, "gateway", "--engine", f"http://127.0.0.1:{e_port}", "--sdxl-worker",
                                f"http://127.0.0.1:{w_port}", "--port", str(g_port), "--image-model-name", "sdxl-tiny",
                                "--unsafe-allow-loopback-images"],
                    logs / "soak-gateway.log", ready_url=f"http://127.0.0.1:{g_port}/ready")
    return [engine, worker, gateway], f"http://127.0.0.1:{g_port}"


def _rss_mib(pid: int) -> float:
    try:
        proc = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20
    except psutil.Error:
        return float("nan")


async def _one(client: httpx.AsyncClient, base: str, model: str, kind: str, files: str, rnd: random.Random) -> int:
    text = {"role": "user", "content": f"Tell me about number {rnd.randrange(10**6)}."}
    chat = {"model": model, "max_tokens": rnd.randint(4, 32), "messages": [text]}
    url = base + "/v1/chat/completions"
    if kind == "chat":
        return (await client.post(url, json=chat)).status_code
    if kind in ("stream", "hang up mid-stream"):
        async with client.stream("POST", url, json={**chat, "stream": True, "max_tokens": 64, "ignore_eos": True}) as r:
            lines = 0
            async for _line in r.aiter_lines():
                lines += 1
                if kind == "hang up mid-stream" and lines >= 6:
                    break
            return r.status_code
    if kind in ("data-url image", "http image"):
        image = data_url(PNG) if kind == "data-url image" else f"{files}/img.png?{rnd.randrange(10**9)}"
        body = {**chat, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "What is this?"}]}]}
        return (await client.post(url, json=body)).status_code
    if kind == "bad request":
        bad = rnd.choice([{**chat, "temperature": 9}, {**chat, "model": "nope"}, {"messages": []},
                          {**chat, "messages": [{"role": "user", "content": [
                              {"type": "image_url", "image_url": {"url": "http://169.254.169.254/"}}]}]}])
        return (await client.post(url, json=bad)).status_code
    if kind == "tool call":
        body = {**chat, "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "lookup"}},
                "max_tokens": 48}
        return (await client.post(url, json=body)).status_code
    if kind in ("responses", "responses stream"):
        body = {"model": model, "input": text["content"], "max_output_tokens": rnd.randint(4, 32),
                "store": rnd.random() < 0.5}
        if kind == "responses":
            return (await client.post(base + "/v1/responses", json=body)).status_code
        async with client.stream("POST", base + "/v1/responses", json={**body, "stream": True}) as r:
            async for _line in r.aiter_lines():
                pass
            return r.status_code
    if kind == "image edit":
        form = {"prompt": "make it blue", "num_inference_steps": "2", "enhance_prompt": "false",
                "response_format": "b64_json"}
        files_ = {"image": ("in.png", PNG, "image/png")}
        return (await client.post(base + "/v1/images/edits", data=form, files=files_)).status_code
    body = {"prompt": "a lighthouse", "size": "64x64", "num_inference_steps": 2, "enhance_prompt": False,
            "response_format": "b64_json"}
    return (await client.post(base + "/v1/images/generations", json=body)).status_code


async def _traffic(base: str, files: str, seconds: float, concurrency: int, seed: int) -> tuple[Counter, Counter, int]:
    rnd = random.Random(seed)
    kinds, weights = list(MIX), [w for w, _ in MIX.values()]
    outcomes: Counter = Counter()
    unexpected: Counter = Counter()
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=120) as client:
        model = (await client.get(base + "/v1/models")).json()["data"][0]["id"]

        async def loop() -> None:
            while time.monotonic() < deadline:  # bounded by the deadline
                kind = rnd.choices(kinds, weights)[0]
                try:
                    status = await _one(client, base, model, kind, files, rnd)
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                outcomes[(kind, status)] += 1
                if status not in MIX[kind][1]:
                    unexpected[(kind, status)] += 1

        await asyncio.gather(*(loop() for _ in range(concurrency)))
    return outcomes, unexpected, sum(outcomes.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("MGM_SOAK_SECONDS", "180")))
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=ROOT / ".cache")
    parser.add_argument("--no-doc", action="store_true", help="do not write RELIABILITY.md")
    args = parser.parse_args(argv)
    seconds = min(max(args.seconds, 10.0), 600.0)  # opt-in, but never more than 10 minutes of traffic
    model, sdxl = _checkpoints(args.cache_dir)
    children, base = _stack(model, sdxl, args.cache_dir / "logs")
    files = ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    files.daemon_threads = True
    threading.Thread(target=files.serve_forever, daemon=True).start()
    try:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE",
                                                                                             "1")}
        for child in children:
            child.start(env=env, cwd=ROOT)
        deadline = time.monotonic() + 300
        while not all(c.check_ready() for c in children):  # bounded by the deadline
            dead = [c for c in children if c.poll() is not None]
            if dead or time.monotonic() > deadline:
                for c in dead or children:
                    print(f"{c.name} not ready:\n{c.log_tail()}", file=sys.stderr)
                return 1
            time.sleep(0.5)
        samples: dict[str, list[float]] = {c.name: [] for c in children}
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(5.0):  # until the traffic is over
                for c in children:
                    samples[c.name].append(_rss_mib(c.pid))

        for c in children:
            samples[c.name].append(_rss_mib(c.pid))
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        print(f"soak: {seconds:.0f} s of mixed traffic, {args.concurrency} concurrent clients, against {base}")
        t0 = time.monotonic()
        outcomes, unexpected, total = asyncio.run(_traffic(base, f"http://127.0.0.1:{files.server_address[1]}",
                                                           seconds, args.concurrency, args.seed))
        took = time.monotonic() - t0
        stop.set()
        sampler.join()
        for c in children:
            samples[c.name].append(_rss_mib(c.pid))
    finally:
        files.shutdown()
        stop_children(children, timeout=30)
    per_kind = Counter()
    for (kind, _status), n in outcomes.items():
        per_kind[kind] += n
    lines = [f"Measured by `make soak` on {time.strftime('%Y-%m-%d', time.gmtime())} ({os.cpu_count()} CPU cores, "
             f"tiny checkpoints): {took:.0f} s, {args.concurrency} concurrent clients, {total} requests "
             f"({total / took:.1f}/s), **{sum(unexpected.values())} unexpected errors**.", "",
             "| traffic | requests | expected statuses |", "|---|---|---|"]
    for kind, (_w, ok) in MIX.items():
        lines.append(f"| {kind} | {per_kind[kind]} | {', '.join(map(str, sorted(ok)))} |")
    lines += ["", "| process (RSS of its tree) | start MiB | end MiB | max MiB | growth MiB |", "|---|---|---|---|---|"]
    for name, values in samples.items():
        lines.append(f"| {name} | {values[0]:.0f} | {values[-1]:.0f} | {max(values):.0f} | "
                     f"{values[-1] - values[0]:+.0f} |")
    if unexpected:
        lines += ["", "Unexpected: " + ", ".join(f"{k} {s}: {n}" for (k, s), n in sorted(unexpected.items(),
                                                                                        key=str))]
    report = "\n".join(lines)
    print(report)
    if not args.no_doc:
        doc = ROOT / "RELIABILITY.md"
        doc.write_text(update_doc(doc.read_text(), "soak", report))
        print(f"wrote {doc}")
    return 1 if unexpected else 0


if __name__ == "__main__":
    raise SystemExit(main())
