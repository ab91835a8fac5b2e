"""The PNG figures next to BENCHMARKS.md's tables (matplotlib, headless). bench.report calls these when it renders
a section, so a figure always shows the same stored results as its table."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

STYLES = {"baseline": "o-", "engine": "s-", "gateway": "^-"}


@contextlib.contextmanager
def _figure(path: Path, figsize: tuple[float, float] = (6, 4), ncols: int = 1) -> Iterator[tuple[Any, Any]]:
    """A figure with ``ncols`` axes, saved to ``path`` and closed on exit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(1, ncols, figsize=figsize)
    try:
        yield fig, ax
        fig.tight_layout()
        fig.savefig(path, dpi=100 if ncols == 1 else 110)
    finally:
        plt.close(fig)


def kernels_cpu(rows: list[dict], path: Path) -> None:
    """Median time and peak extra memory per layout and impl, log scale."""
    layouts = list(dict.fromkeys(r["layout"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    with _figure(path, (9, 3.4), ncols=2) as (fig, axes):
        for ax, key, label in ((axes[0], "median_s", "median time (s)"), (axes[1], "peak_mb", "peak extra memory (MB)")):
            for i, impl in enumerate(impls):
                vals = [next(r[key] for r in rows if r["layout"] == lay and r["impl"] == impl) for lay in layouts]
                ax.bar([x + i * 0.38 for x in range(len(layouts))], vals, 0.38, label=impl)
            ax.set_xticks([x + 0.19 for x in range(len(layouts))], layouts)
            ax.set_yscale("log")
            ax.set_title(label)
        axes[0].legend()
        fig.suptitle("patch info mining, CPU, float32, one image")


def serving(sweeps: dict[str, list[dict]], data: dict, out: Path) -> None:
    """Closed-loop throughput and TTFT against concurrency, and open-loop p99 latency against the offered rate."""
    levels_c = data["config"]["concurrency"]
    with _figure(out / "serving_throughput.png") as (_, ax):
        for name, levels in sweeps.items():
            ax.plot([lv["concurrency"] for lv in levels], [lv["request_throughput"] for lv in levels], STYLES[name],
                    label=name)
        ax.set(xscale="log", xlabel="concurrency", ylabel="requests/s", title="One image per request, streaming")
        ax.set_xticks(levels_c, [str(c) for c in levels_c])
        ax.grid(alpha=0.3)
        ax.legend()

    with _figure(out / "serving_ttft.png") as (_, ax):
        for name, levels in sweeps.items():
            xs = [lv["concurrency"] for lv in levels]
            ax.plot(xs, [lv["ttft_ms"]["p99"] for lv in levels], STYLES[name], label=f"{name} p99")
            ax.plot(xs, [lv["ttft_ms"]["p50"] for lv in levels], STYLES[name].replace("-", "--"), alpha=0.6,
                    label=f"{name} p50")
        ax.set(xscale="log", yscale="log", xlabel="concurrency", ylabel="TTFT (ms)", title="Time to first token")
        ax.set_xticks(levels_c, [str(c) for c in levels_c])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    with _figure(out / "serving_open_loop.png") as (_, ax):
        for name in STYLES:
            levels = data.get(name, {}).get("open", [])
            if levels:
                ax.plot([lv["rate"] for lv in levels], [lv["e2el_ms"]["p99"] for lv in levels], STYLES[name],
                        label=f"{name} p99 E2EL")
        ax.set(yscale="log", xlabel="offered requests/s (Poisson)", ylabel="ms", title="Open loop: p99 latency")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()


def sdxl_pool(pool: list[dict], path: Path) -> None:
    """Images/s per pool configuration."""
    with _figure(path) as (_, ax):
        labels = [f"{r['workers']} worker{'s' if r['workers'] > 1 else ''}\nbatch<={r['max_batch']}" for r in pool]
        ax.bar(labels, [r["image_throughput"] for r in pool], color="tab:blue")
        ax.set(ylabel="images/s", title="SDXL pool (tiny pipeline)")
        ax.grid(alpha=0.3, axis="y")
