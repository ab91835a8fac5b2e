"""Vision front end at the real MGM sizes (random weights): the official formulation against ours.

    python -m bench.encoder --out BENCHMARKS.md                       # CPU, float32, own process per row
    python -m bench.encoder --device cuda --dtype bf16 --json F.json  # GPU images/s (bench/gpu_check.sh)

Front end = CLIP ViT-L/14-336 on the low-res views + ConvNeXt-L on the high-res image + patch info mining +
mlp2x_gelu projector. The paths differ where the official code is wasteful: it runs all 24 CLIP layers and takes
the second to last, builds the 2880-channel concatenated map and projects every high-res candidate; ours runs 23
layers and hands the four stage maps to `kernels.mine_patches(impl="auto")`. CPU results go to
bench/results/encoder_cpu.json, GPU rows to --json; bench.report renders both sections.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from bench import report
from bench.measure import CudaPeak, run_child, time_calls
from bench.mining import mining_weights
from engine.convnext import ConvNeXtTower
from kernels import mine_patches

MODULE = "bench.encoder"

CLIP_L336 = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                 image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5)
CONVNEXT_L = dict(depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536))
LAYOUTS = {"768px": (1, False), "HD 1536px": (2, True)}  # image_grid, image_global


@dataclass
class FrontEnd:
    clip: CLIPVisionModel  # all layers; ours stops one early
    convnext: ConvNeXtTower
    mining: dict[str, torch.Tensor]
    projector: nn.Sequential
    lr_size: int
    image_grid: int
    image_global: bool

    def low_res_views(self, hr: torch.Tensor) -> torch.Tensor:
        """Processor order [crops..., global], each lr_size square (docs/mgm.md §3.3)."""
        g, s = self.image_grid, self.lr_size
        lr = F.interpolate(hr, size=(s * g, s * g), mode="bilinear", align_corners=False)
        if g == 1:
            return lr[:, None]
        B = hr.shape[0]
        crops = lr.reshape(B, 3, g, s, g, s).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, 3, s, s)
        views = [crops]
        if self.image_global:
            views.append(F.interpolate(lr, size=(s, s), mode="bilinear", align_corners=False)[:, None])
        return torch.cat(views, 1)

    def clip_features(self, views: torch.Tensor, layers: int) -> torch.Tensor:
        B, V = views.shape[:2]
        out = self.clip(pixel_values=views.flatten(0, 1), output_hidden_states=True)
        feats = out.hidden_states[layers][:, 1:]  # CLS dropped, no post-norm
        return feats.reshape(B, V, *feats.shape[1:])

    def official(self, hr: torch.Tensor) -> torch.Tensor:
        x = self.clip_features(self.low_res_views(hr), -2)
        mined = mine_patches(x, self.convnext(hr), self.mining, image_grid=self.image_grid,
                             image_global=self.image_global, impl="reference")
        return self.projector(mined)

    def ours(self, hr: torch.Tensor) -> torch.Tensor:
        # The truncated tower: identical numbers to hidden_states[-2] of the full one, one layer less work.
        encoder = getattr(self.clip, "vision_model", self.clip).encoder  # transformers 4 nests it, 5 does not
        full = encoder.layers
        encoder.layers = nn.ModuleList(list(full)[:-1])
        try:
            x = self.clip_features(self.low_res_views(hr), -1)
        finally:
            encoder.layers = full
        mined = mine_patches(x, self.convnext(hr), self.mining, image_grid=self.image_grid,
                             image_global=self.image_global, impl="auto")
        return self.projector(mined)


def build(layout: str, device: str, dtype: torch.dtype, *, clip: dict | None = None, convnext: dict | None = None,
          lm_hidden: int = 4096, seed: int = 0) -> FrontEnd:
    torch.manual_seed(seed)
    g, glob = LAYOUTS[layout]
    cfg = CLIPVisionConfig(**(clip or CLIP_L336))
    tower = CLIPVisionModel(cfg).eval()
    cnx = ConvNeXtTower(**(convnext or CONVNEXT_L))
    C = cfg.hidden_size
    mining = mining_weights(C, sum(cnx.dims), C)  # MGM projects queries and keys to the CLIP width
    proj = nn.Sequential(nn.Linear(C, lm_hidden), nn.GELU(), nn.Linear(lm_hidden, lm_hidden))
    fe = FrontEnd(tower.to(device, dtype), cnx.to(device, dtype), {k: v.to(device, dtype) for k, v in mining.items()},
                  proj.to(device, dtype), cfg.image_size, g, glob)
    return fe


def hr_size(fe: FrontEnd) -> int:
    """High-res side: ConvNeXt stride 4 x M=8 windows per CLIP patch row x grid."""
    return fe.image_grid * (fe.lr_size // fe.clip.config.patch_size) * 8 * 4


def _child(layout: str, path: str, repeats: int) -> dict:
    """CPU measurement of one (layout, path) in its own process: median time and peak resident memory."""
    fe = build(layout, "cpu", torch.float32)
    hr = torch.randn(1, 3, hr_size(fe), hr_size(fe))
    fn = getattr(fe, path)
    with torch.inference_mode():
        return {"layout": layout, "path": path, **time_calls(lambda: fn(hr), repeats, interval_s=0.001)}


def cpu_table(out: str, repeats: int, layouts: list[str]) -> str:
    from tqdm import tqdm

    rows = [run_child(MODULE, layout, path, repeats) for layout in tqdm(layouts, desc="encoder bench")
            for path in ("official", "ours")]
    report.save("encoder_cpu", {"machine": report.cpu_name(), "torch": torch.__version__, "rows": rows})
    return report.render(out, ["encoder-cpu"])


def gpu_images_per_s(dtype: torch.dtype) -> list[dict]:
    """Images/s of both paths on the GPU, batch 8 (768 px) and 2 (HD), CUDA-event medians."""
    import triton
    rows = []
    for layout, batch in (("768px", 8), ("HD 1536px", 2)):
        fe = build(layout, "cuda", dtype)
        hr = torch.randn(batch, 3, hr_size(fe), hr_size(fe), device="cuda", dtype=dtype)
        for path in ("official", "ours"):
            fn = getattr(fe, path)
            with torch.inference_mode():
                fn(hr)
                with CudaPeak() as peak:
                    ms = triton.testing.do_bench(lambda: fn(hr), warmup=10, rep=60, return_mode="median")
            rows.append({"layout": layout, "batch": batch, "path": path, "ms": ms, "images_per_s": batch / ms * 1e3,
                         "peak_mb": peak.mb, "device": torch.cuda.get_device_name(), "dtype": str(dtype)})
            print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="GPU only; CPU runs fp32")
    ap.add_argument("--out", default="BENCHMARKS.md")
    ap.add_argument("--json", default=None, help="GPU: write the rows here")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS), help="CPU only")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child[0], args.child[1], int(args.child[2]))))
    elif args.device == "cuda":
        dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
        rows = gpu_images_per_s(dt)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    else:
        print(cpu_table(args.out, args.repeats, args.layouts))


if __name__ == "__main__":
    main()
