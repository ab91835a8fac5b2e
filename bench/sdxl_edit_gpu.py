"""SDXL edits with streamed previews at real size on the GPU, through the worker's own runner
(server.sdxl.pipeline.SDXLRunner: img2img and inpainting built with ``from_pipe``, previews from the fitted
latent-to-RGB map). Random weights at SDXL base's sizes — time does not depend on the weights' values — so nothing
is downloaded. Part of bench/gpu_check.sh; never run in CI.

    python3 -m bench.sdxl_edit_gpu --json OUT/sdxl_edit_gpu.json     # CUDA, bf16, 1024², 30 steps, 2 previews
    python3 -m bench.sdxl_edit_gpu --tiny --json /tmp/x.json        # the same code on the tiny pipeline, CPU

For each mode (text-to-image, img2img at strength 0.8, inpainting of half the image) one call with two previews:
the time to each preview and to the final image (the previews' own cost included), and the peak GPU memory above
the loaded pipeline; then the same edit without previews, which prices them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.measure import CudaPeak
from bench.sdxl_gpu import SDXL_UNET, gpu_parser

#: stabilityai/stable-diffusion-xl-base-1.0: vae/config.json and the two text encoders' configs (non-defaults).
SDXL_VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "sample_size": 1024,
    "block_out_channels": (128, 256, 512, 512), "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4, "scaling_factor": 0.13025, "force_upcast": True}
CLIP_L: dict[str, Any] = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                          "num_attention_heads": 12, "projection_dim": 768, "hidden_act": "quick_gelu",
                          "vocab_size": 49408, "max_position_embeddings": 77}
CLIP_G: dict[str, Any] = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                          "num_attention_heads": 20, "projection_dim": 1280, "hidden_act": "gelu",
                          "vocab_size": 49408, "max_position_embeddings": 77}


def build_real_size(out: Path, dtype: Any) -> Path:
    """SDXL base's architecture with random weights, saved as a diffusers directory at ``out`` (the tokenizers and
    scheduler are the tiny pipeline's: token ids stay far below the real vocabulary, shapes are SDXL's)."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from server.sdxl.tiny import build_modules

    small = build_modules(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        modules = {"unet": UNet2DConditionModel(**SDXL_UNET), "vae": AutoencoderKL(**SDXL_VAE),
                   "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L)),
                   "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G))}
    modules = {k: m.to(dtype) for k, m in modules.items()}
    pipe = StableDiffusionXLPipeline(**modules, tokenizer=small["tokenizer"], tokenizer_2=small["tokenizer_2"],
                                     scheduler=small["scheduler"], force_zeros_for_empty_prompt=True,
                                     add_watermarker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def _inputs(side: int) -> tuple[Any, Any]:
    from PIL import Image

    image = Image.effect_mandelbrot((side, side), (-2.0, -1.5, 1.0, 1.5), 100).convert("RGB")
    mask = Image.new("L", (side, side), 0)
    mask.paste(255, (0, 0, side // 2, side))  # white = redraw (diffusers' convention, as the worker passes it)
    return image, mask


def run_mode(runner: Any, mode: str, side: int, steps: int, previews: int, image: Any, mask: Any) -> dict[str, Any]:
    import torch

    from server.sdxl.pipeline import GenSpec

    cuda = runner.device == "cuda"
    spec = GenSpec(prompt="a lighthouse at dusk, oil painting", negative_prompt=None, seeds=(0,),
                   image=image if mode != "text2img" else None, mask=mask if mode == "inpaint" else None,
                   previews=previews)
    strength = {"text2img": 1.0, "img2img": 0.8, "inpaint": 1.0}[mode]
    marks: list[float] = []

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def call(with_previews: bool) -> tuple[float, list[float]]:
        marks.clear()
        sync()
        start = time.perf_counter()
        runner.generate([spec if with_previews else dataclasses.replace(spec, previews=0)], width=side,
                        height=side, steps=steps, guidance_scale=5.0, mode=mode, strength=strength,
                        on_preview=lambda _i, _j, _imgs: marks.append(time.perf_counter() - start))
        sync()
        return time.perf_counter() - start, list(marks)

    call(True)  # warm-up (kernels, allocator)
    peak = CudaPeak() if cuda else contextlib.nullcontext()
    with peak:
        total, preview_at = call(True)
    plain = statistics.median(call(False)[0] for _ in range(2))
    return {"mode": mode, "strength": strength, "denoising_steps": int(steps * strength), "previews": len(preview_at),
            "preview_s": preview_at, "final_s": total, "final_without_previews_s": plain,
            "peak_extra_mb": peak.mb if isinstance(peak, CudaPeak) else None}


def measure(model: Path, device: str, dtype_name: str, side: int, steps: int, previews: int) -> dict[str, Any]:
    import diffusers
    import torch

    from server.sdxl.pipeline import PipelineOptions, SDXLRunner

    t0 = time.perf_counter()
    runner = SDXLRunner(PipelineOptions(model=model, device=device, dtype=dtype_name))
    load_s = time.perf_counter() - t0
    image, mask = _inputs(side)
    shared = all(runner.pipes[m].unet is runner.pipe.unet for m in ("img2img", "inpaint"))
    rows = []
    for mode in ("text2img", "img2img", "inpaint"):
        rows.append(run_mode(runner, mode, side, steps, previews, image, mask))
        print(json.dumps(rows[-1]), flush=True)
    params = sum(p.numel() for name in ("unet", "vae", "text_encoder", "text_encoder_2")
                 for p in getattr(runner.pipe, name).parameters())
    return {"device": torch.cuda.get_device_name() if runner.device == "cuda" else "cpu", "torch": torch.__version__,
            "diffusers": diffusers.__version__, "dtype": dtype_name, "side": side, "steps": steps,
            "params": params, "load_s": load_s, "edit_pipelines_share_the_unet": shared, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    ap = gpu_parser(__doc__)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--previews", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="the tiny random pipeline on the CPU (a check of this code)")
    args = ap.parse_args(argv)
    import torch

    with tempfile.TemporaryDirectory(prefix="sdxl-edit-") as tmp:
        if args.tiny:
            from server.sdxl.tiny import build_tiny_sdxl

            model = build_tiny_sdxl(Path(tmp) / "tiny", seed=0)
            result = measure(model, "cpu", "float32", 64, 4, args.previews)
        else:
            model = build_real_size(Path(tmp) / "sdxl-random", getattr(torch, args.dtype))
            result = measure(model, args.device, args.dtype, args.side, args.steps, args.previews)
            shutil.rmtree(model, ignore_errors=True)
    args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
