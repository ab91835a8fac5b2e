"""GPU results of loadtests/gpu_check.sh into BENCHMARKS.md.

    python -m loadtests.gpu_report --from OUTDIR     # copy OUTDIR's *_gpu.json into benchmarks/, render all GPU sections
    python -m loadtests.gpu_report                   # re-render from benchmarks/ (what `make bench` does)

The mining and vision sections are kernels/gpu_report.py's; this module adds the SDXL UNet section.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from loadtests.markdown import markdown_table, update_section

FILES = ("kernels_gpu.json", "encoder_gpu.json", "sdxl_gpu.json")


PENDING = (
    "## SDXL UNet step, GPU\n\n"
    "Not measured yet: `bash loadtests/gpu_check.sh OUT` (mining kernels, vision front end and the SDXL base UNet "
    "step at 1024x1024 in bf16 with random weights, ~5 min) has not run on a GPU since it was written; "
    "`python -m loadtests.gpu_report --from OUT` then fills this section.\n"
)


def sdxl_section(data: dict) -> str:
    steps = data["steps"]
    rows = [[r["images"], r["unet_batch"], f"{r['ms_per_step']:.1f}", f"{r['ms_per_step_per_image']:.1f}",
             f"{r[f'images_per_s_{steps}_steps']:.2f}", "-" if r["peak_extra_mb"] is None else f"{r['peak_extra_mb']:.0f}"]
            for r in data["rows"]]
    one = data["rows"][0]["ms_per_step_per_image"]
    best = min(data["rows"], key=lambda r: r["ms_per_step_per_image"])
    return (
        "## SDXL UNet step, GPU\n\n"
        f"Machine: {data['device']} (torch {data['torch']}, diffusers {data['diffusers']}); the SDXL base 1.0 UNet "
        f"built from its config with random weights ({data['params'] / 1e9:.3f} B parameters), {data['dtype']}, "
        f"{data['side']}x{data['side']} ({data['side'] // 8}x{data['side'] // 8} latents), "
        f"{data['attention']}; one call with classifier-free guidance runs 2 x images latents. Median of CUDA-event "
        f"timings; images/s = UNet time only over {steps} steps (text encoders and VAE not included). "
        "`python3 -m loadtests.gpu_sdxl` (part of `bash loadtests/gpu_check.sh OUT`).\n\n"
        + markdown_table(["images per call", "UNet batch", "ms per step", "ms per step per image",
                          f"images/s ({steps} steps)", "peak extra (MB)"], rows)
        + f"\n\nBatching effect: {best['images']} images per call cost {best['ms_per_step_per_image']:.1f} ms per "
        f"step per image against {one:.1f} ms alone ({one / best['ms_per_step_per_image']:.2f}x).\n"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="BENCHMARKS.md")
    ap.add_argument("--dir", default="benchmarks", help="where the stored GPU JSON files live")
    ap.add_argument("--from", dest="source", type=Path, default=None,
                    help="output directory of loadtests/gpu_check.sh: copy its JSON files into --dir first")
    args = ap.parse_args(argv)
    if args.source is not None:
        for name in FILES:
            if (args.source / name).exists():
                shutil.copy(args.source / name, Path(args.dir) / name)
        from kernels.gpu_report import main as kernels_report

        kernels_report(["--out", args.out, "--dir", args.dir])
    sdxl = Path(args.dir, "sdxl_gpu.json")
    update_section(args.out, "sdxl-gpu", sdxl_section(json.loads(sdxl.read_text())) if sdxl.exists() else PENDING)


if __name__ == "__main__":
    main()
