"""Vision front end at the real MGM sizes (random weights): the official formulation against ours.

    python -m bench.encoder --out BENCHMARKS.md                       # CPU: fp32 and bf16, own process per row
    python -m bench.encoder --device cuda --dtype bf16 --json F.json  # GPU images/s (bench/gpu_check.sh)

Front end = CLIP ViT-L/14-336 on the low-res views + ConvNeXt-L on the high-res image + patch info mining +
mlp2x_gelu projector. The official formulation runs all 24 CLIP layers and takes the second to last, runs timm's
plain ConvNeXt block, builds the 2880-channel concatenated map and projects every high-res candidate. Ours is what
the engine runs: 23 CLIP layers (on the CPU vLLM's own CLIPVisionModel, with its oneDNN GEMM dispatch, as the
engine builds it; on the GPU machine, which has no vLLM, HF's tower truncated), the fused channels-last ConvNeXt
blocks of engine/convnext.py, and `kernels.mine_patches(impl="auto")` on the four stage maps. Accuracy is measured
against the same weights evaluated in float64 (the official math; tests/bench/test_encoder_paths.py shows our
formulation equals it there to 1e-10). CPU results go to bench/results/encoder_cpu.json, GPU rows to --json;
bench.report renders both sections.
"""

from __future__ import annotations

import argparse
import json
import socket
import tempfile
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
DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: Several images in one engine step: vLLM encodes the images of the requests it schedules together, up to its
#: encoder budget (max_num_batched_tokens): 4 x 576 tokens at 768 px, 2 x 2880 at HD with a budget of >= 5760.
CPU_BATCH = {"768px": 4, "HD 1536px": 2}
#: (path, dtype) rows per layout at batch 1: the official code as shipped loads everything in fp16; fp32 and bf16 for
#: both paths. The engine batch is measured for bf16, the dtype vLLM runs on the CPU.
CPU_ROWS = (("official", "fp16"), ("official", "fp32"), ("ours", "fp32"), ("official", "bf16"), ("ours", "bf16"))
BATCH_ROWS = (("official", "bf16"), ("ours", "bf16"))
#: Relative error vs float64 accepted per dtype: the mining kernels' test tolerances (tests/kernels).
TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2, "fp16": 4e-3}
_VLLM_CONTEXTS: list = []


@dataclass
class FrontEnd:
    clip: CLIPVisionModel  # all layers; ours stops one early
    convnext: ConvNeXtTower
    mining: dict[str, torch.Tensor]
    projector: nn.Sequential
    lr_size: int
    image_grid: int
    image_global: bool
    engine_clip: nn.Module | None = None  # vLLM's tower with the layers the engine builds (use_engine_clip)

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
        self.convnext.use_onednn(False)  # timm's block, as the official tower computes it
        try:
            stages = self.convnext(hr)
        finally:
            self.convnext.use_onednn(True)
        mined = mine_patches(x, stages, self.mining, image_grid=self.image_grid,
                             image_global=self.image_global, impl="reference")
        return self.projector(mined)

    def ours(self, hr: torch.Tensor) -> torch.Tensor:
        views = self.low_res_views(hr)
        if self.engine_clip is not None:
            B, V = views.shape[:2]
            x = self.engine_clip(views.flatten(0, 1), feature_select_strategy="default")
            x = x.reshape(B, V, *x.shape[1:])
        else:
            # The truncated tower: identical numbers to hidden_states[-2] of the full one, one layer less work.
            encoder = getattr(self.clip, "vision_model", self.clip).encoder  # transformers 4 nests it, 5 does not
            full = encoder.layers
            encoder.layers = nn.ModuleList(list(full)[:-1])
            try:
                x = self.clip_features(views, -1)
            finally:
                encoder.layers = full
        mined = mine_patches(x, self.convnext(hr), self.mining, image_grid=self.image_grid,
                             image_global=self.image_global, impl="auto")
        return self.projector(mined)

    def exact(self, hr: torch.Tensor) -> torch.Tensor:
        """The official math in float64 (built with dtype float64): HF's full tower, the plain ConvNeXt (float64
        never takes the fused path) and the folded mining, equal to the reference formulation to 1e-12
        (tests/kernels) at a fraction of its memory."""
        x = self.clip_features(self.low_res_views(hr), -2)
        mined = mine_patches(x, self.convnext(hr), self.mining, image_grid=self.image_grid,
                             image_global=self.image_global, impl="torch")
        return self.projector(mined)

    def use_engine_clip(self) -> None:
        """Replace our CLIP by the one the engine builds: vLLM's CLIPVisionModel with the layers up to the selected
        one, the same weights, and vLLM's CPU GEMM dispatch (process_weights_after_loading), in this process."""
        from vllm.config import VllmConfig, set_current_vllm_config
        from vllm.distributed import init_distributed_environment, initialize_model_parallel
        from vllm.model_executor.models.clip import CLIPVisionModel as EngineCLIP

        context = set_current_vllm_config(VllmConfig())
        context.__enter__()  # for the rest of this (child) process; kept referenced so it is never exited
        _VLLM_CONTEXTS.append(context)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{port}")
        initialize_model_parallel(1, 1)
        dtype, default = next(self.clip.parameters()).dtype, torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            tower = EngineCLIP(self.clip.config, quant_config=None, require_post_norm=False,
                               num_hidden_layers_override=self.clip.config.num_hidden_layers - 1)
        finally:
            torch.set_default_dtype(default)
        tower.vision_model.load_weights((k.removeprefix("vision_model."), v) for k, v in self.clip.state_dict().items())
        for module in tower.modules():
            method = getattr(module, "quant_method", None)
            if method is not None and hasattr(method, "process_weights_after_loading"):
                method.process_weights_after_loading(module)
        self.engine_clip = tower.eval()


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


def images(fe: FrontEnd, batch: int, dtype: torch.dtype) -> torch.Tensor:
    """The same pixels in every process (the first image of a batch is the batch-1 image)."""
    side = hr_size(fe)
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(1)).to(dtype)


def _child(layout: str, path: str, dtype: str, batch: int, repeats: int, save: str) -> dict:
    """CPU measurement of one row in its own process: median time, peak resident memory; the output saved to
    ``save`` (unless "-") for the accuracy column."""
    fe = build(layout, "cpu", DTYPES[dtype])
    if path == "ours":
        fe.use_engine_clip()
    hr = images(fe, batch, DTYPES[dtype])
    fn = getattr(fe, path)
    first: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        row = time_calls(lambda: first.setdefault("out", fn(hr)), repeats, interval_s=0.001, warmup=True)
    if save != "-":
        torch.save(first["out"].to(torch.float64 if dtype == "fp64" else torch.float32), save)
    return {"layout": layout, "path": path, "dtype": dtype, "batch": batch, "threads": torch.get_num_threads(),
            "images_per_s": batch / row["median_s"], "warmup": True, **row}


def _rel_error(path: Path, ref: torch.Tensor) -> float:
    out = torch.load(path).double()
    return ((out - ref).norm() / ref.norm()).item()


def cpu_table(out: str, repeats: int, layouts: list[str]) -> str:
    """Batch-1 rows for fp32 and bf16, engine-batch rows for bf16, and each batch-1 output against float64."""
    from tqdm import tqdm

    plan = [(layout, path, dtype, 1) for layout in layouts for path, dtype in CPU_ROWS]
    plan += [(layout, path, dtype, CPU_BATCH[layout]) for layout in layouts for path, dtype in BATCH_ROWS]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        saved = {}
        for layout, path, dtype, batch in tqdm(plan, desc="encoder bench"):
            save = str(Path(tmp) / f"{len(rows)}.pt") if batch == 1 else "-"
            rows.append(run_child(MODULE, layout, path, dtype, batch, repeats, save))
            saved[len(rows) - 1] = save
        for layout in tqdm(layouts, desc="float64 reference"):
            ref_path = Path(tmp) / f"ref-{layout}.pt"
            run_child(MODULE, layout, "exact", "fp64", 1, 1, ref_path)
            ref = torch.load(ref_path)
            for i, row in enumerate(rows):
                if row["layout"] == layout and saved[i] != "-":
                    row["rel_error"] = _rel_error(Path(saved[i]), ref)
    report.save("encoder_cpu", {"machine": report.cpu_name(), "torch": torch.__version__, "rows": rows,
                                "tolerance": TOLERANCE, "engine_batch": CPU_BATCH})
    return report.render(out, ["encoder-cpu"])


def rel_errors(layout: str, device: str, dtype: torch.dtype, **sizes: object) -> dict[str, float]:
    """Relative error of both paths' output for one image at ``dtype`` against the same weights in float64, all on
    ``device`` (``sizes``: build()'s keyword arguments, for tests at small sizes)."""
    exact = build(layout, device, torch.float64, **sizes)  # type: ignore[arg-type]
    hr = images(exact, 1, torch.float64).to(device)
    with torch.inference_mode():
        ref = exact.exact(hr)
    del exact
    fe = build(layout, device, dtype, **sizes)  # type: ignore[arg-type]
    errors = {}
    with torch.inference_mode():
        for path in ("official", "ours"):
            got = getattr(fe, path)(hr.to(dtype)).double()
            errors[path] = ((got - ref).norm() / ref.norm()).item()
    return errors


GPU_BATCH = {"768px": 8, "HD 1536px": 2}


def gpu_images_per_s(dtype: torch.dtype) -> list[dict]:
    """Images/s of both paths on the GPU at batch 1 and an engine batch (8 at 768 px, 2 at HD), CUDA-event medians,
    and each path's error against float64."""
    import triton
    rows = []
    for layout, engine_batch in GPU_BATCH.items():
        errors = rel_errors(layout, "cuda", dtype)
        torch.cuda.empty_cache()
        fe = build(layout, "cuda", dtype)
        for batch in (1, engine_batch):
            hr = images(fe, batch, dtype).to("cuda")
            for path in ("official", "ours"):
                fn = getattr(fe, path)
                with torch.inference_mode():
                    fn(hr)
                    with CudaPeak() as peak:
                        ms = triton.testing.do_bench(lambda: fn(hr), warmup=10, rep=60, return_mode="median")
                rows.append({"layout": layout, "batch": batch, "path": path, "ms": ms,
                             "images_per_s": batch / ms * 1e3, "peak_mb": peak.mb, "rel_error": errors[path],
                             "device": torch.cuda.get_device_name(), "dtype": str(dtype)})
                print(json.dumps(rows[-1]), flush=True)
        del fe
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="GPU only; the CPU runs fp32 and bf16")
    ap.add_argument("--out", default="BENCHMARKS.md")
    ap.add_argument("--json", default=None, help="GPU: write the rows here")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS), help="CPU only")
    ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        layout, path, dtype, batch, repeats, save = args.child
        print(json.dumps(_child(layout, path, dtype, int(batch), int(repeats), save)))
    elif args.device == "cuda":
        rows = gpu_images_per_s(DTYPES[args.dtype])
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    else:
        print(cpu_table(args.out, args.repeats, args.layouts))


if __name__ == "__main__":
    main()
