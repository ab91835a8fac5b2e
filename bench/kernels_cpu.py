"""Patch-info-mining benchmark on CPU at the real MGM shapes: `python -m bench.kernels_cpu`.

Each (layout, impl) runs in its own process, so peak memory is that run's alone: resident memory is sampled
every half millisecond during the first call and compared with the level just before it. Results go to
bench/results/kernels_cpu.json; bench.report renders the `kernels-cpu` section and the plot from there.
"""

from __future__ import annotations

import argparse
import json

import torch

from bench import report
from bench.measure import run_child, time_calls
from bench.mining import LAYOUTS, real_inputs

MODULE = "bench.kernels_cpu"
IMPLS = ("reference", "torch")


def _child(layout: str, impl: str, repeats: int) -> dict:
    from kernels import mine_patches

    torch.manual_seed(0)
    lr, st, w, kw = real_inputs(layout, torch.float32, "cpu")
    return {"layout": layout, "impl": impl, **time_calls(lambda: mine_patches(lr, st, w, impl=impl, **kw), repeats),
            "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="BENCHMARKS.md", help="markdown file whose 'kernels-cpu' section is rewritten")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of the fast paths (reference: 3)")
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    ap.add_argument("--child", nargs=3, metavar=("LAYOUT", "IMPL", "REPEATS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child[0], args.child[1], int(args.child[2]))))
        return

    from tqdm import tqdm

    jobs = [(lay, impl) for lay in args.layouts for impl in IMPLS]
    rows = [run_child(MODULE, lay, impl, 3 if impl == "reference" else args.repeats)
            for lay, impl in tqdm(jobs, desc="mining bench", unit="run")]
    data = {"machine": report.cpu_name(), "torch": torch.__version__, "rows": rows}
    report.save("kernels_cpu", data)
    print(report.render(args.out, ["kernels-cpu"]))


if __name__ == "__main__":
    main()
