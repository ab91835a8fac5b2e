"""What the checkpoint-building subcommands (``mgm build-tiny``, ``mgm build-tiny-sdxl``) share: their options
(output directory, seed, ``--force``) and their run (refuse a used directory, build, log the time taken)."""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from pathlib import Path

from server.flags import add_flag

logger = logging.getLogger("mgm.cli")


def add_builder_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, help="output directory")
    add_flag(parser, "--seed", env="MGM_SEED", type=int, default=0, help="RNG seed")
    parser.add_argument("--force", action="store_true", help="write into a non-empty directory")


def output_dir_usable(out: Path, force: bool) -> bool:
    """A checkpoint builder writes into a new or empty directory (or any directory with --force); logs why not."""
    if out.exists() and not out.is_dir():
        logger.error("output path exists and is not a directory", extra={"fields": {"out": str(out)}})
        return False
    if out.is_dir() and any(out.iterdir()) and not force:
        logger.error("output directory is not empty (use --force)", extra={"fields": {"out": str(out)}})
        return False
    return True


def run_builder(args: argparse.Namespace, build: Callable[[Path], object]) -> int:
    """``build(args.out)`` unless the directory is in use (exit 2); ``build`` imports the heavy libraries itself."""
    out: Path = args.out
    if not output_dir_usable(out, args.force):
        return 2
    start = time.perf_counter()
    build(out)
    logger.info("done", extra={"fields": {"out": str(out), "seconds": round(time.perf_counter() - start, 2)}})
    return 0
