"""The GPU check, as far as a CPU can check it: the script parses and runs only what exists, and the SDXL UNet step
timing is SDXL base's UNet and runs (small) on CPU."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def test_gpu_check_script_is_valid_bash_and_runs_existing_modules():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    modules = re.findall(r"python3 -m (bench\.\w+)", SCRIPT.read_text())
    assert {"bench.kernels_gpu", "bench.encoder", "bench.sdxl_gpu", "bench.sdxl_edit_gpu"} <= set(modules)
    for module in modules:
        assert (ROOT / (module.replace(".", "/") + ".py")).exists(), module


def test_sdxl_unet_config_is_sdxl_base():
    from bench.sdxl_gpu import SDXL_UNET, SDXL_UNET_PARAMS, build_unet

    unet = build_unet(SDXL_UNET, "meta")
    assert sum(p.numel() for p in unet.parameters()) == SDXL_UNET_PARAMS


def test_sdxl_step_timing_runs_small_on_cpu():
    from bench.report import sdxl_gpu_section
    from bench.sdxl_gpu import SDXL_UNET, measure

    small = {**SDXL_UNET, "block_out_channels": (32, 32, 64), "transformer_layers_per_block": (1, 1, 1),
             "attention_head_dim": (1, 2, 2), "cross_attention_dim": 32, "addition_time_embed_dim": 8,
             "projection_class_embeddings_input_dim": 6 * 8 + 16, "layers_per_block": 1, "norm_num_groups": 8}
    t0 = time.perf_counter()
    result = measure(small, "cpu", "float32", 64, [1, 2], warmup=0, iters=1, steps=30)
    assert time.perf_counter() - t0 < 60
    assert [r["unet_batch"] for r in result["rows"]] == [2, 4]
    assert all(r["ms_per_step"] > 0 and r["peak_extra_mb"] is None for r in result["rows"])
    assert "## SDXL UNet step, GPU" in sdxl_gpu_section(result)


def test_sdxl_edit_check_builds_sdxl_base_and_runs_tiny_on_cpu(tmp_path):
    """The edit GPU check's real-size components are SDXL base's (parameter counts on the meta device), and its
    measurement code runs end to end on the tiny pipeline, rendering its BENCHMARKS.md section."""
    import json

    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from bench.report import sdxl_edit_gpu_section
    from bench.sdxl_edit_gpu import CLIP_G, CLIP_L, SDXL_VAE, main

    with torch.device("meta"):
        counts = [sum(p.numel() for p in m.parameters()) for m in (
            AutoencoderKL(**SDXL_VAE), CLIPTextModel(CLIPTextConfig(**CLIP_L)),
            CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)))]
    assert counts == [83_653_863, 123_060_480, 694_659_840]
    out = tmp_path / "edit.json"
    main(["--tiny", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["edit_pipelines_share_the_unet"] is True
    assert [r["mode"] for r in data["rows"]] == ["text2img", "img2img", "inpaint"]
    assert all(r["previews"] == 2 and r["preview_s"] == sorted(r["preview_s"]) and r["preview_s"][-1] < r["final_s"]
               for r in data["rows"])
    assert "| img2img | 3 |" in sdxl_edit_gpu_section(data)
