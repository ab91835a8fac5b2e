"""kernels.mine_patches: every impl against an independent float64 evaluation of the official math."""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

from kernels import mine_patches
from kernels.contract import validate

# Off CUDA the Triton impl runs under TRITON_INTERPRET=1, which tests/conftest.py sets before triton is imported.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------------------------- inputs and oracle
def make_inputs(B, g, glob, G, M, C, D, chans, *, seed, dtype=torch.float64):
    """Fresh random, non-zero inputs; stage maps with non-zero means and different scales like ConvNeXt's."""
    gen = torch.Generator().manual_seed(seed)
    V, H0 = g * g + int(glob), g * G * M
    lr = torch.randn(B, V, G * G, C, generator=gen, dtype=torch.float64)
    stages = [torch.randn(B, c, -(-H0 // 2**i), -(-H0 // 2**i), generator=gen, dtype=torch.float64) * (1 + i) + 0.5 * i
              for i, c in enumerate(chans)]
    Ca = sum(chans)
    w = {}
    for p, width, out in (("query", C, D), ("aux", Ca, D), ("val", Ca, C)):
        w[f"vlm_uni_{p}_projector.0.weight"] = 1 + 0.2 * torch.randn(width, generator=gen, dtype=torch.float64)
        w[f"vlm_uni_{p}_projector.0.bias"] = 0.2 * torch.randn(width, generator=gen, dtype=torch.float64)
        # Large enough that the softmax is far from uniform, so wrong logits show.
        w[f"vlm_uni_{p}_projector.1.weight"] = 4 * torch.randn(out, width, generator=gen, dtype=torch.float64) / width**0.5
        w[f"vlm_uni_{p}_projector.1.bias"] = 0.2 * torch.randn(out, generator=gen, dtype=torch.float64)
    cast = lambda t: t.to(dtype=dtype, device=DEVICE)  # noqa: E731
    return cast(lr), [cast(s) for s in stages], {k: cast(v) for k, v in w.items()}


def _ln_linear(x, w, name):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + 1e-5) * w[f"vlm_uni_{name}_projector.0.weight"] + w[f"vlm_uni_{name}_projector.0.bias"]
    return y @ w[f"vlm_uni_{name}_projector.1.weight"].t() + w[f"vlm_uni_{name}_projector.1.bias"]


def _mine_view(x, fmap, w):
    """x (n, N, C), fmap (n, C_aux, G*M, G*M): windows with unfold, explicit LayerNorm, einsum attention."""
    n, N, _ = x.shape
    G = int(round(N**0.5))
    M = fmap.shape[-1] // G
    win = F.unfold(fmap, kernel_size=M, stride=M).view(n, fmap.shape[1], M * M, N).permute(0, 3, 2, 1)
    q, k, v = _ln_linear(x, w, "query"), _ln_linear(win, w, "aux"), _ln_linear(win, w, "val")
    att = torch.softmax(torch.einsum("nic,nijc->nij", q, k) / k.shape[-1] ** 0.5, -1)
    return x + torch.einsum("nij,nijc->nic", att, v)


def oracle(lr, stages, w, g, glob):
    lr, stages = lr.double().cpu(), [s.double().cpu() for s in stages]
    w = {k: v.double().cpu() for k, v in w.items()}
    B, V, N, C = lr.shape
    H0 = stages[0].shape[-1]
    fmap = torch.cat([stages[0]] + [F.interpolate(s, size=(H0, H0), mode="bilinear", align_corners=False)
                                    for s in stages[1:]], 1)
    t = H0 // g
    views = []
    if glob:
        # docs/mgm.md §2.3: the official bilinear 1/2 resize equals a 2x2 average pool.
        small = F.avg_pool2d(fmap, 2) if g == 2 else F.interpolate(fmap, scale_factor=1 / g, mode="bilinear")
        views.append(_mine_view(lr[:, g * g], small, w))
    for r in range(g):
        for c in range(g):
            views.append(_mine_view(lr[:, r * g + c], fmap[:, :, r * t:(r + 1) * t, c * t:(c + 1) * t], w))
    return torch.cat(views, 1)


def rel_err(out, ref):
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out.double().cpu() - ref).norm() / ref.norm()).item()


# (B, image_grid, image_global, G, M, C, D, stage channels)
CASES = {
    "normal": (2, 1, False, 3, 8, 16, 16, (8, 16, 24, 32)),
    "hd": (2, 2, True, 3, 4, 16, 16, (8, 16, 24, 32)),
    "odd": (1, 1, False, 5, 5, 8, 12, (4, 8, 8, 12)),  # N = 25, odd window, key width != C
    "grid3": (1, 3, False, 2, 8, 8, 8, (8, 8, 8, 8)),
    "hd_odd": (3, 2, True, 2, 6, 12, 20, (6, 10, 14, 18)),
}


def _run(case, impl, dtype, seed):
    B, g, glob, G, M, C, D, chans = CASES[case]
    lr, st, w = make_inputs(B, g, glob, G, M, C, D, chans, seed=seed, dtype=dtype)
    out = mine_patches(lr, st, w, image_grid=g, image_global=glob, impl=impl)
    assert out.shape == (B, (g * g + int(glob)) * G * G, C) and out.dtype == dtype
    return out, oracle(lr, st, w, g, glob)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_float64_exact(case, impl):
    out, ref = _run(case, impl, torch.float64, seed=zlib.crc32(f"{case}/{impl}".encode()) % 1000)
    assert rel_err(out, ref) < 1e-12


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("impl", ["reference", "torch", "triton"])
def test_float32(case, impl):
    out, ref = _run(case, impl, torch.float32, seed=7 + zlib.crc32(f"{case}/{impl}".encode()) % 1000)
    assert rel_err(out, ref) <= 1e-4


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(impl, dtype):
    out, ref = _run("hd", impl, dtype, seed=11)
    assert rel_err(out, ref) <= (2e-2 if dtype == torch.bfloat16 else 4e-3)


def test_auto_picks_a_working_impl():
    out, ref = _run("normal", "auto", torch.float32, seed=3)
    assert rel_err(out, ref) <= 1e-4


def test_triton_writes_every_element(monkeypatch):
    """Poison the kernels' output buffers with NaN: any element they do not write survives into the result."""
    from kernels import triton_impl

    launch = triton_impl.launch_kernels
    written = {}

    def poisoned(spec, hr_stages, u, usum, agg, shift, **options):  # type: ignore[no-untyped-def]
        agg.fill_(float("nan"))
        shift.fill_(float("nan"))
        launch(spec, hr_stages, u, usum, agg, shift, **options)
        written.update(agg=agg.clone(), shift=shift.clone())

    monkeypatch.setattr(triton_impl, "launch_kernels", poisoned)
    B, g, glob, G, M, C, D, chans = CASES["hd_odd"]
    lr, st, w = make_inputs(B, g, glob, G, M, C, D, chans, seed=5, dtype=torch.float32)
    out = triton_impl.mine_triton(lr, st, w, validate(lr, st, w, g, glob))
    assert torch.isfinite(written["agg"]).all() and torch.isfinite(written["shift"]).all()
    assert rel_err(out, oracle(lr, st, w, g, glob)) <= 1e-4


def test_channels_last_stage_maps():
    B, g, glob, G, M, C, D, chans = CASES["normal"]
    lr, st, w = make_inputs(B, g, glob, G, M, C, D, chans, seed=9, dtype=torch.float32)
    st_cl = [s.contiguous(memory_format=torch.channels_last) for s in st]
    ref = oracle(lr, st, w, g, glob)
    for impl in ("torch", "triton"):
        assert rel_err(mine_patches(lr, st_cl, w, impl=impl), ref) <= 1e-4


def test_image_changes_output():
    """The mined term is not negligible: perturbing the high-res map moves the result."""
    lr, st, w = make_inputs(*CASES["normal"][:5], 16, 16, (8, 16, 24, 32), seed=1, dtype=torch.float32)
    a = mine_patches(lr, st, w, impl="torch")
    b = mine_patches(lr, [s.flip(-1) for s in st], w, impl="torch")
    assert rel_err(a, b.double().cpu()) > 1e-2


# ------------------------------------------------------------------------------------------------- bad arguments
def _good():
    return make_inputs(2, 2, True, 3, 4, 16, 16, (8, 16, 24, 32), seed=0, dtype=torch.float32)


def _bad_cases():
    def lr_3d(lr, st, w):
        return lr[0], st, w, {}

    def views(lr, st, w):
        return lr[:, :4], st, w, {}

    def not_square(lr, st, w):
        return lr[:, :, :8], st, w, {}

    def three_stages(lr, st, w):
        return lr, st[:3], w, {}

    def stage_dtype(lr, st, w):
        return lr, [st[0], st[1].double(), st[2], st[3]], w, {}

    def stage_batch(lr, st, w):
        return lr, [st[0], st[1][:1], st[2], st[3]], w, {}

    def stage_rect(lr, st, w):
        return lr, [st[0], st[1], st[2][..., :-1], st[3]], w, {}

    def hr_size(lr, st, w):
        return lr, [st[0][..., :-1, :-1]] + st[1:], w, {}

    def missing_key(lr, st, w):
        return lr, st, {k: v for k, v in w.items() if k != "vlm_uni_val_projector.1.bias"}, {}

    def key_shape(lr, st, w):
        return lr, st, {**w, "vlm_uni_aux_projector.1.weight": w["vlm_uni_aux_projector.1.weight"][:, 1:]}, {}

    def global_without_grid(lr, st, w):
        return lr[:, :2], st, w, {"image_grid": 1, "image_global": True}

    def int_feats(lr, st, w):
        return lr.int(), st, w, {}

    def unknown_impl(lr, st, w):
        return lr, st, w, {"impl": "cuda"}

    return {
        "lr_3d": (lr_3d, r"lr_feats: expected a 4-d tensor"),
        "views": (views, r"lr_feats: dim 1 \(views\) is 4, expected 5"),
        "not_square": (not_square, r"lr_feats: dim 2 .* is 8, which is not a square"),
        "three_stages": (three_stages, r"hr_stages: expected a list of the 4"),
        "stage_dtype": (stage_dtype, r"hr_stages\[1\]: dtype torch.float64 differs"),
        "stage_batch": (stage_batch, r"hr_stages\[1\]: dim 0 \(batch\) is 1, expected 2"),
        "stage_rect": (stage_rect, r"hr_stages\[2\]: dims 2, 3 are .*square"),
        "hr_size": (hr_size, r"hr_stages\[0\]: dim 2 \(height\) is 23"),
        "missing_key": (missing_key, r"weights: missing key 'vlm_uni_val_projector.1.bias'"),
        "key_shape": (key_shape, r"weights\['vlm_uni_aux_projector.1.weight'\]: shape \(16, 79\), expected \(16, 80\)"),
        "global_without_grid": (global_without_grid, r"image_global: a global view needs image_grid >= 2"),
        "int_feats": (int_feats, r"lr_feats: dtype torch.int32 is not a floating type"),
        "unknown_impl": (unknown_impl, r"impl: expected one of"),
    }


@pytest.mark.parametrize("name", sorted(_bad_cases()))
def test_bad_arguments(name):
    mutate, pattern = _bad_cases()[name]
    lr, st, w, kw = mutate(*_good())
    kw = {"image_grid": 2, "image_global": True, **kw}
    with pytest.raises(ValueError, match=pattern):
        mine_patches(lr, st, w, **kw)


def test_triton_rejects_float64():
    lr, st, w = make_inputs(*CASES["normal"][:5], 16, 16, (8, 16, 24, 32), seed=0, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"lr_feats: dtype float64 is not supported by impl='triton'"):
        mine_patches(lr, st, w, impl="triton")
