"""engine.config: the six model types, official keys, defaults, family routing and the vision geometry."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
from transformers import AutoConfig, GemmaConfig, LlamaConfig, MixtralConfig

from engine.config import (
    CONFIG_CLASSES,
    MGMConfig,
    MGMGemmaConfig,
    MGMMixtralConfig,
    VisionGeometry,
    backbone_family,
    clip_layers_needed,
    register_configs,
    validate_mm_config,
)
from engine.names import ARCHITECTURE_TO_FAMILY, FAMILY_TO_TEXT_ARCHITECTURE

# A config.json as the official training script writes it for MGM-7B (docs/mgm.md §1.2), LLM part abridged.
OFFICIAL_7B = {
    "architectures": ["MiniGeminiLlamaForCausalLM"],
    "model_type": "mini_gemini",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "torch_dtype": "bfloat16",
    "vocab_size": 32000,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "mm_vision_tower": "model_zoo/OpenAI/clip-vit-large-patch14-336",
    "mm_vision_tower_aux": "model_zoo/OpenAI/openclip-convnext-large-d-320-laion2B-s29B-b131K-ft-soup",
    "mm_hidden_size": 1024,
    "mm_hidden_size_aux": 2880,
    "mm_projector_type": "mlp2x_gelu",
    "mm_vision_select_layer": -2,
    "mm_vision_select_feature": "patch",
    "use_mm_proj": True,
    "image_size_aux": 768,
    "optimize_vision_tower": False,
    "optimize_vision_tower_aux": False,
    "image_grid": 1,
    "image_global": False,
    "image_aspect_ratio": "pad",
    "image_grid_pinpoints": None,
    "tokenizer_padding_side": "right",
    "tokenizer_model_max_length": 2048,
    "tune_mm_mlp_adapter": False,
    "freeze_mm_mlp_adapter": False,
    "mm_projector_lr": None,
    "mm_use_im_start_end": False,
    "mm_use_im_patch_token": False,
    "use_cache": True,
}

BASES = {"llama": LlamaConfig, "gemma": GemmaConfig, "mixtral": MixtralConfig}
MODEL_TYPES = {
    "mgm": "llama",
    "mgm_gemma": "gemma",
    "mgm_mixtral": "mixtral",
    "mini_gemini": "llama",
    "mini_gemini_gemma": "gemma",
    "mini_gemini_mixtral": "mixtral",
}


def test_six_model_types_registered_idempotently():
    register_configs()
    register_configs()  # second call must not raise
    assert set(CONFIG_CLASSES) == set(MODEL_TYPES)
    for model_type, family in MODEL_TYPES.items():
        cls = CONFIG_CLASSES[model_type]
        assert cls.model_type == model_type
        assert issubclass(cls, BASES[family])
        assert type(AutoConfig.for_model(model_type)) is cls


@pytest.mark.parametrize("model_type", sorted(MODEL_TYPES))
def test_official_config_json_loads(tmp_path, model_type):
    (tmp_path / "config.json").write_text(json.dumps({**OFFICIAL_7B, "model_type": model_type}))
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is CONFIG_CLASSES[model_type]
    assert backbone_family(config) == MODEL_TYPES[model_type]
    for key in ("mm_hidden_size", "mm_hidden_size_aux", "image_size_aux", "image_grid", "image_global",
                "image_aspect_ratio", "mm_vision_select_layer", "tokenizer_model_max_length", "mm_projector_type"):
        assert getattr(config, key) == OFFICIAL_7B[key], key
    # The tower paths are carried through untouched (and never used).
    assert config.mm_vision_tower == OFFICIAL_7B["mm_vision_tower"]
    # Keys we do not declare survive as plain attributes.
    assert config.tune_mm_mlp_adapter is False and config.mm_projector_lr is None
    geometry = validate_mm_config(config)
    assert geometry.tokens_per_image == 576


def test_defaults_are_clip_l336_and_convnext_l():
    config = MGMConfig()
    clip = config.clip_vision_config()
    assert (clip.hidden_size, clip.num_hidden_layers, clip.num_attention_heads, clip.intermediate_size) == (1024, 24, 16, 4096)
    assert (clip.patch_size, clip.image_size, clip.hidden_act, clip.layer_norm_eps) == (14, 336, "quick_gelu", 1e-5)
    spec = config.convnext_spec()
    assert spec.depths == (3, 3, 27, 3) and spec.dims == (192, 384, 768, 1536)
    assert (config.mm_hidden_size, config.mm_hidden_size_aux) == (1024, 2880)
    assert config.vision_config is None and config.vision_aux_config is None  # absent keys stay absent
    assert clip_layers_needed(config) == 23  # select_layer -2: the last layer is never run


def test_extension_keys_override_the_towers():
    config = MGMGemmaConfig(vision_config={"image_size": 56, "hidden_size": 64, "num_hidden_layers": 3},
                            vision_aux_config={"depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32]})
    clip = config.clip_vision_config()
    # Unspecified fields come from ViT-L/14-336, not from CLIPVisionConfig's ViT-B/32 defaults.
    assert (clip.image_size, clip.hidden_size, clip.patch_size, clip.intermediate_size) == (56, 64, 14, 4096)
    assert config.mm_hidden_size == 64 and config.mm_hidden_size_aux == 80


def test_save_load_round_trip(tmp_path):
    config = MGMMixtralConfig(image_size_aux=1536, image_grid=2, image_global=True, vision_aux_config={"depths": [1, 1, 1, 1], "dims": [4, 4, 4, 4]})
    config.save_pretrained(tmp_path)
    again = AutoConfig.from_pretrained(tmp_path)
    assert type(again) is MGMMixtralConfig
    assert (again.image_size_aux, again.image_grid, again.image_global) == (1536, 2, True)
    assert again.convnext_spec() == config.convnext_spec()


def test_architecture_names_and_family_routing(caplog):
    assert ARCHITECTURE_TO_FAMILY == {
        "MGMLlamaForCausalLM": "llama", "MGMGemmaForCausalLM": "gemma", "MGMMixtralForCausalLM": "mixtral",
        "MiniGeminiLlamaForCausalLM": "llama", "MiniGeminiGemmaForCausalLM": "gemma",
        "MiniGeminiMixtralForCausalLM": "mixtral",
    }
    assert FAMILY_TO_TEXT_ARCHITECTURE["gemma"] == "GemmaForCausalLM"
    # model_type decides, a contradicting architectures entry is only logged.
    config = MGMGemmaConfig(architectures=["MGMLlamaForCausalLM"])
    with caplog.at_level(logging.WARNING):
        assert backbone_family(config) == "gemma"
    assert "MGMLlamaForCausalLM" in caplog.text
    with pytest.raises(ValueError, match="not an MGM model type"):
        backbone_family(LlamaConfig())


def test_geometry_real_sizes():
    normal = validate_mm_config(MGMConfig())
    assert (normal.lr_size, normal.hr_size, normal.grid, normal.window) == (336, 768, 24, 8)
    assert (normal.tokens_per_view, normal.num_views, normal.tokens_per_image) == (576, 1, 576)
    assert (normal.lr_canvas_size, normal.hr_feature_size) == (336, 192)
    hd = validate_mm_config(MGMConfig(image_size_aux=1536, image_grid=2, image_global=True))
    assert (hd.grid, hd.window, hd.num_views, hd.tokens_per_image) == (24, 8, 5, 2880)
    assert (hd.lr_canvas_size, hd.hr_feature_size) == (672, 384)


def test_geometry_tiny_sizes():
    vc = {"image_size": 56, "patch_size": 14, "hidden_size": 64}
    g = VisionGeometry.from_config(MGMConfig(vision_config=vc, image_size_aux=128))
    assert (g.grid, g.window, g.tokens_per_image) == (4, 8, 16)
    g = VisionGeometry.from_config(MGMConfig(vision_config=vc, image_size_aux=256, image_grid=2, image_global=True))
    assert (g.grid, g.window, g.tokens_per_image, g.lr_canvas_size) == (4, 8, 80, 112)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"image_size_aux": 770}, "image_size_aux"),
        ({"image_size_aux": 672, "image_grid": 2}, "image_size_aux"),  # fine for grid 1, not for 4·2·24
        ({"vision_config": {"image_size": 330}}, "vision_config.image_size"),
        ({"image_grid": 0}, "image_grid"),
        ({"mm_hidden_size": 512}, "mm_hidden_size"),
        ({"mm_hidden_size_aux": 2048}, "mm_hidden_size_aux"),
        ({"mm_projector_type": "linear"}, "mm_projector_type"),
        ({"mm_vision_select_feature": "cls_patch"}, "mm_vision_select_feature"),
        ({"mm_vision_select_layer": -30}, "mm_vision_select_layer"),
        ({"mm_use_im_start_end": True}, "mm_use_im_start_end"),
        ({"vision_aux_config": {"depths": [3, 3], "dims": [1, 2, 3]}}, "vision_aux_config.depths"),
    ],
)
def test_validation_errors_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        validate_mm_config(MGMConfig(**kwargs))


def test_engine_package_import_is_light():
    code = "import sys, engine; bad = [m for m in ('vllm', 'torch', 'transformers') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"
