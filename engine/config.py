"""Transformers config classes for Mini-Gemini (MGM) checkpoints, and the vision geometry derived from them.

Released MGM checkpoints carry a *flat* LLaVA-style config: the LLM fields sit at the top level and the
multimodal fields are extra keys (docs/mgm.md §1.2).  Transformers only parses a ``config.json`` whose
``model_type`` it knows, so we register one class per model_type string that exists in the wild: the
checkpoints uploaded before the 2024-04-21 rename say ``mini_gemini*``, later ones ``mgm*`` (docs/mgm.md §1.1).

Two *optional* extension keys let small test checkpoints describe their own towers:

* ``vision_config``     – dict of ``transformers.CLIPVisionConfig`` fields, laid over CLIP ViT-L/14-336;
* ``vision_aux_config`` – ``{"depths": [...], "dims": [...]}`` of the ConvNeXt; absent → ConvNeXt-L.

The ``mm_vision_tower*`` paths of the official configs are kept (so configs round-trip) but never read:
all tower weights come from the checkpoint itself (docs/mgm.md §5.1).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from transformers import AutoConfig, CLIPVisionConfig, GemmaConfig, LlamaConfig, MixtralConfig

from engine.names import ARCHITECTURE_TO_FAMILY, MODEL_TYPE_TO_FAMILY, Family

logger = logging.getLogger(__name__)

#: The CLIP tower every released MGM uses (openai/clip-vit-large-patch14-336, docs/mgm.md §4).
CLIP_VIT_L_336: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_channels": 3,
    "image_size": 336,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
}

#: timm ``convnext_large`` as used by the LAION ``convnext_large_d_320`` tower (docs/mgm.md §3.1).
CONVNEXT_LARGE: dict[str, list[int]] = {"depths": [3, 3, 27, 3], "dims": [192, 384, 768, 1536]}

#: ConvNeXt stem: Conv2d(k=4, s=4), so the stage-0 map is the HR input divided by 4.
CONVNEXT_STEM_STRIDE = 4


@dataclass(frozen=True)
class ConvNeXtSpec:
    """Depth and width of each ConvNeXt stage."""

    depths: tuple[int, ...]
    dims: tuple[int, ...]

    @property
    def hidden_size(self) -> int:
        # The official tower concatenates all stage outputs, so the HR feature width is the sum (2880 for -L).
        return sum(self.dims)


@dataclass(kw_only=True, repr=False, eq=False)
class _MGMFields:
    """Official MGM keys (docs/mgm.md §1.2) shared by all backbones; defaults are the released values."""

    mm_vision_tower: str | None = None  # path of the CLIP dir in official configs; ignored
    mm_vision_tower_aux: str | None = None  # path of the open_clip ConvNeXt dir; ignored
    mm_hidden_size: int | None = None  # CLIP width; None → taken from the CLIP config
    mm_hidden_size_aux: int | None = None  # sum of ConvNeXt dims; None → taken from the ConvNeXt config
    mm_projector_type: str = "mlp2x_gelu"
    mm_vision_select_layer: int = -2
    mm_vision_select_feature: str = "patch"
    use_mm_proj: bool = True
    image_size_aux: int = 768
    image_grid: int = 1
    image_global: bool = False
    image_aspect_ratio: str = "pad"
    image_grid_pinpoints: Any = None  # unused by MGM
    optimize_vision_tower: bool = False
    optimize_vision_tower_aux: bool = False
    tokenizer_padding_side: str = "right"
    tokenizer_model_max_length: int | None = None
    mm_use_im_start_end: bool = False
    mm_use_im_patch_token: bool = False
    # Extension keys (not in official configs):
    vision_config: dict[str, Any] | None = None
    vision_aux_config: dict[str, Any] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        # Fill the two widths from the tower configs so code can always read them; an *inconsistent* explicit
        # value is reported by validate_mm_config (a config must load even when it is wrong, to say why).
        if self.mm_hidden_size is None:
            self.mm_hidden_size = int(self.clip_vision_config().hidden_size)
        if self.mm_hidden_size_aux is None:
            self.mm_hidden_size_aux = self.convnext_spec().hidden_size
        super().__post_init__(**kwargs)  # type: ignore[misc]

    def clip_vision_config(self) -> CLIPVisionConfig:
        """CLIP tower config: ``vision_config`` laid over ViT-L/14-336 (not over CLIP's ViT-B/32 defaults)."""
        overrides = self.vision_config or {}
        if not isinstance(overrides, dict):
            raise ValueError(f"vision_config must be a dict of CLIPVisionConfig fields, got {type(overrides).__name__}")
        return CLIPVisionConfig(**{**CLIP_VIT_L_336, **overrides})

    def convnext_spec(self) -> ConvNeXtSpec:
        raw = self.vision_aux_config or CONVNEXT_LARGE
        if not isinstance(raw, dict):
            raise ValueError(f"vision_aux_config must be a dict with 'depths' and 'dims', got {type(raw).__name__}")
        depths = tuple(raw.get("depths", CONVNEXT_LARGE["depths"]))
        dims = tuple(raw.get("dims", CONVNEXT_LARGE["dims"]))
        if len(depths) != len(dims) or not depths:
            raise ValueError(
                f"vision_aux_config.depths ({list(depths)}) and vision_aux_config.dims ({list(dims)}) "
                "must be non-empty and of equal length"
            )
        for key, values in (("depths", depths), ("dims", dims)):
            if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
                raise ValueError(f"vision_aux_config.{key} must be positive integers, got {list(values)}")
        return ConvNeXtSpec(depths=depths, dims=dims)


class MGMConfig(_MGMFields, LlamaConfig):
    model_type = "mgm"


class MGMGemmaConfig(_MGMFields, GemmaConfig):
    model_type = "mgm_gemma"


class MGMMixtralConfig(_MGMFields, MixtralConfig):
    model_type = "mgm_mixtral"


# Pre-rename names (checkpoints uploaded before 2024-04-21); identical fields.
class MiniGeminiConfig(MGMConfig):
    model_type = "mini_gemini"


class MiniGeminiGemmaConfig(MGMGemmaConfig):
    model_type = "mini_gemini_gemma"


class MiniGeminiMixtralConfig(MGMMixtralConfig):
    model_type = "mini_gemini_mixtral"


MGMAnyConfig = MGMConfig | MGMGemmaConfig | MGMMixtralConfig

CONFIG_CLASSES: dict[str, type[_MGMFields]] = {
    cls.model_type: cls
    for cls in (
        MGMConfig,
        MGMGemmaConfig,
        MGMMixtralConfig,
        MiniGeminiConfig,
        MiniGeminiGemmaConfig,
        MiniGeminiMixtralConfig,
    )
}


def register_configs() -> None:
    """Make ``AutoConfig`` parse all six model types. Idempotent (``exist_ok=True``), so every process may call it."""
    for model_type, cls in CONFIG_CLASSES.items():
        AutoConfig.register(model_type, cls, exist_ok=True)


def backbone_family(config: Any) -> Family:
    """LLM family of a checkpoint, decided by ``model_type``.

    The official loader chose the class from the *directory name* (docs/mgm.md §1.1), which is fragile; the
    model_type is authoritative here. A disagreeing ``architectures`` entry is logged, not trusted.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_FAMILY:
        raise ValueError(f"model_type {model_type!r} is not an MGM model type; expected one of {sorted(MODEL_TYPE_TO_FAMILY)}")
    family = MODEL_TYPE_TO_FAMILY[model_type]
    for arch in getattr(config, "architectures", None) or []:
        if arch in ARCHITECTURE_TO_FAMILY and ARCHITECTURE_TO_FAMILY[arch] != family:
            logger.warning("architectures lists %s but model_type %r says %s; using %s", arch, model_type, family, family)
    return family


@dataclass(frozen=True)
class VisionGeometry:
    """Sizes that fix the visual token count (docs/mgm.md §2.2/2.3).

    A view is one CLIP pass at ``lr_size``; an image has ``image_grid²`` crop views plus an optional global view.
    Each view yields ``grid²`` tokens, and each token mines its own ``window × window`` cell of the HR stage-0 map.
    """

    lr_size: int  # CLIP input side (336 real)
    patch_size: int  # CLIP patch (14)
    hr_size: int  # ConvNeXt input side = image_size_aux (768 / 1536)
    image_grid: int  # crops per side (1 / 2)
    image_global: bool  # extra global view (False / True)

    @property
    def grid(self) -> int:
        """G: CLIP tokens per side of one view (24)."""
        return self.lr_size // self.patch_size

    @property
    def tokens_per_view(self) -> int:
        """N = G² (576)."""
        return self.grid**2

    @property
    def num_views(self) -> int:
        return self.image_grid**2 + int(self.image_global)

    @property
    def tokens_per_image(self) -> int:
        """N·(g² + global): 576 normal, 2880 HD."""
        return self.tokens_per_view * self.num_views

    @property
    def lr_canvas_size(self) -> int:
        """Side of the LR tensor before it is cut into crops (336 / 672)."""
        return self.lr_size * self.image_grid

    @property
    def hr_feature_size(self) -> int:
        """Side of the ConvNeXt stage-0 map for the whole image (192 / 384)."""
        return self.hr_size // CONVNEXT_STEM_STRIDE

    @property
    def window(self) -> int:
        """M: HR stage-0 pixels per LR token and side (8)."""
        return self.hr_feature_size // (self.image_grid * self.grid)

    @classmethod
    def from_config(cls, config: Any) -> VisionGeometry:
        clip = config.clip_vision_config()
        lr, patch = clip.image_size, clip.patch_size
        hr, g = config.image_size_aux, config.image_grid
        if not isinstance(lr, int) or not isinstance(patch, int):
            raise ValueError("vision_config.image_size and vision_config.patch_size must be single integers (square)")
        if patch <= 0 or lr <= 0 or lr % patch:
            raise ValueError(f"vision_config.image_size ({lr}) must be a positive multiple of vision_config.patch_size ({patch})")
        if not isinstance(g, int) or isinstance(g, bool) or g < 1:
            raise ValueError(f"image_grid must be a positive integer, got {g!r}")
        if not isinstance(hr, int) or isinstance(hr, bool) or hr <= 0:
            raise ValueError(f"image_size_aux must be a positive integer, got {hr!r}")
        grid = lr // patch
        # Each of the g·G LR tokens per side owns an M×M window of the stage-0 map (side hr/4): hr = 4·g·G·M.
        unit = CONVNEXT_STEM_STRIDE * g * grid
        if hr % unit:
            raise ValueError(
                f"image_size_aux ({hr}) must be a multiple of {CONVNEXT_STEM_STRIDE}·image_grid·G = "
                f"{CONVNEXT_STEM_STRIDE}·{g}·{grid} = {unit} (G = vision_config.image_size / patch_size = {lr}/{patch}), "
                "so that every LR token gets a whole window of the HR feature map"
            )
        return cls(lr_size=lr, patch_size=patch, hr_size=hr, image_grid=g, image_global=bool(config.image_global))


_MLP_GELU = "mlp2x_gelu"


def validate_mm_config(config: Any) -> VisionGeometry:
    """Check the multimodal keys this server implements; return the geometry. Errors name the offending key."""
    geometry = VisionGeometry.from_config(config)
    clip = config.clip_vision_config()
    spec = config.convnext_spec()
    if config.mm_hidden_size != clip.hidden_size:
        raise ValueError(f"mm_hidden_size ({config.mm_hidden_size}) != CLIP hidden_size ({clip.hidden_size}) of vision_config")
    if config.mm_hidden_size_aux != spec.hidden_size:
        raise ValueError(
            f"mm_hidden_size_aux ({config.mm_hidden_size_aux}) != sum(vision_aux_config.dims) ({spec.hidden_size})"
        )
    if config.mm_projector_type != _MLP_GELU:
        raise ValueError(f"mm_projector_type {config.mm_projector_type!r} is not supported (only {_MLP_GELU!r}, as released)")
    if config.mm_vision_select_feature != "patch":
        raise ValueError(f"mm_vision_select_feature {config.mm_vision_select_feature!r} is not supported (only 'patch')")
    layers = clip.num_hidden_layers
    # hidden_states has layers+1 entries (embeddings first), so valid indices are -(layers+1) .. layers.
    if not -(layers + 1) <= config.mm_vision_select_layer <= layers:
        raise ValueError(f"mm_vision_select_layer ({config.mm_vision_select_layer}) is out of range for {layers} CLIP layers")
    for key in ("mm_use_im_start_end", "mm_use_im_patch_token"):
        if getattr(config, key, False):
            raise ValueError(f"{key}=true is not supported (no released checkpoint uses it)")
    return geometry


def clip_layers_needed(config: Any) -> int:
    """CLIP encoder layers that must run: hidden_states[k] is the output of layer k-1 (index 0 = embeddings).

    With select_layer -2 of 24 layers this is 23: the last layer and post_layernorm are never used (docs/mgm.md §4).
    """
    layers = config.clip_vision_config().num_hidden_layers
    index = config.mm_vision_select_layer % (layers + 1)
    return index
