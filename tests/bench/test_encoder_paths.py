"""The benchmarked vision front end: our path computes the official path's numbers (tiny towers, float64)."""

import pytest
import torch

from bench.encoder import build, hr_size

TINY_CLIP = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_hidden_layers=3, image_size=56,
                 patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5)
TINY_CONVNEXT = dict(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32))


@pytest.mark.parametrize("layout", ["768px", "HD 1536px"])
def test_ours_equals_official(layout):
    fe = build(layout, "cpu", torch.float64, clip=TINY_CLIP, convnext=TINY_CONVNEXT, lm_hidden=48, seed=3)
    hr = torch.randn(2, 3, hr_size(fe), hr_size(fe), dtype=torch.float64)
    with torch.inference_mode():
        ref, ours = fe.official(hr), fe.ours(hr)
    views = 5 if layout.startswith("HD") else 1
    assert ours.shape == ref.shape == (2, views * 16, 48)
    assert ((ours - ref).norm() / ref.norm()).item() < 1e-10
    # The full tower is back in place after `ours` borrowed a truncated one.
    assert len(getattr(fe.clip, "vision_model", fe.clip).encoder.layers) == 3


def test_convnext_slabs_match_whole_map(monkeypatch):
    """The row-slab MLP (memory bound for HD) computes the same numbers as one pass over the map."""
    import engine.convnext as cnx
    tower = cnx.ConvNeXtTower(**TINY_CONVNEXT).double()
    x = torch.randn(2, 3, 96, 96, dtype=torch.float64)
    with torch.inference_mode():
        whole = tower(x)
        monkeypatch.setattr(cnx, "PIXELS_PER_SLAB", 50)  # forces several slabs, with a ragged last one
        slabs = tower(x)
    for a, b in zip(whole, slabs):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_engine_clip_path_matches_float64():
    """`ours` with the engine's own CLIP (vLLM's tower, its CPU GEMM dispatch) and the fused ConvNeXt computes the
    official math: float32 within the fp32 tolerance of the float64 evaluation. A child process, because vLLM's
    distributed state is process-wide."""
    import json
    import subprocess
    import sys

    code = f"""
import json, torch
from bench.encoder import build, images
kw = dict(clip={TINY_CLIP!r}, convnext={TINY_CONVNEXT!r}, lm_hidden=48, seed=3)
exact = build("HD 1536px", "cpu", torch.float64, **kw)
fe = build("HD 1536px", "cpu", torch.float32, **kw)
fe.use_engine_clip()
hr = images(exact, 2, torch.float64)
with torch.inference_mode():
    ref, ours = exact.exact(hr), fe.ours(hr.float())
print(json.dumps({{"err": ((ours.double() - ref).norm() / ref.norm()).item(), "engine": fe.engine_clip is not None,
                  "layers": len(fe.engine_clip.vision_model.encoder.layers)}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["engine"] and result["layers"] == TINY_CLIP["num_hidden_layers"] - 1
    assert result["err"] <= 1e-4, result


def test_rel_errors_of_both_paths():
    """The accuracy column of the GPU check, run here on the CPU at small sizes: both paths near float64."""
    from bench.encoder import rel_errors

    errors = rel_errors("HD 1536px", "cpu", torch.float32, clip=TINY_CLIP, convnext=TINY_CONVNEXT, lm_hidden=48, seed=3)
    assert set(errors) == {"official", "ours"}
    assert all(0 < e <= 1e-4 for e in errors.values()), errors
