"""Patch-info-mining benchmark at the real MGM shapes: `python -m kernels.bench --out BENCHMARKS.md`.

Each (layout, impl) runs in its own process, so peak memory is that run's alone: resident memory is sampled
every half millisecond during the first call and compared with the level just before it.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

# name -> (B, image_grid, image_global, G, M, C, D, stage channels); ConvNeXt-L at 768 px and the HD 1536 px layout.
LAYOUTS = {
    "768px": (1, 1, False, 24, 8, 1024, 1024, (192, 384, 768, 1536)),
    "HD 1536px": (1, 2, True, 24, 8, 1024, 1024, (192, 384, 768, 1536)),
}


def real_inputs(layout: str, dtype: torch.dtype, device: str, seed: int = 0, batch: int | None = None):
    """Random inputs with real MGM sizes (stage s at H0 / 2^s, the ConvNeXt strides)."""
    B, g, glob, G, M, C, D, chans = LAYOUTS[layout]
    B = batch or B
    gen = torch.Generator(device="cpu").manual_seed(seed)
    H0 = g * G * M

    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen) * scale + shift).to(device=device, dtype=dtype)

    lr = rnd(B, g * g + int(glob), G * G, C)
    stages = [rnd(B, c, H0 >> s, H0 >> s, scale=1 + s, shift=0.1 * s) for s, c in enumerate(chans)]
    Ca = sum(chans)
    w = {}
    for p, width, out in (("query", C, D), ("aux", Ca, D), ("val", Ca, C)):
        w[f"vlm_uni_{p}_projector.0.weight"] = rnd(width, scale=0.1, shift=1.0)
        w[f"vlm_uni_{p}_projector.0.bias"] = rnd(width, scale=0.1)
        w[f"vlm_uni_{p}_projector.1.weight"] = rnd(out, width, scale=2 / width**0.5)
        w[f"vlm_uni_{p}_projector.1.bias"] = rnd(out, scale=0.1)
    return lr, stages, w, dict(image_grid=g, image_global=glob)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _child(layout: str, impl: str, repeats: int) -> dict:
    from kernels import mine_patches
    torch.manual_seed(0)
    lr, st, w, kw = real_inputs(layout, torch.float32, "cpu")
    before, peak, done = _rss_mb(), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.0005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    mine_patches(lr, st, w, impl=impl, **kw)
    times = [time.perf_counter() - t0]
    done.set()
    t.join()
    for _ in range(repeats - 1):
        t0 = time.perf_counter()
        mine_patches(lr, st, w, impl=impl, **kw)
        times.append(time.perf_counter() - t0)
    return {"layout": layout, "impl": impl, "times_s": times, "median_s": statistics.median(times),
            "peak_mb": max(peak[0] - before, 0.0), "threads": torch.get_num_threads()}


def _run_child(layout: str, impl: str, repeats: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "kernels.bench", "--child", layout, impl, str(repeats)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    layouts = list(dict.fromkeys(r["layout"] for r in results))
    impls = list(dict.fromkeys(r["impl"] for r in results))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, label in ((axes[0], "median_s", "median time (s)"), (axes[1], "peak_mb", "peak extra memory (MB)")):
        for i, impl in enumerate(impls):
            vals = [next(r[key] for r in results if r["layout"] == lay and r["impl"] == impl) for lay in layouts]
            ax.bar([x + i * 0.38 for x in range(len(layouts))], vals, 0.38, label=impl)
        ax.set_xticks([x + 0.19 for x in range(len(layouts))], layouts)
        ax.set_yscale("log")
        ax.set_title(label)
    axes[0].legend()
    fig.suptitle("patch info mining, CPU, float32, one image")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="BENCHMARKS.md", help="markdown file whose 'kernels-cpu' section is rewritten")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of the fast paths (reference: 3)")
    ap.add_argument("--child", nargs=3, metavar=("LAYOUT", "IMPL", "REPEATS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child[0], args.child[1], int(args.child[2]))))
        return

    from tqdm import tqdm

    from loadtests.markdown import cpu_name, markdown_table, update_section
    jobs = [(lay, impl) for lay in LAYOUTS for impl in ("reference", "torch")]
    results = []
    for lay, impl in tqdm(jobs, desc="mining bench", unit="run"):
        results.append(_run_child(lay, impl, 3 if impl == "reference" else args.repeats))
    Path("benchmarks").mkdir(exist_ok=True)
    Path("benchmarks/kernels_cpu.json").write_text(json.dumps(results, indent=1))
    _plot(results, Path("benchmarks/kernels_cpu.png"))

    rows = []
    for lay in LAYOUTS:
        ref = next(r for r in results if r["layout"] == lay and r["impl"] == "reference")
        for r in (r for r in results if r["layout"] == lay):
            rows.append([lay, r["impl"], f"{r['median_s'] * 1e3:.1f}", f"{ref['median_s'] / r['median_s']:.1f}x",
                         f"{r['peak_mb']:.0f}", f"{ref['peak_mb'] / max(r['peak_mb'], 1e-9):.1f}x"])
    body = (
        "## Patch info mining, CPU\n\n"
        f"Machine: {cpu_name()}; torch {torch.__version__}, {results[0]['threads']} threads; float32, one image; "
        "N=576, M=8, C=1024, stages 192/384/768/1536. Median of the timed runs; peak = resident memory above the "
        "level before the call (own process per row). `python -m kernels.bench`.\n\n"
        + markdown_table(["layout", "impl", "median (ms)", "speed-up vs reference", "peak extra (MB)",
                          "memory vs reference"], rows)
        + "\n\nTargets at 768 px: `torch` >= 10x faster and >= 10x lower peak memory than `reference`.\n\n"
        "![mining bench](benchmarks/kernels_cpu.png)\n"
    )
    update_section(args.out, "kernels-cpu", body)
    print(body)


if __name__ == "__main__":
    main()
