"""Image edits and streamed previews on CPU (tiny random SDXL and MGM), through the real stack: `mgm engine`,
`mgm sdxl-worker` and `mgm gateway` on loopback, driven with aiohttp like the SDKs drive them.

    python -m bench.images_cpu --out BENCHMARKS.md      # ~3 min on 2 cores; `make bench` runs it

1. Latency, one request at a time (``--repeats`` each, medians): text-to-image, img2img edit, inpainting edit, and an
   edit that MGM re-captions seeing the image (``enhance_prompt: true``), each streamed with ``partial_images`` so
   the time to the first preview and to the final image come from the same request; plus the same edit unstreamed.
2. Batching of edit jobs: ``--batch-requests`` img2img edits at concurrency 4 against a worker that batches up to 4
   images per pipeline call and one that never batches (images/s, mean batch from the worker's metrics).

Results go to bench/results/images_cpu.json; bench/report.py renders the BENCHMARKS.md section from it.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench import report
from bench.serving import LOGS, TINY, TINY_SDXL, batch_stats, ensure_checkpoints, model_id
from loadtests import stack
from server.procs import free_ports

RESULT = "images_cpu"


def _png(size: tuple[int, int], mask: bool = False) -> bytes:
    from PIL import Image

    if mask:  # OpenAI's mask: the left half transparent (redrawn)
        img = Image.new("RGBA", size, (0, 0, 0, 255))
        img.paste((0, 0, 0, 0), (0, 0, size[0] // 2, size[1]))
    else:
        img = Image.effect_mandelbrot(size, (-2.0, -1.5, 1.0, 1.5), 60).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


async def _request(session: Any, base: str, kind: str, fields: dict[str, Any], image: bytes | None,
                   mask: bytes | None) -> dict[str, Any]:
    """One request; for a stream, the seconds to the first preview and to the final image."""
    import aiohttp

    start = time.perf_counter()
    if kind == "generate":
        call = session.post(f"{base}/v1/images/generations", json=fields)
    else:
        form = aiohttp.FormData()
        form.add_field("image", image, filename="image.png", content_type="image/png")
        if mask is not None:
            form.add_field("mask", mask, filename="mask.png", content_type="image/png")
        for k, v in fields.items():
            form.add_field(k, json.dumps(v) if isinstance(v, bool) else str(v))
        call = session.post(f"{base}/v1/images/edits", data=form)
    first = final = None
    previews = 0
    async with call as r:
        if r.status != 200:
            raise RuntimeError(f"{kind}: HTTP {r.status}: {(await r.text())[:300]}")
        if not fields.get("stream"):
            await r.read()
            final = time.perf_counter() - start
        else:
            async for line in r.content:
                if not line.startswith(b"data: "):
                    continue
                event = json.loads(line[6:])
                if event["type"].endswith("partial_image"):
                    previews += 1
                    first = first if first is not None else time.perf_counter() - start
                elif event["type"].endswith("completed"):
                    final = time.perf_counter() - start
                elif event["type"] == "error":
                    raise RuntimeError(f"{kind}: {event['error']}")
    return {"first_preview_s": first, "final_s": final, "previews": previews}


def _median(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


async def latency(base: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    import aiohttp

    side = args.size
    image, mask = _png((side, side)), _png((side, side), mask=True)
    common = {"size": f"{side}x{side}", "num_inference_steps": args.steps, "response_format": "b64_json",
              "enhance_prompt": False}
    streamed = {**common, "stream": True, "partial_images": args.partial_images}
    cases = [("text-to-image", "generate", {**streamed, "prompt": "a lighthouse at dusk"}, None),
             ("img2img edit", "edit", {**streamed, "prompt": "make it snowy", "strength": 0.8}, None),
             ("inpainting edit", "edit", {**streamed, "prompt": "a red door"}, mask),
             ("img2img edit, MGM re-captions", "edit", {**streamed, "prompt": "make it snowy", "strength": 0.8,
                                                        "enhance_prompt": True}, None),
             ("img2img edit, not streamed", "edit", {**common, "prompt": "make it snowy", "strength": 0.8}, None)]
    rows = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        for name, kind, fields, case_mask in cases:
            await _request(session, base, kind, fields, image, case_mask)  # warm-up
            runs = [await _request(session, base, kind, fields, image, case_mask) for _ in range(args.repeats)]
            row = {"case": name, "repeats": args.repeats, "previews": runs[0]["previews"],
                   "first_preview_s": _median([r["first_preview_s"] for r in runs]),
                   "final_s": _median([r["final_s"] for r in runs])}
            rows.append(row)
            print(f"{name}: {row}", flush=True)
    return rows


async def burst(base: str, args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp

    side = args.size
    image = _png((side, side))
    fields = {"prompt": "make it snowy", "size": f"{side}x{side}", "num_inference_steps": args.steps,
              "strength": 0.8, "response_format": "b64_json", "enhance_prompt": False}
    sem = asyncio.Semaphore(args.concurrency)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        await _request(session, base, "edit", fields, image, None)

        async def one() -> None:
            async with sem:
                await _request(session, base, "edit", fields, image, None)

        start = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(args.batch_requests)))
        elapsed = time.perf_counter() - start
    return {"requests": args.batch_requests, "concurrency": args.concurrency, "seconds": elapsed,
            "images_per_s": args.batch_requests / elapsed}


def run(args: argparse.Namespace) -> dict[str, Any]:
    ensure_checkpoints()
    LOGS.mkdir(parents=True, exist_ok=True)
    cores = len(os.sched_getaffinity(0))
    data: dict[str, Any] = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                            "machine": report.cpu_name(), "size": args.size, "steps": args.steps,
                            "partial_images": args.partial_images, "threads": cores}
    p_engine, = free_ports(1)
    with stack.running([stack.engine(TINY, p_engine, LOGS, name="images-engine")]) as (engine,):
        data["model"] = model_id(stack.base_url(engine))
        batching = []
        for max_batch in (4, 1):
            p_worker, p_gateway = free_ports(2)
            worker = stack.sdxl_worker(TINY_SDXL, p_worker, LOGS, "images-worker", cores, max_batch)
            gateway = stack.gateway(p_gateway, [stack.base_url(engine)], [stack.base_url(worker)], LOGS,
                                    name="images-gateway", extra=["--sdxl-max-in-flight", str(max_batch)])
            with stack.running([worker, gateway]):
                base = stack.base_url(gateway)
                if max_batch == 4:
                    data["latency"] = asyncio.run(latency(base, args))
                before = batch_stats(stack.base_url(worker))
                row = asyncio.run(burst(base, args))
                after = batch_stats(stack.base_url(worker))
                calls = after["calls"] - before["calls"]
                row.update({"max_batch": max_batch, "pipeline_calls": calls,
                            "mean_batch": (after["images"] - before["images"]) / calls if calls else None})
                batching.append(row)
                print(f"edit burst, max batch {max_batch}: {row}", flush=True)
        data["batching"] = batching
    return data


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="BENCHMARKS.md")
    ap.add_argument("--results", type=Path, default=report.RESULTS)
    ap.add_argument("--size", type=int, default=128, help="image side (pixels)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--partial-images", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch-requests", type=int, default=24)
    ap.add_argument("--concurrency", type=int, default=4)
    args = ap.parse_args(argv)
    report.save(RESULT, run(args), args.results)
    report.render(args.out, ["images-cpu"], args.results)


if __name__ == "__main__":
    main()
