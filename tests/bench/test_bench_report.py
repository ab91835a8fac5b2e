"""bench.report, the one renderer of BENCHMARKS.md: the stored results reproduce the committed file, the serving
targets are judged and explained from the figures, and every section and figure renders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from bench import report
from loadtests.stats import RequestResult, summarize

ROOT = Path(__file__).resolve().parents[2]


def _level(c: int, rate: float, ttft: float) -> dict:
    res = [RequestResult("chat-image", True, 0.0, 0.5, ttft, [0.01] * 31, 32, 40) for _ in range(4)]
    return {"mode": "closed", "concurrency": c, "scenario": "image", **summarize(res, 4 / rate)}


def test_stored_results_render_the_committed_benchmarks(tmp_path):
    """`make bench` ends with this render: from bench/results/ it must give BENCHMARKS.md back unchanged."""
    out = tmp_path / "BENCHMARKS.md"
    shutil.copy(ROOT / "BENCHMARKS.md", out)
    report.render(out, plots=False)
    assert out.read_text() == (ROOT / "BENCHMARKS.md").read_text()


def test_every_section_and_figure_renders_into_a_new_file(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(report.RESULTS, results, ignore=shutil.ignore_patterns("*.png", "*.log"))
    (results / "sdxl_gpu.json").unlink(missing_ok=True)
    out = tmp_path / "B.md"
    report.render(out, results=results)
    md = out.read_text()
    assert md.startswith(report.HEADER)
    positions = [md.index(f"<!-- BEGIN {name} -->") for name in report.NAMES]
    assert positions == sorted(positions)  # BENCHMARKS.md order
    assert report.SDXL_GPU_PENDING.strip() in md  # no results yet: the section says how to get them
    for png in ("kernels_cpu", "serving_throughput", "serving_ttft", "serving_open_loop", "sdxl_pool"):
        assert (results / f"{png}.png").stat().st_size > 1000


def test_serving_targets_are_judged_and_explained(tmp_path):
    levels = [1, 32]
    data = {"machine": "test cpu", "started": "now", "phases_s": {"baseline": 1.0},
            "config": {"concurrency": levels, "image_size": 64, "max_tokens": 32, "per_level": 2, "cap": 128,
                       "open_requests": 8, "time_limit_s": 60},
            "baseline": {"sweep": [_level(c, 10, 0.3) for c in levels], "open": []},
            "engine": {"sweep": [_level(c, 100, 0.050) for c in levels], "open": []},
            "gateway": {"sweep": [_level(c, 95, 0.055) for c in levels], "open": []}}
    text = report.serving_section(data)
    assert "**9.5x** the baseline (target >= 8x): **met**" in text
    assert "worst 5.0 % less throughput, +5.0 ms p50 TTFT: **met**" in text
    data["gateway"]["sweep"][1] = _level(32, 50, 0.2)
    assert "**missed** at c=32 (req/s -50.0 %, p50 TTFT +150.0 ms)" in report.targets(data)
    assert "Gateway overhead." in report.explanation(data)
    data["baseline"]["sweep"][1] = _level(32, 20, 0.3)  # gateway 50 req/s = 2.5x: missed, explained
    assert "**2.5x** the baseline (target >= 8x): **missed**" in report.targets(data)
    assert "Why the throughput target is missed" in report.explanation(data)
    report.save("serving_cpu", data, tmp_path)
    out = tmp_path / "B.md"
    out.write_text("# B\n")
    report.render(out, ["serving-cpu", "sdxl-pool-cpu"], tmp_path)
    md = out.read_text()
    assert "<!-- BEGIN serving-cpu -->" in md and "sdxl-pool-cpu" not in md  # no pool results, no pool section
    assert (tmp_path / "serving_throughput.png").stat().st_size > 1000


def test_gpu_results_are_copied_from_a_check_run(tmp_path):
    run, results = tmp_path / "out", tmp_path / "results"
    run.mkdir()
    results.mkdir()
    shutil.copy(report.RESULTS / "encoder_gpu.json", run / "encoder_gpu.json")
    out = tmp_path / "B.md"
    report.main(["--from", str(run), "--results", str(results), "--out", str(out), "--sections", "encoder-gpu"])
    assert json.loads((results / "encoder_gpu.json").read_text())[0]["device"]
    assert "## Vision front end, GPU" in out.read_text()
