"""engine.tiny: official key set and shapes, config, tokenizer, determinism, and that the image moves the logits."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    CLIPVisionModel,
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from engine.config import CONFIG_CLASSES, validate_mm_config
from engine.convnext import ConvNeXtTower
from engine.names import IMAGE_TOKEN_INDEX
from engine.prompt import TEMPLATES, render_prompt, tokenize_official
from engine.tiny import OFFICIAL_MM_KEYS, build_tiny
from engine.weights import official_weight_layout
from kernels.reference import concat_stages

ARCH = {"llama": "MGMLlamaForCausalLM", "gemma": "MGMGemmaForCausalLM", "mixtral": "MGMMixtralForCausalLM"}
MODEL_TYPE = {"llama": "mgm", "gemma": "mgm_gemma", "mixtral": "mgm_mixtral"}
CLIP_PREFIX = "model.vision_tower.vision_tower.vision_model."
VISION_PREFIXES = ("model.vision_tower.", "model.vision_tower_aux.", "model.mm_projector.", "model.vlm_uni_")


def split(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


def llm_part(weights):
    return {k: v for k, v in weights.items() if not k.startswith(VISION_PREFIXES)}


def meta_shapes(module_cls, config) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = module_cls(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("backbone", ["llama", "gemma", "mixtral"])
def test_layout_and_shapes(tiny_checkpoint, backbone):
    path = tiny_checkpoint(backbone)
    config = AutoConfig.from_pretrained(path)
    assert type(config) is CONFIG_CLASSES[MODEL_TYPE[backbone]]
    assert config.architectures == [ARCH[backbone]]
    weights = load_file(path / "model.safetensors")
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values())
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    assert shapes == {k: s for k, (s, _) in official_weight_layout(config).items()}
    h, dv, da = config.hidden_size, config.mm_hidden_size, config.mm_hidden_size_aux
    assert da == sum(config.vision_aux_config["dims"])

    # LLM keys: exactly HF's names for Llama/Gemma; Mixtral keeps the released per-expert names.
    llm = {k: tuple(v.shape) for k, v in llm_part(weights).items()}
    if backbone == "llama":
        assert llm == meta_shapes(LlamaForCausalLM, LlamaConfig(**config.to_dict()))
    elif backbone == "gemma":
        # separate lm_head stored like MGM-2B, equal to the tied embedding
        assert llm == {**meta_shapes(GemmaForCausalLM, GemmaConfig(**config.to_dict())), "lm_head.weight": (config.vocab_size, h)}
        assert torch.equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"])
    else:
        e, inter, n = config.num_local_experts, config.intermediate_size, config.num_hidden_layers
        moe = {k for k in llm if ".block_sparse_moe." in k}
        assert len(moe) == n * (1 + 3 * e)
        for i in range(n):
            assert llm[f"model.layers.{i}.block_sparse_moe.gate.weight"] == (e, h)
            for j in range(e):
                assert llm[f"model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight"] == (inter, h)
                assert llm[f"model.layers.{i}.block_sparse_moe.experts.{j}.w2.weight"] == (h, inter)
                assert llm[f"model.layers.{i}.block_sparse_moe.experts.{j}.w3.weight"] == (inter, h)
        assert not any(".mlp." in k for k in llm)
    assert llm["lm_head.weight"] == (config.vocab_size, h) and llm["model.norm.weight"] == (h,)

    # Projectors (docs/mgm.md §5.2)
    assert shapes["model.mm_projector.0.weight"] == (h, dv) and shapes["model.mm_projector.2.weight"] == (h, h)
    assert "model.mm_projector.1.weight" not in shapes  # index 1 is the GELU
    assert shapes["model.vlm_uni_query_projector.0.weight"] == (dv,)
    assert shapes["model.vlm_uni_query_projector.1.weight"] == (dv, dv)
    for name in ("aux", "val"):
        assert shapes[f"model.vlm_uni_{name}_projector.0.bias"] == (da,)
        assert shapes[f"model.vlm_uni_{name}_projector.1.weight"] == (dv, da)

    # CLIP: HF's CLIP vision names under the official prefix, including the unused tail.
    clip_cfg = config.clip_vision_config()
    clip = {k: tuple(v.shape) for k, v in split(weights, CLIP_PREFIX).items()}
    hf_clip = meta_shapes(CLIPVisionModel, clip_cfg)
    hf_clip = {k.removeprefix("vision_model."): s for k, s in hf_clip.items()}  # transformers 4.x had the prefix
    assert clip == hf_clip
    assert f"encoder.layers.{clip_cfg.num_hidden_layers - 1}.mlp.fc2.weight" in clip and "post_layernorm.weight" in clip
    assert not [k for k in weights if k.startswith("model.vision_tower.") and not k.startswith(CLIP_PREFIX)]

    # ConvNeXt loads strictly into our tower.
    tower = ConvNeXtTower.from_config(config)
    tower.load_state_dict(split(weights, "model.vision_tower_aux."), strict=True)


@pytest.mark.parametrize(("backbone", "hd"), [("llama", False), ("gemma", True), ("mixtral", False)])
def test_config_json(tiny_checkpoint, backbone, hd):
    path = tiny_checkpoint(backbone, hd)
    raw = json.loads((path / "config.json").read_text())
    assert raw["model_type"] == MODEL_TYPE[backbone] and raw["architectures"] == [ARCH[backbone]]
    assert set(OFFICIAL_MM_KEYS) <= set(raw)
    assert raw["mm_projector_type"] == "mlp2x_gelu" and raw["mm_vision_select_layer"] == -2
    assert raw["image_aspect_ratio"] == "pad" and raw["mm_vision_tower"].startswith("model_zoo/")
    assert raw["image_grid"] == (2 if hd else 1) and raw["image_global"] is hd
    assert raw["tokenizer_model_max_length"] == (4096 if hd else 2048)
    assert raw["head_dim"] == 64
    geometry = validate_mm_config(AutoConfig.from_pretrained(path))
    assert (geometry.grid, geometry.window) == (4, 8)
    assert (geometry.hr_size, geometry.tokens_per_image) == ((256, 80) if hd else (128, 16))
    gen = json.loads((path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == raw["eos_token_id"] and gen["bos_token_id"] == raw["bos_token_id"]


@pytest.mark.parametrize("backbone", ["llama", "gemma", "mixtral"])
def test_tokenizer(tiny_checkpoint, tiny_tokenizer, backbone):
    path = tiny_checkpoint(backbone)
    tok = tiny_tokenizer(backbone)
    config = AutoConfig.from_pretrained(path)
    vocab = tok.get_vocab()
    assert "<image>" not in vocab and len(tok("<image>").input_ids) > 2  # plain text, several pieces
    assert len(tok) == config.vocab_size
    assert (tok.bos_token_id, tok.eos_token_id) == (config.bos_token_id, config.eos_token_id)
    if backbone == "gemma":
        assert [vocab[t] for t in ("<pad>", "<eos>", "<bos>", "<unk>")] == [0, 1, 2, 3]
        assert {"<start_of_turn>", "<end_of_turn>"} <= set(vocab)
    else:
        assert [vocab[t] for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    assert "<0x0A>" in vocab  # byte fallback: any text encodes without <unk>
    text = "Ünïcödé 日本語 🙂 tabs\tand\nnewlines"
    assert tok.unk_token_id not in tok(text).input_ids
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text
    # chat template file = the official template of the family
    assert (path / "chat_template.jinja").is_file()
    name = {"llama": "vicuna_v1", "gemma": "gemma", "mixtral": "mistral_instruct"}[backbone]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
                {"role": "assistant", "content": "A cat."}, {"role": "user", "content": "Color?"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == render_prompt(messages, name)
    assert name in TEMPLATES


def test_deterministic_and_seeded(tmp_path):
    a = build_tiny(tmp_path / "a", backbone="mixtral", seed=7)
    b = build_tiny(tmp_path / "b", backbone="mixtral", seed=7)
    c = build_tiny(tmp_path / "c", backbone="mixtral", seed=8)
    files = ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "chat_template.jinja", "tiny_build.json")
    assert sorted(p.name for p in a.iterdir()) == sorted(files)
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()
    with safe_open(a / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert json.loads((a / "tiny_build.json").read_text())["seed"] == 7
    # Across processes too (another hash seed; via the CLI entry point).
    d = tmp_path / "d"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-m", "server", "build-tiny", str(d), "--backbone", "mixtral", "--seed", "7"],
                   check=True, env=env, capture_output=True, timeout=120)
    for name in files:
        assert (a / name).read_bytes() == (d / name).read_bytes(), name


def test_legacy_names_and_dtype(tmp_path):
    path = build_tiny(tmp_path / "old", backbone="gemma", legacy_names=True, dtype="bfloat16")
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "mini_gemini_gemma" and config.architectures == ["MiniGeminiGemmaForCausalLM"]
    weights = load_file(path / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}


# ---- the image must matter: a plain HF/torch forward of the whole MGM pipeline (docs/mgm.md §2.2) -----------------------


def _ln_linear(weights, prefix, x):
    p = split(weights, prefix)
    x = F.layer_norm(x, p["0.weight"].shape, p["0.weight"], p["0.bias"], 1e-5)
    return F.linear(x, p["1.weight"], p["1.bias"])


def _image_tokens(weights, config, clip, tower, lr, hr):
    x = clip(lr, output_hidden_states=True).hidden_states[config.mm_vision_select_layer][:, 1:]
    f = concat_stages(tower(hr))
    b, c, s, _ = f.shape
    g = config.clip_vision_config().image_size // config.clip_vision_config().patch_size
    m = s // g
    win = f.reshape(b, c, g, m, g, m).permute(0, 2, 4, 3, 5, 1).reshape(b, g * g, m * m, c)
    q = _ln_linear(weights, "model.vlm_uni_query_projector.", x)
    k = _ln_linear(weights, "model.vlm_uni_aux_projector.", win)
    v = _ln_linear(weights, "model.vlm_uni_val_projector.", win)
    att = (torch.einsum("bnc,bnmc->bnm", q, k) / math.sqrt(k.shape[-1])).nan_to_num().softmax(-1)
    feats = x + torch.einsum("bnm,bnmc->bnc", att, v)
    p = split(weights, "model.mm_projector.")
    return F.linear(F.gelu(F.linear(feats, p["0.weight"], p["0.bias"])), p["2.weight"], p["2.bias"])


def test_image_visibly_changes_logits(tiny_checkpoint, tiny_tokenizer):
    from PIL import Image

    from engine.processor import MGMImageProcessor

    path = tiny_checkpoint("llama")
    config = AutoConfig.from_pretrained(path)
    weights = load_file(path / "model.safetensors")
    clip = CLIPVisionModel(config.clip_vision_config()).eval()
    clip.load_state_dict(split(weights, CLIP_PREFIX), strict=True)
    tower = ConvNeXtTower.from_config(config)
    tower.load_state_dict(split(weights, "model.vision_tower_aux."), strict=True)
    llm = LlamaForCausalLM(LlamaConfig(**config.to_dict())).eval()
    llm.load_state_dict(llm_part(weights), strict=True)

    tok = tiny_tokenizer("llama")
    prompt = render_prompt([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}], "vicuna_v1")
    ids, (pos,) = tokenize_official(tok, prompt)
    proc = MGMImageProcessor.from_config(config)
    gen = torch.Generator().manual_seed(0)

    def last_logits(image):
        px = proc(image)
        with torch.no_grad():
            feats = _image_tokens(weights, config, clip, tower, px["pixel_values"][:, 0], px["pixel_values_aux"])[0]
            emb = llm.model.embed_tokens(torch.tensor([i if i != IMAGE_TOKEN_INDEX else 0 for i in ids]))
            embeds = torch.cat([emb[:pos], feats, emb[pos + 1:]])[None]
            return llm(inputs_embeds=embeds).logits[0, -1]

    noise = Image.fromarray((torch.rand(60, 80, 3, generator=gen) * 255).byte().numpy())
    red = Image.new("RGB", (50, 50), (200, 30, 30))
    a, b = last_logits(noise), last_logits(red)
    assert 0.3 < a.std() < 3  # logits of sane scale
    # The two images move the next-token logits by a sizeable fraction of their spread.
    assert (a - b).std() > 0.2 * a.std()


def test_real_vision_sizes_match_the_released_checkpoints():
    """`mgm build-tiny --vision real`: the released towers' geometry (576 tokens per image at HR 768; HD: 2880 at
    1536) with the tiny LLM, so benchmarks pay the real encoder cost."""
    from engine.config import VisionGeometry
    from engine.tiny import build_config, tiny_spec

    for hd, tokens, hr in ((False, 576, 768), (True, 2880, 1536)):
        config = build_config("llama", vocab_size=1000, hd=hd, spec=tiny_spec("real"))
        geometry = VisionGeometry.from_config(config)
        assert (geometry.tokens_per_image, geometry.hr_size, geometry.lr_size) == (tokens, hr, 336)
        assert config.mm_hidden_size == 1024 and config.mm_hidden_size_aux == 192 + 384 + 768 + 1536
    with pytest.raises(ValueError, match="vision"):
        tiny_spec("huge")
