"""The official serving path, re-created for benchmarks: how MGM is served today (docs/mgm.md §8).

The official ``mgm/serve/model_worker.py`` is a FastAPI app that, per request, acquires an ``asyncio.Semaphore``
(``--limit-model-concurrency``, default 5), returns a ``StreamingResponse`` over a *sync* generator (so Starlette
iterates it in its thread pool) that preprocesses the image, starts ``model.generate(..., streamer=
TextIteratorStreamer)`` in a ``threading.Thread`` — batch size 1, one HF ``generate`` per request — and yields the
streamer's text; the semaphore is released in a background task once the response is sent. This module does the
same around :class:`bench.baselines.mgm_hf.MGMReference` at serving precision (float32 on CPU; the official
fp16 has no fast CPU kernels), with the prompt built by the official template and ``tokenizer_image_token`` rule.

Only the wire format differs: OpenAI ``/v1/chat/completions`` (SSE deltas, ``stream_options.include_usage``)
instead of the worker's NUL-separated JSON, so the same load generator drives both stacks. ``ignore_eos`` maps to
HF ``min_new_tokens = max_tokens`` (the same fixed output length as vLLM's ``ignore_eos``).

    python -m bench.baselines.official_server --model DIR --port 8010 [--limit-model-concurrency 5]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import logging
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from server.errors import APIError
from server.gateway import sse
from server.procs import Child

logger = logging.getLogger("mgm.baseline")

MAX_NEW_TOKENS = 1024  # the official worker's cap


class BadRequest(ValueError):
    pass


@dataclass
class Job:
    prompt: str
    images: list[Any]  # PIL images
    max_tokens: int
    temperature: float
    ignore_eos: bool


def decode_image(url: str):  # type: ignore[no-untyped-def]
    from PIL import Image

    if not url.startswith("data:") or ";base64," not in url:
        raise BadRequest("the baseline accepts data: URLs with base64 images only")
    try:
        image = Image.open(io.BytesIO(base64.b64decode(url.split(";base64,", 1)[1])))
        image.load()
    except Exception as exc:  # PIL raises many kinds
        raise BadRequest(f"undecodable image: {exc}") from None
    return image.convert("RGB")


def parse_job(body: dict[str, Any], template: str) -> Job:
    """OpenAI chat body → prompt in the official template with one ``<image>`` per image part, images first."""
    from engine.prompt import render_prompt

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list")
    images = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") == "image_url":
                    images.append(decode_image(str((part.get("image_url") or {}).get("url", ""))))
    try:
        prompt = render_prompt(messages, template)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    max_tokens = 256 if max_tokens is None else max_tokens
    if not isinstance(max_tokens, int) or not 1 <= max_tokens <= MAX_NEW_TOKENS:
        raise BadRequest(f"max_tokens must be an integer in [1, {MAX_NEW_TOKENS}]")
    temperature = float(body.get("temperature", 0.2) or 0.0)  # official default 0.2
    return Job(prompt, images, max_tokens, temperature, bool(body.get("ignore_eos", False)))


class Worker:
    """The model and one ``generate`` per request, as ``ModelWorker.generate_stream``."""

    def __init__(self, model_dir: Path, dtype: str = "float32") -> None:
        import torch
        from transformers import AutoTokenizer

        from engine.config import register_configs
        from engine.prompt import choose_template, stop_token_ids
        from bench.baselines.mgm_hf import MGMReference

        register_configs()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = MGMReference(model_dir, placeholder_id=tokenizer.unk_token_id or 0,
                                  dtype=getattr(torch, dtype))
        self.tokenizer = self.model.tokenizer
        self.template = choose_template(self.model.config, self.tokenizer)
        # EOS plus the template's single-token stop strings, as the worker's stop check ends generation on them
        self.stop_ids = sorted({self.tokenizer.eos_token_id, *stop_token_ids(self.tokenizer, self.template)} - {None})
        self.name = model_dir.name

    def generate_stream(self, job: Job, usage: dict[str, int]) -> Iterator[str]:
        """Text pieces as the streamer releases them; ``usage`` is filled in when generation ends."""
        import torch
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=60)
        failure: list[BaseException] = []

        def run() -> None:
            try:
                with torch.inference_mode():
                    embeds = self.model.embed(job.prompt, job.images).embeds  # vision towers + text embeddings
                    kwargs: dict[str, Any] = dict(
                        inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                        max_new_tokens=job.max_tokens, streamer=streamer, use_cache=True, eos_token_id=self.stop_ids,
                        pad_token_id=self.tokenizer.eos_token_id, do_sample=job.temperature > 0)
                    if job.temperature > 0:
                        kwargs["temperature"] = job.temperature
                    if job.ignore_eos:
                        kwargs["min_new_tokens"] = job.max_tokens
                    out = self.model.llm.generate(**kwargs)
                usage["prompt_tokens"] = int(embeds.shape[1])
                usage["completion_tokens"] = int(out.shape[1])
            except BaseException as exc:  # surfaced to the client below
                failure.append(exc)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        for piece in streamer:  # stop tokens are special tokens: the streamer already leaves them out
            if piece:
                yield piece
        thread.join()
        if failure:
            raise RuntimeError(f"generation failed: {failure[0]}")


def create_app(worker: Worker, limit_model_concurrency: int = 5) -> FastAPI:
    app = FastAPI(title="MGM official serving path (baseline)")
    semaphore = asyncio.Semaphore(limit_model_concurrency)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": worker.name, "object": "model", "owned_by": "baseline"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):  # type: ignore[no-untyped-def]
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise BadRequest("the body must be a JSON object")
            job = parse_job(body, worker.template)
        except (BadRequest, json.JSONDecodeError) as exc:
            return APIError(400, str(exc)).response()
        created, rid = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
        usage: dict[str, int] = {}
        await semaphore.acquire()  # released once the response is sent, as the official worker does
        loop, once = asyncio.get_running_loop(), threading.Lock()

        def release() -> None:  # exactly once, from whichever thread finishes the response first
            if once.acquire(blocking=False):
                loop.call_soon_threadsafe(semaphore.release)

        if not body.get("stream"):
            try:
                text = await asyncio.to_thread(lambda: "".join(worker.generate_stream(job, usage)))
            except RuntimeError as exc:
                release()
                return APIError(500, str(exc)).response()
            return JSONResponse({
                "id": rid, "object": "chat.completion", "created": created, "model": worker.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}],
                "usage": {**usage, "total_tokens": sum(usage.values())}}, background=BackgroundTask(release))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def stream() -> Iterator[bytes]:  # sync: Starlette runs it in its thread pool, like the worker's generator
            def chunk(delta: dict[str, Any] | None, finish: str | None = None, **extra: Any) -> bytes:
                choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
                return sse.encode({"id": rid, "object": "chat.completion.chunk", "created": created,
                                   "model": worker.name, "choices": choices, **extra})
            first = True
            try:
                for piece in worker.generate_stream(job, usage):
                    yield chunk({"role": "assistant", "content": piece} if first else {"content": piece})
                    first = False
                yield chunk({}, "length")
                if include_usage:
                    yield chunk(None, usage={**usage, "total_tokens": sum(usage.values())})
            except RuntimeError as exc:
                yield sse.encode(APIError(500, str(exc)).body())
            finally:  # also when the client went away mid-stream (the background task then never runs)
                release()
            yield sse.DONE_EVENT

        return StreamingResponse(stream(), media_type="text/event-stream", background=BackgroundTask(release))

    return app


def child(model: Path, port: int, logs: Path, concurrency: int = 5) -> Child:
    """This server as a child process on loopback (loadtests.stack runs it like the servers of our stack)."""
    argv = [sys.executable, "-m", "bench.baselines.official_server", "--model", str(model), "--port", str(port),
            "--limit-model-concurrency", str(concurrency)]
    return Child("baseline", argv, logs / "baseline.log", ready_url=f"http://127.0.0.1:{port}/health")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="MGM checkpoint directory")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8010)
    ap.add_argument("--limit-model-concurrency", type=int, default=5, help="the official worker's default: 5")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    args = ap.parse_args(argv)
    import uvicorn

    logging.basicConfig(level=logging.INFO)
    worker = Worker(args.model, args.dtype)
    uvicorn.run(create_app(worker, args.limit_model_concurrency), host=args.host, port=args.port,
                log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
