"""Options and handlers of ``mgm build-tiny-sdxl`` and ``mgm sdxl-worker`` (registered by :mod:`server.cli`).

Kept here so that ``server/cli.py`` only lists the subcommands. Nothing heavy is imported at module level: handlers
import torch/diffusers/uvicorn themselves, so ``mgm --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

from server.sdxl.pipeline import ATTENTIONS, DEVICES, DTYPES

logger = logging.getLogger("mgm.cli")

Env = Callable[[str, str], str]


def add_build_tiny_sdxl(sub: argparse._SubParsersAction, common: argparse.ArgumentParser, env: Env) -> None:
    p = sub.add_parser(
        "build-tiny-sdxl",
        parents=[common],
        help="write a small seeded random SDXL pipeline (diffusers layout) for CPU tests",
        description="Write a tiny, seeded random StableDiffusionXLPipeline (UNet with text_time conditioning, both "
        "CLIP text encoders and tokenizers, VAE, Euler scheduler) with save_pretrained. Random weights: it renders "
        "noise, fast.",
    )
    p.add_argument("out", type=Path, help="output directory")
    p.add_argument("--seed", type=int, default=env("MGM_SEED", "0"), help="RNG seed (default: $MGM_SEED or 0)")
    p.add_argument("--force", action="store_true", help="write into a non-empty directory")
    p.set_defaults(handler=run_build_tiny_sdxl)


def run_build_tiny_sdxl(args: argparse.Namespace) -> int:
    out: Path = args.out
    from server.cli import output_dir_usable

    if not output_dir_usable(out, args.force):
        return 2
    from server.sdxl.pipeline import route_library_logs
    from server.sdxl.tiny import build_tiny_sdxl  # heavy: torch, diffusers, transformers

    route_library_logs()

    start = time.perf_counter()
    logger.info("building tiny SDXL pipeline", extra={"fields": {"out": str(out), "seed": args.seed}})
    build_tiny_sdxl(out, seed=args.seed, progress=sys.stderr.isatty())
    logger.info("done", extra={"fields": {"out": str(out), "seconds": round(time.perf_counter() - start, 2)}})
    return 0


def add_sdxl_worker(sub: argparse._SubParsersAction, common: argparse.ArgumentParser, env: Env) -> None:
    p = sub.add_parser(
        "sdxl-worker",
        parents=[common],
        help="serve an SDXL pipeline over HTTP (job queue, batching, cancellation, metrics)",
        description="Serve StableDiffusionXLPipeline over HTTP: POST /v1/generate, GET /health, /ready, /metrics. "
        "Queued requests with the same size, steps and guidance share one pipeline call.",
    )
    model_default = env("MGM_SDXL_MODEL", "")
    p.add_argument("--model", type=Path, default=Path(model_default) if model_default else None,
                   required=not model_default, help="diffusers SDXL directory (default: $MGM_SDXL_MODEL)")
    p.add_argument("--model-name", default=env("MGM_SDXL_MODEL_NAME", "") or None,
                   help="name reported in responses (default: $MGM_SDXL_MODEL_NAME or the directory name)")
    p.add_argument("--host", default=env("MGM_SDXL_HOST", "127.0.0.1"), help="default: $MGM_SDXL_HOST or 127.0.0.1")
    p.add_argument("--port", type=int, default=env("MGM_SDXL_PORT", "8100"), help="default: $MGM_SDXL_PORT or 8100")
    p.add_argument("--device", choices=DEVICES, default=env("MGM_SDXL_DEVICE", "auto"),
                   help="auto: cuda when available (default: $MGM_SDXL_DEVICE or auto)")
    p.add_argument("--dtype", choices=DTYPES, default=env("MGM_SDXL_DTYPE", "auto"),
                   help="auto: bfloat16 (float16 without bf16 support) on CUDA, float32 on CPU "
                   "(default: $MGM_SDXL_DTYPE or auto)")
    p.add_argument("--attention", choices=ATTENTIONS, default=env("MGM_SDXL_ATTENTION", "auto"),
                   help="auto: xformers on CUDA when installed, else PyTorch SDPA (default: $MGM_SDXL_ATTENTION)")
    p.add_argument("--variant", default=env("MGM_SDXL_VARIANT", "") or None,
                   help="weights variant, e.g. fp16 for *.fp16.safetensors (default: $MGM_SDXL_VARIANT)")
    p.add_argument("--no-vae-slicing", dest="vae_slicing", action="store_false",
                   help="decode a batch in one VAE call (more memory)")
    p.add_argument("--threads", type=int, default=env("MGM_SDXL_THREADS", "0"),
                   help="CPU intra-op threads, 0 = torch's default (default: $MGM_SDXL_THREADS or 0)")
    p.add_argument("--max-batch", type=int, default=env("MGM_SDXL_MAX_BATCH", "4"),
                   help="images per pipeline call and per request (default: $MGM_SDXL_MAX_BATCH or 4)")
    p.add_argument("--max-queue", type=int, default=env("MGM_SDXL_MAX_QUEUE", "64"),
                   help="waiting jobs before 429 (default: $MGM_SDXL_MAX_QUEUE or 64)")
    p.add_argument("--batch-wait-ms", type=float, default=env("MGM_SDXL_BATCH_WAIT_MS", "20"),
                   help="how long an idle worker waits for companions of a lone job (default: "
                   "$MGM_SDXL_BATCH_WAIT_MS or 20)")
    p.add_argument("--job-timeout", type=float, default=env("MGM_SDXL_JOB_TIMEOUT", "600"),
                   help="seconds before a job is abandoned with 504 (default: $MGM_SDXL_JOB_TIMEOUT or 600)")
    p.add_argument("--warmup-steps", type=int, default=env("MGM_SDXL_WARMUP_STEPS", "2"),
                   help="steps of the start-up warm-up generation, 0 = none (default: $MGM_SDXL_WARMUP_STEPS or 2)")
    p.add_argument("--max-side", type=int, default=env("MGM_SDXL_MAX_SIDE", "2048"),
                   help="largest width/height accepted (default: $MGM_SDXL_MAX_SIDE or 2048)")
    p.add_argument("--max-steps", type=int, default=env("MGM_SDXL_MAX_STEPS", "200"),
                   help="largest num_inference_steps accepted (default: $MGM_SDXL_MAX_STEPS or 200)")
    p.add_argument("--shutdown-timeout", type=float, default=env("MGM_SDXL_SHUTDOWN_TIMEOUT", "30"),
                   help="on SIGTERM, seconds to let running requests finish (default: $MGM_SDXL_SHUTDOWN_TIMEOUT "
                   "or 30)")
    p.add_argument("--no-access-log", dest="access_log", action="store_false", help="no per-request log line")
    p.set_defaults(handler=run_sdxl_worker)


def run_sdxl_worker(args: argparse.Namespace) -> int:
    # Env defaults bypass argparse's choices check.
    for name, choices in (("device", DEVICES), ("dtype", DTYPES), ("attention", ATTENTIONS)):
        if getattr(args, name) not in choices:
            logger.error(f"invalid --{name} (from $MGM_SDXL_{name.upper()}?)",
                         extra={"fields": {name: getattr(args, name), "choices": list(choices)}})
            return 2
    if not (args.model / "model_index.json").is_file():
        logger.error("not a diffusers pipeline directory (no model_index.json)",
                     extra={"fields": {"model": str(args.model)}})
        return 2
    if not 0 <= args.port <= 65535:
        logger.error("invalid --port", extra={"fields": {"port": args.port}})
        return 2
    import uvicorn

    from server.sdxl.pipeline import resolve_device, resolve_dtype, route_library_logs
    from server.sdxl.worker import WorkerConfig, create_app

    route_library_logs()

    config = WorkerConfig(
        model=args.model, model_name=args.model_name, device=args.device, dtype=args.dtype, attention=args.attention,
        variant=args.variant, vae_slicing=args.vae_slicing, threads=args.threads or None, max_batch=args.max_batch,
        max_queue=args.max_queue, batch_wait_s=args.batch_wait_ms / 1000, job_timeout_s=args.job_timeout,
        warmup_steps=args.warmup_steps, max_side=args.max_side, max_steps=args.max_steps,
    )
    try:
        config.validate()
        resolve_dtype(args.dtype, resolve_device(args.device))  # fail now, not in the inference thread
    except ValueError as exc:
        logger.error(str(exc))
        return 2
    app = create_app(config)
    server = uvicorn.Server(uvicorn.Config(
        app, host=args.host, port=args.port, log_config=None, access_log=args.access_log,
        timeout_graceful_shutdown=args.shutdown_timeout,
    ))
    logger.info("starting SDXL worker", extra={"fields": {
        "url": f"http://{args.host}:{args.port}", "model": str(args.model), "max_batch": config.max_batch,
        "max_queue": config.max_queue}})
    server.run()
    return 0 if server.started else 1
