"""The SDXL worker's precision defaults follow the official pipeline (``torch_dtype=float16, variant="fp16"``) on a
GPU; the fp16 weight variant is found in a layout written by diffusers itself (the tiny pipeline saved with
``variant="fp16"``)."""

from __future__ import annotations

import shutil

import torch
from diffusers import StableDiffusionXLPipeline

from server.sdxl.pipeline import resolve_dtype, resolve_variant


def test_official_precision_on_cuda_full_precision_on_cpu():
    assert resolve_dtype("auto", "cuda") == torch.float16
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cuda") == torch.bfloat16  # our earlier default, one flag away


def test_the_fp16_variant_is_used_when_running_fp16_and_shipped(tiny_sdxl, tmp_path):
    both = tmp_path / "both"
    shutil.copytree(tiny_sdxl, both)
    StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl)).save_pretrained(str(both), variant="fp16")
    assert any(both.glob("unet/*.fp16.safetensors"))
    assert resolve_variant("auto", both, torch.float16) == "fp16"
    assert resolve_variant("auto", both, torch.float32) is None  # full precision: the full-precision files
    assert resolve_variant("auto", tiny_sdxl, torch.float16) is None  # none shipped
    assert resolve_variant("fp16", tiny_sdxl, torch.float32) == "fp16" and resolve_variant(None, both, torch.float16) is None
