"""SDXL UNet denoising-step time at real size with random weights (no download): the GPU part of the SDXL pool's
cost model. Part of bench/gpu_check.sh; never run in CI.

    python3 -m bench.sdxl_gpu --json OUT/sdxl_gpu.json            # CUDA, bf16, 1024², SDPA attention

The UNet is built from SDXL base 1.0's ``unet/config.json`` values (written out below; 2.567 B parameters, checked)
and initialised randomly — step time does not depend on the weights' values. One UNet call with classifier-free
guidance runs on 2 × images latents (conditional + unconditional), as ``StableDiffusionXLPipeline`` does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
from typing import Any

from bench.measure import CudaPeak

#: stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the non-default entries).
SDXL_UNET: dict[str, Any] = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280), "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),  # diffusers' legacy name: head counts
    "cross_attention_dim": 2048, "use_linear_projection": True, "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816, "norm_num_groups": 32,
}
SDXL_UNET_PARAMS = 2_567_463_684
TEXT_TOKENS = 77
POOLED_DIM = 1280  # text_encoder_2's projection


def build_unet(config: dict[str, Any] = SDXL_UNET, device: str = "cpu", dtype: Any = None):  # type: ignore[no-untyped-def]
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        unet = UNet2DConditionModel(**config)
    if dtype is not None:
        unet = unet.to(dtype)
    return unet.eval()


def unet_inputs(config: dict[str, Any], batch: int, side: int, device: str, dtype: Any) -> dict[str, Any]:
    """Inputs of one guided step for ``batch`` latents of a ``side``² image (VAE factor 8)."""
    import torch

    lat = side // 8
    return {
        "sample": torch.randn(batch, config["in_channels"], lat, lat, device=device, dtype=dtype),
        "timestep": torch.tensor(500, device=device),
        "encoder_hidden_states": torch.randn(batch, TEXT_TOKENS, config["cross_attention_dim"], device=device,
                                             dtype=dtype),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(batch, config["projection_class_embeddings_input_dim"]
                                       - 6 * config["addition_time_embed_dim"], device=device, dtype=dtype),
            "time_ids": torch.tensor([[side, side, 0, 0, side, side]] * batch, device=device, dtype=dtype)},
    }


def time_step(unet, inputs: dict[str, Any], warmup: int, iters: int) -> float:  # type: ignore[no-untyped-def]
    """Median milliseconds of one UNet call (CUDA events on GPU, perf_counter on CPU)."""
    import statistics

    import torch

    cuda = inputs["sample"].is_cuda
    times = []
    with torch.inference_mode():
        for i in range(warmup + iters):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                unet(**inputs, return_dict=False)
                end.record()
                torch.cuda.synchronize()
                ms = start.elapsed_time(end)
            else:
                t0 = time.perf_counter()
                unet(**inputs, return_dict=False)
                ms = 1000 * (time.perf_counter() - t0)
            if i >= warmup:
                times.append(ms)
    return statistics.median(times)


def measure(config: dict[str, Any], device: str, dtype_name: str, side: int, images: list[int], warmup: int,
            iters: int, steps: int) -> dict[str, Any]:
    import torch

    dtype = getattr(torch, dtype_name)
    unet = build_unet(config, device, dtype)
    params = sum(p.numel() for p in unet.parameters())
    rows = []
    for n in images:
        inputs = unet_inputs(config, 2 * n, side, device, dtype)  # guidance: conditional + unconditional
        peak = CudaPeak() if device == "cuda" else contextlib.nullcontext()
        with peak:
            ms = time_step(unet, inputs, warmup, iters)
        rows.append({"images": n, "unet_batch": 2 * n, "ms_per_step": ms, "ms_per_step_per_image": ms / n,
                     f"images_per_s_{steps}_steps": 1000 * n / (ms * steps),
                     "peak_extra_mb": peak.mb if isinstance(peak, CudaPeak) else None})
        print(json.dumps(rows[-1]), flush=True)
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    import diffusers

    return {"device": device_name, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "dtype": dtype_name, "side": side, "steps": steps, "params": params,
            "attention": "PyTorch SDPA (diffusers default)", "rows": rows}


def gpu_parser(doc: str | None) -> argparse.ArgumentParser:
    """The flags every SDXL GPU check takes: where the JSON goes, device, dtype, image side."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--side", type=int, default=1024)
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = gpu_parser(__doc__)
    ap.add_argument("--images", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--steps", type=int, default=30, help="denoising steps per image for the images/s column")
    args = ap.parse_args(argv)
    result = measure(SDXL_UNET, args.device, args.dtype, args.side, args.images, args.warmup, args.iters, args.steps)
    if result["params"] != SDXL_UNET_PARAMS:
        raise SystemExit(f"built {result['params']} parameters, SDXL base has {SDXL_UNET_PARAMS}: config drifted")
    args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
