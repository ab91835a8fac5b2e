"""One-call GPU check of the mining kernels (part of bench/gpu_check.sh, on an H100/H200; never in CI).

Measures, in one process on one card: device-to-device copy bandwidth (the ceiling), accuracy of every impl in
fp32/bf16/fp16 against float64 at the real 768 px shape, and median times (CUDA events via triton's do_bench) and
peak memory of reference / torch / triton for the 768 px and HD layouts at batch 1 and larger batches, plus a
few kernel variants. Prints a table last and writes JSON to --out (bench.report renders `kernels-gpu` from it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import triton

from bench.measure import CudaPeak
from bench.mining import real_inputs
from kernels import mine_patches
from kernels.contract import validate
from kernels.folding import fold_queries, output_views
from kernels.triton_impl import launch_kernels

DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def log(*a) -> None:
    print(*a, flush=True)


def bench_ms(fn) -> float:
    return float(triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median"))


def copy_bandwidth() -> float:
    """Bytes read + written per second for a 2 GiB device-to-device copy."""
    x = torch.randn(2**29, device="cuda")
    y = torch.empty_like(x)
    ms = bench_ms(lambda: y.copy_(x))
    return 2 * x.numel() * x.element_size() / (ms * 1e-3)


def peak_mb(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # cached blocks of earlier cases must not hide this call's allocations
    with CudaPeak() as peak:
        fn()
    return peak.mb


def floor_bytes(lr, st) -> int:
    """Each input read once, the output written once (the stage maps dominate)."""
    return 2 * lr.numel() * lr.element_size() + sum(s.numel() * s.element_size() for s in st)


def accuracy(results: dict) -> None:
    lr, st, w, kw = real_inputs("768px", torch.float64, "cuda", seed=1)
    ref = mine_patches(lr, st, w, impl="reference", **kw)
    for name, dt in DT.items():
        cast = (lr.to(dt), [s.to(dt) for s in st], {k: v.to(dt) for k, v in w.items()})
        for impl in ("reference", "torch", "triton"):
            out = mine_patches(*cast, impl=impl, **kw).double()
            err = ((out - ref).norm() / ref.norm()).item()
            results["accuracy"].append({"dtype": name, "impl": impl, "rel_err_vs_fp64": err})
            log(f"accuracy 768px {name:5s} {impl:9s} rel err {err:.2e}")


def timings(results: dict, bw: float) -> None:
    cases = [("768px", 1), ("768px", 16), ("HD 1536px", 1), ("HD 1536px", 4)]
    for layout, batch in cases:
        lr, st, w, kw = real_inputs(layout, torch.bfloat16, "cuda", seed=2, batch=batch)
        st_cl = [s.contiguous(memory_format=torch.channels_last) for s in st]
        fb = floor_bytes(lr, st)
        spec = validate(lr, st, w, kw["image_grid"], kw["image_global"])
        x = output_views(lr, spec).reshape(-1, spec.channels).float()
        u, usum = fold_queries(x, w, spec, torch.bfloat16)
        agg = torch.empty(x.shape[0], spec.aux_channels, device="cuda")
        shift = torch.empty(x.shape[0], device="cuda")
        row = {"layout": layout, "batch": batch, "dtype": "bf16", "floor_mb": fb / 2**20}
        for impl, maps, key in (("reference", st, "reference"), ("torch", st, "torch"), ("triton", st, "triton"),
                                ("triton", st_cl, "triton_cl")):
            fn = lambda impl=impl, maps=maps: mine_patches(lr, maps, w, impl=impl, **kw)  # noqa: E731
            fn()
            row[f"{key}_ms"] = bench_ms(fn)
            row[f"{key}_peak_mb"] = peak_mb(fn)
        row["kernel_ms"] = bench_ms(lambda: launch_kernels(spec, st, u, usum, agg, shift))
        row["kernel_cl_ms"] = bench_ms(lambda: launch_kernels(spec, st_cl, u, usum, agg, shift))
        best = min(row["triton_ms"], row["triton_cl_ms"])
        row["speedup_triton_vs_reference"] = row["reference_ms"] / best
        row["bw_frac_full_call"] = fb / (best * 1e-3) / bw
        row["bw_frac_kernel_only"] = fb / (min(row["kernel_ms"], row["kernel_cl_ms"]) * 1e-3) / bw
        results["timings"].append(row)
        log(json.dumps(row))


def variants(results: dict, bw: float) -> None:
    lr, st, w, kw = real_inputs("768px", torch.bfloat16, "cuda", seed=3, batch=16)
    spec = validate(lr, st, w, 1, False)
    x = output_views(lr, spec).reshape(-1, spec.channels).float()
    u, usum = fold_queries(x, w, spec, torch.bfloat16)
    agg = torch.empty(x.shape[0], spec.aux_channels, device="cuda")
    shift = torch.empty(x.shape[0], device="cuda")
    fb = floor_bytes(lr, st)
    for layout_name, maps in (("nchw", st), ("channels_last", [s.contiguous(memory_format=torch.channels_last) for s in st])):
        for chunk, bc, nw in ((256, 32, 4), (128, 32, 4), (512, 32, 4), (256, 64, 4), (256, 32, 8), (128, 16, 2)):
            r = {"maps": layout_name, "chunk": chunk, "block_c": bc, "num_warps": nw}
            try:
                ms = bench_ms(lambda: launch_kernels(spec, maps, u, usum, agg, shift, chunk=chunk, block_c=bc,
                                                     num_warps=nw))
                r.update(kernel_ms=ms, bw_frac=fb / (ms * 1e-3) / bw)
            except Exception as e:  # a variant that fails to compile is reported, not fatal
                r["error"] = repr(e)[:300]
            results["variants"].append(r)
            log(json.dumps(r))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="kernels_gpu.json")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: accuracy,timings,variants")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device")
    t0 = time.time()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "accuracy": [], "timings": [], "variants": []}
    bw = copy_bandwidth()
    results["copy_bw_gbs"] = bw / 1e9
    log(f"{results['device']}: device-to-device copy {bw / 1e9:.0f} GB/s (read+write)")
    skip = set(args.skip.split(","))
    for name, fn in (("accuracy", lambda: accuracy(results)), ("timings", lambda: timings(results, bw)),
                     ("variants", lambda: variants(results, bw))):
        if name in skip:
            continue
        try:
            fn()
        except Exception as e:  # keep going: one failing section must not lose the others' numbers
            results[f"{name}_error"] = repr(e)[:1000]
            log(f"{name} failed: {e!r}")
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    results["wall_s"] = time.time() - t0
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    log("\n| layout | B | reference ms | torch ms | triton ms (nchw / cl) | kernels ms (nchw / cl) | triton/ref | "
        "BW frac (call / kernels) |")
    for r in results["timings"]:
        log(f"| {r['layout']} | {r['batch']} | {r['reference_ms']:.3f} | {r['torch_ms']:.3f} | {r['triton_ms']:.3f} / "
            f"{r['triton_cl_ms']:.3f} | {r['kernel_ms']:.3f} / {r['kernel_cl_ms']:.3f} | "
            f"{r['speedup_triton_vs_reference']:.1f}x | {r['bw_frac_full_call']:.2f} / {r['bw_frac_kernel_only']:.2f} |")


if __name__ == "__main__":
    main()
