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
