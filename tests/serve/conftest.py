"""Fixtures for the ``mgm serve`` tests: tiny checkpoints built once into a tmp dir (never .cache/)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(tiny MGM checkpoint, tiny SDXL pipeline), built in-process into a tmp dir (never .cache/)."""
    from engine.tiny import build_tiny
    from server.sdxl.tiny import build_tiny_sdxl

    root = tmp_path_factory.mktemp("serve-models")
    return Path(build_tiny(root / "tiny-mgm", backbone="llama", hd=False, seed=0)), build_tiny_sdxl(
        root / "tiny-sdxl", seed=0)
