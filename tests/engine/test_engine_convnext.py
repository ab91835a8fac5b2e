"""engine.convnext: checkpoint parameter names, stage shapes, and numerics against an independent fp64 version."""

from __future__ import annotations

import math

import pytest
import torch

from engine.config import MGMConfig
from engine.convnext import ConvNeXtTower
from bench.baselines.mgm_hf import reference_convnext
from kernels.reference import concat_stages

DEPTHS_L, DIMS_L = (3, 3, 27, 3), (192, 384, 768, 1536)


def expected_convnext_keys(depths, dims) -> dict[str, tuple[int, ...]]:
    """Official keys after ``model.vision_tower_aux.`` (docs/mgm.md §5.2), written out independently of the module."""
    keys = {
        "vision_stem.0.weight": (dims[0], 3, 4, 4),
        "vision_stem.0.bias": (dims[0],),
        "vision_stem.1.weight": (dims[0],),
        "vision_stem.1.bias": (dims[0],),
    }
    for s, (depth, dim) in enumerate(zip(depths, dims)):
        if s > 0:
            keys[f"vision_stages.{s}.downsample.0.weight"] = (dims[s - 1],)
            keys[f"vision_stages.{s}.downsample.0.bias"] = (dims[s - 1],)
            keys[f"vision_stages.{s}.downsample.1.weight"] = (dim, dims[s - 1], 2, 2)
            keys[f"vision_stages.{s}.downsample.1.bias"] = (dim,)
        for b in range(depth):
            p = f"vision_stages.{s}.blocks.{b}."
            keys[p + "conv_dw.weight"] = (dim, 1, 7, 7)
            keys[p + "conv_dw.bias"] = (dim,)
            keys[p + "norm.weight"] = (dim,)
            keys[p + "norm.bias"] = (dim,)
            keys[p + "mlp.fc1.weight"] = (4 * dim, dim)
            keys[p + "mlp.fc1.bias"] = (4 * dim,)
            keys[p + "mlp.fc2.weight"] = (dim, 4 * dim)
            keys[p + "mlp.fc2.bias"] = (dim,)
            keys[p + "gamma"] = (dim,)
    return keys


def test_convnext_large_names_and_shapes_on_meta():
    with torch.device("meta"):
        tower = ConvNeXtTower.from_config(MGMConfig())  # default vision_aux_config → ConvNeXt-L
    state = {k: tuple(v.shape) for k, v in tower.state_dict().items()}
    assert state == expected_convnext_keys(DEPTHS_L, DIMS_L)
    assert len(state) == 340  # ~340 keys, as the released index files suggest (docs/mgm.md §5.1)
    # 196.2 M parameters: the size arithmetic of docs/mgm.md §5.1.
    assert round(sum(math.prod(s) for s in state.values()) / 1e6, 1) == 196.2
    assert sum(tower.dims) == MGMConfig().convnext_spec().hidden_size == 2880
    assert not tower.training


def test_stage_shapes_and_concat():
    torch.manual_seed(0)
    tower = ConvNeXtTower((1, 1, 2, 1), (8, 16, 24, 32))
    with torch.no_grad():
        stages = tower(torch.randn(2, 3, 64, 64))
    assert [tuple(s.shape) for s in stages] == [(2, 8, 16, 16), (2, 16, 8, 8), (2, 24, 4, 4), (2, 32, 2, 2)]
    assert tuple(concat_stages(stages).shape) == (2, 80, 16, 16)


# ---- independent float64 reference: bench/baselines/mgm_hf.py (shared with the serving baseline) ----


@pytest.mark.parametrize("size", [64, 96])
def test_numerics_match_fp64_reference(size):
    depths, dims = (2, 1, 3, 1), (8, 16, 24, 32)
    tower = ConvNeXtTower(depths, dims)
    gen = torch.Generator().manual_seed(size)
    with torch.no_grad():
        for name, param in tower.named_parameters():
            # Non-trivial values everywhere (incl. norms and a large layer scale) so that every term matters.
            if name.endswith("gamma"):
                param.copy_(0.5 + 0.1 * torch.randn(param.shape, generator=gen))
            elif param.ndim == 1 and ("norm" in name or name.endswith(("stem.1.weight", "downsample.0.weight"))):
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=gen))
            else:
                fan_in = math.prod(param.shape[1:]) if param.ndim > 1 else 10
                param.copy_(torch.randn(param.shape, generator=gen) / math.sqrt(fan_in))
    x = torch.randn(2, 3, size, size, generator=gen)
    params = dict(tower.state_dict())
    ref = reference_convnext(params, depths, x)
    with torch.no_grad():
        got32 = tower(x)
        got64 = tower.double()(x.double())
    for r, g32, g64 in zip(ref, got32, got64):
        assert g32.dtype == torch.float32
        assert torch.allclose(g64, r, atol=1e-10, rtol=1e-10)
        assert (g32.double() - r).abs().max() <= 1e-4 * max(1.0, r.abs().max().item())
    # Deterministic eval semantics: no drop path, identical repeated calls.
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(tower(x.double()), tower(x.double())))


# ---- the fused CPU path (oneDNN linear + GELU, channels-last, residual written in place) ----


def _nontrivial_tower(depths=(2, 1, 3, 1), dims=(8, 16, 24, 32), seed=0) -> ConvNeXtTower:
    tower = ConvNeXtTower(depths, dims)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in tower.named_parameters():
            scale = 0.5 if name.endswith("gamma") else 1 / math.sqrt(max(1, math.prod(param.shape[1:])))
            param.copy_((1.0 if name.endswith("gamma") else 0.0) + scale * torch.randn(param.shape, generator=gen))
    return tower


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_cpu_default_is_the_fused_path(monkeypatch):
    from engine import convnext

    tower = _nontrivial_tower()
    calls = []
    real = convnext.ConvNeXtBlock._forward_onednn
    monkeypatch.setattr(convnext.ConvNeXtBlock, "_forward_onednn",
                        lambda self, x: calls.append(x.dtype) or real(self, x))
    with torch.no_grad():
        stages = tower(torch.randn(1, 3, 64, 64))
        assert len(calls) == sum(tower.depths)  # every block, with no flag set
        assert all(s.is_contiguous(memory_format=torch.channels_last) for s in stages)
        tower.double()(torch.randn(1, 3, 64, 64, dtype=torch.float64))
        assert len(calls) == sum(tower.depths)  # float64 (the exact reference) never takes it
        tower.float().use_onednn(False)(torch.randn(1, 3, 64, 64))
        assert len(calls) == sum(tower.depths)
    tower.use_onednn(True)(torch.randn(1, 3, 64, 64))  # with autograd on (training code): the plain, differentiable block
    assert len(calls) == sum(tower.depths)


@pytest.mark.parametrize("slab", [16384, 100])  # 100: many slabs, the last one partial
def test_fused_path_matches_fp64_reference(monkeypatch, slab):
    from engine import convnext

    monkeypatch.setattr(convnext, "PIXELS_PER_SLAB", slab)
    tower = _nontrivial_tower()
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    ref = reference_convnext(dict(tower.state_dict()), tower.depths, x)
    with torch.no_grad():
        fused32 = tower(x)
        plain32 = tower.use_onednn(False)(x)
        tower.use_onednn(True)
        for f, p, r in zip(fused32, plain32, ref):
            assert _rel(f, r) <= 1e-5 and _rel(f, p) <= 1e-5
        if convnext.onednn_fusable(torch.empty(1, dtype=torch.bfloat16)):
            fused16 = tower.to(torch.bfloat16)(x)
            plain16 = tower.use_onednn(False)(x)
            for f, p, r in zip(fused16, plain16, ref):
                assert f.dtype == torch.bfloat16
                # bf16 tolerance of the mining kernels' tests; no worse than the plain path at the same dtype
                assert _rel(f, r) <= 2e-2 and _rel(f, r) <= 1.2 * _rel(p, r) + 1e-3
