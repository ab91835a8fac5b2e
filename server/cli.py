"""``mgm`` command line (console script ``mgm = server.cli:main``): the registry of subcommands.

Each subcommand lives in its own module, which exposes ``register(sub, common)`` (:data:`server.flags.Registrar`);
:data:`SUBCOMMANDS` lists them in help order. Modules import the standard library only at module level and their
handlers import torch, vLLM, diffusers or uvicorn themselves, so ``mgm --help`` stays fast. Options that deployments
set from the environment are declared with :func:`server.flags.add_flag` (an ``MGM_*`` default, checked when the
subcommand parses; the flag wins).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from server import engine_cli, supervisor
from server.flags import Registrar, add_flag
from server.gateway import cli as gateway_cli
from server.logs import LOG_FORMATS, LOG_LEVELS, configure_logging
from server.sdxl import cli as sdxl_cli

logger = logging.getLogger("mgm.cli")

#: Subcommand registrars, in help order: build-tiny and engine, build-tiny-sdxl and sdxl-worker, gateway, serve.
SUBCOMMANDS: list[Registrar] = [engine_cli.register, sdxl_cli.register, gateway_cli.register, supervisor.register]

_LOGGING_OPTIONS = (("--log-level", "MGM_LOG_LEVEL", "INFO", str.upper, LOG_LEVELS),
                    ("--log-format", "MGM_LOG_FORMAT", "text", str.lower, LOG_FORMATS))


def _logging_options(*, after_command: bool) -> argparse.ArgumentParser:
    """The logging options, accepted before and after the subcommand. The copy after it has no default (argparse
    would otherwise let it overwrite a value given before the subcommand)."""
    common = argparse.ArgumentParser(add_help=False)
    for flag, env, default, convert, choices in _LOGGING_OPTIONS:
        if after_command:
            common.add_argument(flag, type=convert, choices=choices, default=argparse.SUPPRESS,
                                help=f"default: ${env} or {default}")
        else:
            add_flag(common, flag, env=env, default=default, type=convert, choices=choices)
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mgm", description="Mini-Gemini inference server tools", parents=[_logging_options(after_command=False)])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _logging_options(after_command=True)
    for register in SUBCOMMANDS:
        register(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # Only subcommands that wrap another program (engine, serve → vLLM) take arguments they do not define.
    args, passthrough = parser.parse_known_args(argv)
    if passthrough and not getattr(args, "accepts_passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(passthrough)}")
    args.passthrough = passthrough
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
