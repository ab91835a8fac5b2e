"""The benchmarks' shared helpers: the memory probes and the mining-weight fixtures, and the layering rule that the
runtime packages never import benchmark or load-test code."""

from __future__ import annotations

import ast
import re
import time
from pathlib import Path

import torch

from bench.measure import PeakRSS, time_calls
from bench.mining import mining_weights
from kernels.contract import PROJECTORS, validate, weight_name

ROOT = Path(__file__).resolve().parents[2]


def test_peak_rss_sees_an_allocation_released_before_exit():
    def work() -> None:
        block = torch.ones(64, 2**20 // 4)  # 64 MiB, touched
        time.sleep(0.05)  # long enough for several samples
        del block

    with PeakRSS() as peak:
        work()
    assert 48 < peak.mb < 256


def test_time_calls_times_every_repeat():
    calls = []
    m = time_calls(lambda: calls.append(1), 3)
    assert len(calls) == len(m["times_s"]) == 3 and m["median_s"] >= 0 and m["peak_mb"] >= 0


def test_mining_weights_meet_the_kernel_contract():
    C, D, chans, G, M = 16, 8, (4, 8, 12, 16), 2, 4
    gen = torch.Generator().manual_seed(0)
    w = mining_weights(C, sum(chans), D, generator=gen, dtype=torch.float64)
    assert set(w) == {weight_name(p, i, k) for p in PROJECTORS for i in (0, 1) for k in ("weight", "bias")}
    H0 = G * M
    lr = torch.randn(1, 1, G * G, C, dtype=torch.float64)
    stages = [torch.randn(1, c, H0 >> s, H0 >> s, dtype=torch.float64) for s, c in enumerate(chans)]
    spec = validate(lr, stages, w, 1, False)
    assert (spec.key_dim, spec.aux_channels) == (D, sum(chans))
    again = mining_weights(C, sum(chans), D, generator=torch.Generator().manual_seed(0), gain=2.0,
                           dtype=torch.float64)
    key = weight_name("val", 1, "weight")
    assert torch.allclose(again[key], 2 * w[key])  # same draws, twice the gain


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    return {n.split(".")[0] for n in names}


def test_runtime_packages_import_no_tooling():
    offenders = [str(p.relative_to(ROOT)) for pkg in ("engine", "kernels", "server") for p in (ROOT / pkg).rglob("*.py")
                 if _imports(p) & {"bench", "loadtests"}]
    assert offenders == []


def test_bench_is_not_shipped():
    find = re.search(r"\[tool\.setuptools\.packages\.find\]\s*include = \[(.*?)\]", (ROOT / "pyproject.toml").read_text())
    assert find and "engine" in find[1] and "bench" not in find[1]
    for dockerfile in ("Dockerfile", "Dockerfile.cpu"):
        assert "COPY bench" not in (ROOT / dockerfile).read_text()
