"""``mgm`` command line (console script ``mgm = server.cli:main``).

Each subcommand is registered by one ``_add_<name>(subparsers)`` function listed in :data:`SUBCOMMANDS`; a handler
imports its heavy dependencies itself, so ``mgm --help`` stays fast and never imports torch or vLLM. Later
subcommands (``engine``, ``serve``, ``sdxl-worker``, ``gateway``) plug in the same way.

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


def _run_build_tiny(args: argparse.Namespace) -> int:
    out: Path = args.out
    if args.backbone not in _BACKBONES:  # an env default bypasses argparse's choices check
        logger.error("unknown backbone (from $MGM_TINY_BACKBONE?)", extra={"fields": {"backbone": args.backbone}})
        return 2
    if out.exists() and not out.is_dir():
        logger.error("output path exists and is not a directory", extra={"fields": {"out": str(out)}})
        return 2
    if out.is_dir() and any(out.iterdir()) and not args.force:
        logger.error("output directory is not empty (use --force)", extra={"fields": {"out": str(out)}})
        return 2
    from engine.tiny import build_tiny  # heavy: torch, transformers, tokenizers

    start = time.perf_counter()
    build_tiny(out, backbone=args.backbone, hd=args.hd, seed=args.seed, dtype=args.dtype,
               legacy_names=args.legacy_names, progress=sys.stderr.isatty())
    logger.info("done", extra={"fields": {"out": str(out), "seconds": round(time.perf_counter() - start, 2)}})
    return 0


# --- entry point ----------------------------------------------------------------------------------------------------

#: Subcommand registrars, in help order.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_build_tiny]


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
    args = parser.parse_args(argv)
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
