"""engine.model outside an engine: official checkpoints load strictly (bad ones fail naming the key), the vision path
(vLLM CLIP → ConvNeXt → kernels.mine_patches → projector) equals the float64 reference, Gemma's lm_head tying."""

from __future__ import annotations

import json
import multiprocessing
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from engine.tiny import build_tiny


@pytest.fixture(scope="module")
def model_worker():
    """One spawned process with a private one-rank 'distributed' world (see vllm_inprocess.py)."""
    from support.vllm_inprocess import init_worker

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=init_worker) as pool:
        yield pool


def noise(seed: int, size=(70, 50)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def corrupt(src: Path, dst: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    """Copy a checkpoint, applying ``edit(weights, config)`` to its tensors and config.json."""
    shutil.copytree(src, dst)
    weights = load_file(src / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    edit(weights, config)
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(("backbone", "hd"), [("llama", False), ("llama", True), ("gemma", False), ("mixtral", False)])
def test_vision_path_matches_float64_reference(model_worker, tiny_checkpoint, backbone, hd):
    from bench.baselines.mgm_hf import MGMReference
    from support.vllm_inprocess import image_features

    path = tiny_checkpoint(backbone, hd)
    images = [noise(1), noise(2, (30, 90)), Image.new("RGB", (64, 64), (250, 250, 250))]
    got = model_worker.submit(image_features, str(path), images).result()
    ref = MGMReference(path, placeholder_id=0)
    want = torch.stack([ref.image_tokens(im) for im in images])
    assert got.shape == want.shape == (3, 80 if hd else 16, ref.config.hidden_size)
    err = ((got.double() - want).abs().max() / want.abs().max()).item()
    assert err < 1e-5, err  # float32 engine vs float64 reference, relative to the largest feature
    # the three images give three different feature blocks
    assert (want[0] - want[1]).abs().max() > 0.1 * want.abs().max()


def test_legacy_names_load(model_worker, tmp_path):
    from support.vllm_inprocess import load_error

    for backbone in ("llama", "gemma", "mixtral"):
        path = build_tiny(tmp_path / backbone, backbone=backbone, legacy_names=True)  # type: ignore[arg-type]
        assert json.loads((path / "config.json").read_text())["architectures"][0].startswith("MiniGemini")
        assert model_worker.submit(load_error, str(path)).result() is None


def _rename(old: str, new: str):  # type: ignore[no-untyped-def]
    def edit(weights, config):  # type: ignore[no-untyped-def]
        weights[new] = weights.pop(old)
    return edit


def _drop(key: str):  # type: ignore[no-untyped-def]
    def edit(weights, config):  # type: ignore[no-untyped-def]
        del weights[key]
    return edit


def _transpose(key: str):  # type: ignore[no-untyped-def]
    def edit(weights, config):  # type: ignore[no-untyped-def]
        weights[key] = weights[key].t().contiguous()
    return edit


def _extra(key: str):  # type: ignore[no-untyped-def]
    def edit(weights, config):  # type: ignore[no-untyped-def]
        weights[key] = torch.zeros(3)
    return edit


CORRUPTIONS = {
    "renamed": (_rename("model.vlm_uni_aux_projector.1.weight", "model.vlm_uni_aux_projector.1.weights"),
                r"unexpected tensor 'model\.vlm_uni_aux_projector\.1\.weights'"),
    "missing-convnext": (_drop("model.vision_tower_aux.vision_stages.2.blocks.1.gamma"),
                         r"missing 1 tensor\(s\): \['model\.vision_tower_aux\.vision_stages\.2\.blocks\.1\.gamma'\]"),
    "missing-llm": (_drop("model.layers.1.self_attn.k_proj.weight"),
                    r"missing 1 tensor\(s\): \['model\.layers\.1\.self_attn\.k_proj\.weight'\]"),
    "missing-unused-clip-layer": (_drop("model.vision_tower.vision_tower.vision_model.encoder.layers.2.mlp.fc1.bias"),
                                  r"'model\.vision_tower\.vision_tower\.vision_model\.encoder\.layers\.2\.mlp\.fc1\.bias'"),
    "wrong-shape": (_transpose("model.mm_projector.0.weight"),
                    r"'model\.mm_projector\.0\.weight' has shape \(64, 128\), expected \(128, 64\)"),
    "stray-tensor": (_extra("model.vision_tower.extra_head.weight"),
                     r"unexpected tensor 'model\.vision_tower\.extra_head\.weight'"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupted_checkpoint_names_the_key(model_worker, tiny_checkpoint, tmp_path, case):
    from support.vllm_inprocess import load_error

    edit, pattern = CORRUPTIONS[case]
    path = corrupt(tiny_checkpoint("llama"), tmp_path / case, edit)
    error = model_worker.submit(load_error, str(path)).result()
    assert error is not None and error.startswith("ValueError: "), error
    assert __import__("re").search(pattern, error), error


def test_gemma_lm_head_tying(model_worker, tiny_checkpoint, tmp_path):
    """docs/mgm.md §5.2: MGM-2B stores an lm_head although Gemma ties it. The stored tensor decides, as in vLLM 0.32 and
    transformers 5: an equal copy is tied again, a different one is used as the head (vLLM warns), an untied
    config loads it, and a tied config may omit it."""
    from support.vllm_inprocess import lm_head_report

    src = tiny_checkpoint("gemma")
    stored = load_file(src / "model.safetensors")
    embed = stored["model.embed_tokens.weight"]
    other = torch.randn(embed.shape, generator=torch.Generator().manual_seed(5)) * 0.05

    def different_head(weights, config):  # type: ignore[no-untyped-def]
        weights["lm_head.weight"] = other.clone()

    def untied(weights, config):  # type: ignore[no-untyped-def]
        different_head(weights, config)
        config["tie_word_embeddings"] = False

    def no_head(weights, config):  # type: ignore[no-untyped-def]
        del weights["lm_head.weight"]

    def report(path: Path) -> dict:  # type: ignore[type-arg]
        return model_worker.submit(lm_head_report, str(path)).result()

    plain = report(src)  # the tiny checkpoint stores an equal copy, like a tied training run would
    assert plain["tied"] and torch.equal(plain["head"], embed)
    for name, edit in (("tied-different", different_head), ("untied", untied)):
        got = report(corrupt(src, tmp_path / name, edit))
        assert not got["tied"] and torch.equal(got["head"], other) and torch.equal(got["embed"], embed), name
    absent = report(corrupt(src, tmp_path / "nohead", no_head))
    assert absent["tied"] and torch.equal(absent["head"], embed)
