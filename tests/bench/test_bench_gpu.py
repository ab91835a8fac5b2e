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
    assert {"bench.kernels_gpu", "bench.encoder", "bench.sdxl_gpu"} <= set(modules)
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
