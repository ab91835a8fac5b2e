"""``mgm build-tiny-sdxl`` and ``mgm sdxl-worker`` (registered by :mod:`server.cli`).

Flag defaults come from :class:`server.sdxl.config.WorkerConfig`. Nothing heavy is imported at module level:
handlers import torch, diffusers and uvicorn themselves, so ``mgm --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from server.builder_cli import add_builder_options, run_builder
from server.flags import SubParsers, add_flag, defaults
from server.sdxl.config import WorkerConfig
from server.sdxl.pipeline import ATTENTIONS, DEVICES, DTYPES

logger = logging.getLogger("mgm.cli")

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8100
DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0


def register(sub: SubParsers, common: argparse.ArgumentParser) -> None:
    _add_build_tiny_sdxl(sub, common)
    _add_sdxl_worker(sub, common)


def _add_build_tiny_sdxl(sub: SubParsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "build-tiny-sdxl", parents=[common],
        help="write a small seeded random SDXL pipeline (diffusers layout) for CPU tests",
        description="Write a tiny, seeded random StableDiffusionXLPipeline (UNet with text_time conditioning, both "
        "CLIP text encoders and tokenizers, VAE, Euler scheduler) with save_pretrained. Random weights: it renders "
        "noise, fast.",
    )
    add_builder_options(p)
    p.set_defaults(handler=run_build_tiny_sdxl)


def run_build_tiny_sdxl(args: argparse.Namespace) -> int:
    def build(out: Path) -> None:
        from server.sdxl.pipeline import route_library_logs
        from server.sdxl.tiny import build_tiny_sdxl  # heavy: torch, diffusers, transformers

        route_library_logs()
        logger.info("building tiny SDXL pipeline", extra={"fields": {"out": str(out), "seed": args.seed}})
        build_tiny_sdxl(out, seed=args.seed, progress=sys.stderr.isatty())

    return run_builder(args, build)


def _add_sdxl_worker(sub: SubParsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "sdxl-worker", parents=[common],
        help="serve an SDXL pipeline over HTTP (job queue, batching, cancellation, metrics)",
        description="Serve StableDiffusionXLPipeline over HTTP: POST /v1/generate, GET /health, /ready, /metrics. "
        "Queued requests with the same size, steps and guidance share one pipeline call.",
    )
    d = defaults(WorkerConfig)
    add_flag(p, "--model", env="MGM_SDXL_MODEL", type=Path, required=True, help="diffusers SDXL directory")
    add_flag(p, "--model-name", env="MGM_SDXL_MODEL_NAME", default=d.model_name, shown_default="the directory name",
             help="name reported in responses")
    add_flag(p, "--host", env="MGM_SDXL_HOST", default=DEFAULT_HOST)
    add_flag(p, "--port", env="MGM_SDXL_PORT", type=int, default=DEFAULT_PORT)
    add_flag(p, "--device", env="MGM_SDXL_DEVICE", choices=DEVICES, default=d.device,
             help="auto: cuda when available")
    add_flag(p, "--dtype", env="MGM_SDXL_DTYPE", choices=DTYPES, default=d.dtype,
             help="auto: float16 on CUDA (the official pipeline's; the VAE decodes upcast), float32 on CPU")
    add_flag(p, "--attention", env="MGM_SDXL_ATTENTION", choices=ATTENTIONS, default=d.attention,
             help="auto: xformers on CUDA when installed, else PyTorch SDPA")
    add_flag(p, "--variant", env="MGM_SDXL_VARIANT", default=d.variant,
             help="weights variant, e.g. fp16 for *.fp16.safetensors; auto: fp16 when running float16 and the "
             "checkpoint has such files (the official setting), else the full-precision files")
    p.add_argument("--no-vae-slicing", dest="vae_slicing", action="store_false", default=d.vae_slicing,
                   help="decode a batch in one VAE call (more memory)")
    add_flag(p, "--threads", env="MGM_SDXL_THREADS", type=int, default=d.threads, shown_default="torch's default",
             help="CPU intra-op threads, 0 = torch's default")
    add_flag(p, "--max-batch", env="MGM_SDXL_MAX_BATCH", type=int, default=d.max_batch,
             help="images per pipeline call and per request")
    add_flag(p, "--max-queue", env="MGM_SDXL_MAX_QUEUE", type=int, default=d.max_queue,
             help="waiting jobs before 429")
    add_flag(p, "--batch-wait-ms", env="MGM_SDXL_BATCH_WAIT_MS", type=float, default=d.batch_wait_s * 1000,
             help="how long an idle worker waits for companions of a lone job")
    add_flag(p, "--job-timeout", env="MGM_SDXL_JOB_TIMEOUT", type=float, default=d.job_timeout_s,
             help="seconds before a job is abandoned with 504")
    add_flag(p, "--warmup-steps", env="MGM_SDXL_WARMUP_STEPS", type=int, default=d.warmup_steps,
             help="steps of the start-up warm-up generation, 0 = none")
    add_flag(p, "--oom-cooldown", env="MGM_SDXL_OOM_COOLDOWN", type=float, default=d.oom_cooldown_s,
             help="seconds not-ready after an out-of-memory batch (memory freed first)")
    add_flag(p, "--max-side", env="MGM_SDXL_MAX_SIDE", type=int, default=d.max_side,
             help="largest width/height accepted")
    add_flag(p, "--max-steps", env="MGM_SDXL_MAX_STEPS", type=int, default=d.max_steps,
             help="largest num_inference_steps accepted")
    add_flag(p, "--shutdown-timeout", env="MGM_SDXL_SHUTDOWN_TIMEOUT", type=float, default=DEFAULT_SHUTDOWN_TIMEOUT_S,
             help="on SIGTERM, seconds to let running requests finish")
    p.add_argument("--no-access-log", dest="access_log", action="store_false", help="no per-request log line")
    p.set_defaults(handler=run_sdxl_worker)


def run_sdxl_worker(args: argparse.Namespace) -> int:
    if not (args.model / "model_index.json").is_file():
        logger.error("not a diffusers pipeline directory (no model_index.json)",
                     extra={"fields": {"model": str(args.model)}})
        return 2
    if not 0 <= args.port <= 65535:
        logger.error("invalid --port", extra={"fields": {"port": args.port}})
        return 2
    import uvicorn

    from server.sdxl.pipeline import resolve_device, resolve_dtype, route_library_logs
    from server.sdxl.worker import create_app

    route_library_logs()
    config = WorkerConfig(
        model=args.model, model_name=args.model_name, device=args.device, dtype=args.dtype, attention=args.attention,
        variant=args.variant, vae_slicing=args.vae_slicing, threads=args.threads or None, max_batch=args.max_batch,
        max_queue=args.max_queue, batch_wait_s=args.batch_wait_ms / 1000, job_timeout_s=args.job_timeout,
        warmup_steps=args.warmup_steps, max_side=args.max_side, max_steps=args.max_steps,
        oom_cooldown_s=args.oom_cooldown,
    )
    try:
        config.validate()
        resolve_dtype(args.dtype, resolve_device(args.device))  # fail now, not in the inference thread
    except ValueError as exc:
        logger.error(str(exc))
        return 2
    server = uvicorn.Server(uvicorn.Config(
        create_app(config), host=args.host, port=args.port, log_config=None, access_log=args.access_log,
        timeout_graceful_shutdown=args.shutdown_timeout,
    ))
    logger.info("starting SDXL worker", extra={"fields": {
        "url": f"http://{args.host}:{args.port}", "model": str(args.model), "max_batch": config.max_batch,
        "max_queue": config.max_queue}})
    server.run()
    return 0 if server.started else 1
