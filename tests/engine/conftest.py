"""Shared fixtures for the engine tests: registered configs and tiny checkpoints built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# vLLM on CPU (read when vLLM is imported and by its spawned processes): an explicit KV cache size skips the
# RAM-fraction check that fails on small machines; bind the worker to every CPU (auto binding reserves one).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(str(c) for c in sorted(os.sched_getaffinity(0))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from engine.config import register_configs


@pytest.fixture(scope="session", autouse=True)
def _registered() -> None:
    # Tokenizer loading reads config.json; without registration transformers falls back and warns.
    register_configs()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """Factory ``(backbone, hd=False, seed=0) -> Path``; each distinct checkpoint is built once."""
    from engine.tiny import build_tiny

    cache: dict[tuple[str, bool, int], Path] = {}

    def get(backbone: str, hd: bool = False, seed: int = 0) -> Path:
        key = (backbone, hd, seed)
        if key not in cache:
            cache[key] = build_tiny(tmp_path_factory.mktemp(f"tiny-{backbone}-{int(hd)}-{seed}"),
                                    backbone=backbone, hd=hd, seed=seed)  # type: ignore[arg-type]
        return cache[key]

    return get


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_checkpoint):
    from transformers import AutoTokenizer

    cache = {}

    def get(backbone: str):
        if backbone not in cache:
            cache[backbone] = AutoTokenizer.from_pretrained(tiny_checkpoint(backbone))
        return cache[backbone]

    return get
