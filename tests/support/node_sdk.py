"""Run a script of ``tests/node`` (the official ``openai`` npm package, installed by ``make test``) and read the JSON
summary it prints last. Skipped when node or the package is missing, except under ``MGM_REQUIRE_NODE=1``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

NODE_DIR = Path(__file__).resolve().parents[1] / "node"


def run_node(script: str, *args: str, timeout: float = 600) -> dict[str, Any]:
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / "openai").is_dir():
        if os.environ.get("MGM_REQUIRE_NODE") == "1":
            pytest.fail("node or the openai npm package is missing: run `make test` (it installs tests/node)")
        pytest.skip("node / tests/node/node_modules not installed (make test installs them)")
    run = subprocess.run([node, script, *args], cwd=NODE_DIR, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr[-3000:]
    out: dict[str, Any] = json.loads(run.stdout.strip().splitlines()[-1])
    return out
