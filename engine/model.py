"""Mini-Gemini (MGM) for vLLM: processor, model and weight loading, in the style of vLLM's in-tree ``llava.py``.

One class serves all six released architecture names (``MGM*``/``MiniGemini*`` × Llama/Gemma/Mixtral); the LLM
backbone is vLLM's own, chosen by ``model_type`` (docs/mgm.md §1.1). Per image (docs/mgm.md §2):

    views  (V, 3, lr, lr) ──CLIP (truncated to mm_vision_select_layer, no post-norm, CLS dropped)──► (V, N, C)
    hr     (3, S, S)      ──ConvNeXt stem+stages (eval)──► 4 stage maps
    kernels.mine_patches(views, stages) = x + mined, order [global, crops…]  (V·N, C)
    mm_projector (Linear → GELU → Linear)                                        (V·N, H)   [Gemma: · √H]

Prompt side: MGM tokenizers have no ``<image>`` token and the official code tokenises the text between images
separately. vLLM hands the processor a one-pass tokenisation, so ``_postprocess_prompt`` rebuilds the official
chunk-wise ids with one :data:`IMAGE_TOKEN_INDEX` marker per image, which the prompt update then expands to
N in-vocabulary placeholder ids (the embeddings are merged by position, so their value does not matter).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property

import torch
from PIL import Image
from torch import nn
from transformers import BatchFeature

from vllm.config import VllmConfig
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.inputs import MultiModalDataDict
from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
from vllm.model_executor.models.clip import CLIPVisionModel
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal, SupportsPP
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    WeightsMapper,
    init_vllm_registered_model,
    maybe_prefix,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.media import MediaWithBytes
from vllm.multimodal.parse import ImageProcessorItems, ImageSize, MultiModalDataItems, MultiModalDataParser
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
)
from vllm.sequence import IntermediateTensors

import kernels
from engine.config import (
    MGMAnyConfig,
    VisionGeometry,
    backbone_family,
    clip_layers_needed,
    validate_mm_config,
)
from engine.convnext import ConvNeXtTower
from engine.media import exif_rotation_enabled, official_image
from engine.names import FAMILY_TO_TEXT_ARCHITECTURE, IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX
from engine.processor import MGMImageProcessor
from engine.retokenize import retokenize_official
from engine.weights import StrictWeights

#: Images per ConvNeXt + mining pass, to bound encoder memory: ConvNeXt-L's stage-0 MLP alone holds 768×384²
#: activations (0.23 GB in fp16) per HD image.
HR_CHUNK = 4


def placeholder_token_id(tokenizer) -> int:  # type: ignore[no-untyped-def]
    """In-vocabulary id that fills the image slots of the expanded prompt (vLLM rejects out-of-vocab ids)."""
    for name in ("unk_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int) and value >= 0:
            return value
    return 0


# --- processing ----------------------------------------------------------------------------------------------------


#: Diagnostics: a file to which every run of the vision front end appends its image count, one line per run (to see
#: that a repeated image is served from vLLM's caches instead of the towers). Unset: nothing is written.
ENCODER_TRACE_ENV = "MGM_ENCODER_TRACE"


def _trace_encoder(images: int) -> None:
    if path := os.environ.get(ENCODER_TRACE_ENV):
        with open(path, "a", encoding="ascii") as trace:  # one short append per call: lines never interleave
            trace.write(f"{images}\n")


class MGMDataParser(MultiModalDataParser):
    """vLLM's parser, except that images are taken as the official loader sees them (engine.media)."""

    def _parse_image_data(self, data):  # type: ignore[no-untyped-def]
        if data is None or self.is_embeddings(data):
            return super()._parse_image_data(data)
        items = [data] if isinstance(data, (Image.Image, MediaWithBytes)) else data
        if not isinstance(items, (list, tuple)) or not all(
                item is None or isinstance(item, (Image.Image, MediaWithBytes)) for item in items):
            return super()._parse_image_data(data)  # arrays and tensors: vLLM's own handling
        rotate = exif_rotation_enabled()
        return ImageProcessorItems([official_image(item, rotate) for item in items])


class MGMProcessingInfo(BaseProcessingInfo):
    def get_hf_config(self) -> MGMAnyConfig:
        config = self.ctx.get_hf_config()
        if not isinstance(config, MGMAnyConfig):
            raise TypeError(f"expected an MGM config (engine.config), got {type(config).__name__}")
        return config

    @cached_property
    def geometry(self) -> VisionGeometry:
        return validate_mm_config(self.get_hf_config())

    @cached_property
    def image_processor(self) -> MGMImageProcessor:
        return MGMImageProcessor.from_config(self.get_hf_config())

    def get_hf_processor(self, **kwargs: object) -> MGMImageProcessor:
        # There is no HF ProcessorMixin for MGM; the official preprocessing lives in engine.processor.
        return self.image_processor

    def get_supported_mm_processor_kwargs(self) -> dict[str, set[str]]:
        return {}

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}  # any number, bounded by --limit-mm-per-prompt

    def get_num_image_tokens(self) -> int:
        return self.geometry.tokens_per_image  # fixed: every image is padded and resized to one size

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": self.get_num_image_tokens()}

    def get_image_size_with_most_features(self) -> ImageSize:
        side = self.geometry.hr_size
        return ImageSize(width=side, height=side)

    @cached_property
    def placeholder_token_id(self) -> int:
        return placeholder_token_id(self.get_tokenizer())

    def get_data_parser(self) -> MultiModalDataParser:
        # images as the official loader sees them: no EXIF rotation, no compositing on white (engine.media)
        return MGMDataParser(expected_hidden_size=self._get_expected_hidden_size(),
                             allow_missing_mm_embeddings=self.allow_missing_mm_embeddings)


class MGMDummyInputsBuilder(BaseDummyInputsBuilder[MGMProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return IMAGE_PLACEHOLDER * mm_counts.get("image", 0)

    def get_dummy_mm_data(
        self, seq_len: int, mm_counts: Mapping[str, int], mm_options: MultiModalDummyOptions
    ) -> MultiModalDataDict:
        size = self.info.get_image_size_with_most_features()
        return {
            "image": self._get_dummy_images(
                width=size.width, height=size.height, num_images=mm_counts.get("image", 0),
                overrides=mm_options.get("image"),
            )
        }


class MGMMultiModalProcessor(BaseMultiModalProcessor[MGMProcessingInfo]):
    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        if hf_kwargs:
            raise ValueError(f"MGM takes no mm_processor_kwargs, got {sorted(hf_kwargs)}")
        unknown = set(hf_data) - {"images"}
        if unknown:
            raise ValueError(f"MGM accepts only images, got {sorted(unknown)}")
        # float32 here; the model casts to its dtype, as the official code casts the processed tensors.
        return BatchFeature(self.info.image_processor(hf_data["images"]))  # type: ignore[arg-type]

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {
            "pixel_values": MultiModalFieldConfig.batched("image"),  # (V, 3, lr, lr) per image
            "pixel_values_aux": MultiModalFieldConfig.batched("image"),  # (3, S, S) per image
        }

    def _postprocess_prompt(self, prompt: list[int]) -> list[int]:
        # The official chunk-wise ids, with one IMAGE_TOKEN_INDEX marker per "<image>" (see module docstring).
        return retokenize_official(self.info.get_tokenizer(), prompt, IMAGE_TOKEN_INDEX)

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        slots = [self.info.placeholder_token_id] * self.info.get_num_image_tokens()
        return [PromptReplacement(modality="image", target=[IMAGE_TOKEN_INDEX], replacement=slots)]

    def _apply_prompt_updates(self, token_ids, mm_prompt_updates):  # type: ignore[no-untyped-def]
        # The markers come from "<image>" in the text; a count mismatch would otherwise surface as vLLM's
        # generic "Failed to apply prompt replacement" (or leave a negative id behind).
        images = len(mm_prompt_updates.get("image", []))
        markers = sum(1 for t in token_ids if t == IMAGE_TOKEN_INDEX)
        if markers != images:
            raise ValueError(
                f"the prompt has {markers} {IMAGE_PLACEHOLDER!r} placeholder(s) but {images} image(s) were given; "
                f"put exactly one {IMAGE_PLACEHOLDER!r} in the prompt text per image"
            )
        return super()._apply_prompt_updates(token_ids, mm_prompt_updates)


# --- model ---------------------------------------------------------------------------------------------------------


class MGMProjector(nn.Module):
    """``mlp2x_gelu``: Linear(C→H) → exact GELU → Linear(H→H); checkpoint indices 0 and 2 (1 is the GELU)."""

    def __init__(self, vision_hidden: int, text_hidden: int, quant_config=None, prefix: str = "") -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.linear_1 = ColumnParallelLinear(vision_hidden, text_hidden, bias=True, quant_config=quant_config,
                                             prefix=f"{prefix}.linear_1")
        self.act = nn.GELU()
        self.linear_2 = RowParallelLinear(text_hidden, text_hidden, bias=True, quant_config=quant_config,
                                          prefix=f"{prefix}.linear_2")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.linear_1(x)
        x, _ = self.linear_2(self.act(x))
        return x


def _ln_linear(width: int, out: int) -> nn.Sequential:
    # vlm_uni_*_projector: Sequential(LayerNorm(width), Linear(width, out)); names .0/.1 as in the checkpoint.
    return nn.Sequential(nn.LayerNorm(width), nn.Linear(width, out))


_MINING_PROJECTORS = ("query", "aux", "val")


@MULTIMODAL_REGISTRY.register_processor(
    MGMMultiModalProcessor, info=MGMProcessingInfo, dummy_inputs=MGMDummyInputsBuilder
)
class MGMForCausalLM(nn.Module, SupportsMultiModal, SupportsPP):
    """Registered under all six MGM architecture names; the backbone comes from ``model_type``."""

    # Official layout (docs/mgm.md §5.2) → module names. Rules apply in order to the rewritten name, so the specific
    # "model.<tower>." prefixes come before the catch-all "model." of the LLM.
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_prefix={
            "model.vision_tower.vision_tower.": "vision_tower.",
            "model.vision_tower_aux.": "vision_tower_aux.",
            "model.mm_projector.0.": "mm_projector.linear_1.",
            "model.mm_projector.2.": "mm_projector.linear_2.",
            "model.vlm_uni_": "vlm_uni_",
            "model.": "language_model.model.",
            "lm_head.": "language_model.lm_head.",
        }
    )

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return IMAGE_PLACEHOLDER
        raise ValueError("MGM supports only the image modality")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        quant_config = vllm_config.quant_config
        self.config = config
        self.geometry = validate_mm_config(config)
        self.family = backbone_family(config)
        clip_config = config.clip_vision_config()
        width, width_aux = config.mm_hidden_size, config.mm_hidden_size_aux

        with self._mark_tower_model(vllm_config, "image"):
            # Only the layers up to mm_vision_select_layer are built; the rest (and post_layernorm) never run.
            self.vision_tower = CLIPVisionModel(
                clip_config, quant_config=quant_config, num_hidden_layers_override=clip_layers_needed(config),
                require_post_norm=False, prefix=maybe_prefix(prefix, "vision_tower"),
            )
            self.vision_tower_aux = ConvNeXtTower.from_config(config)  # eval-mode, no drop path (docs/mgm.md §3.4)
            self.vlm_uni_query_projector = _ln_linear(width, width)
            self.vlm_uni_aux_projector = _ln_linear(width_aux, width)
            self.vlm_uni_val_projector = _ln_linear(width_aux, width)
            self.mm_projector = MGMProjector(width, config.hidden_size, quant_config,
                                             prefix=maybe_prefix(prefix, "mm_projector"))

        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config, hf_config=config, prefix=maybe_prefix(prefix, "language_model"),
                architectures=[FAMILY_TO_TEXT_ARCHITECTURE[self.family]],
            )
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    # -- vision -------------------------------------------------------------------------------------------------

    def _mining_weights(self) -> dict[str, torch.Tensor]:
        return {
            f"vlm_uni_{name}_projector.{key}": tensor
            for name in _MINING_PROJECTORS
            for key, tensor in getattr(self, f"vlm_uni_{name}_projector").state_dict().items()
        }

    def _check_pixels(self, name: str, value: object, shape: tuple[int, ...]) -> torch.Tensor:
        if isinstance(value, (list, tuple)):
            value = torch.stack(list(value))
        if not isinstance(value, torch.Tensor) or tuple(value.shape[1:]) != shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{name}: expected (num_images, {', '.join(map(str, shape))}), got {got}")
        return value

    def _encode_images(self, pixel_values: torch.Tensor, pixel_values_aux: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        dtype = self.vision_tower.dtype
        batch, views = pixel_values.shape[:2]
        lr = self.vision_tower(pixel_values.flatten(0, 1).to(dtype), feature_select_strategy="default")
        lr = lr.reshape(batch, views, g.tokens_per_view, -1)
        weights = self._mining_weights()
        mined = []
        for start in range(0, batch, HR_CHUNK):
            stages = self.vision_tower_aux(pixel_values_aux[start:start + HR_CHUNK].to(dtype))
            mined.append(kernels.mine_patches(lr[start:start + HR_CHUNK], stages, weights, image_grid=g.image_grid,
                                              image_global=g.image_global, impl="auto"))
        features = self.mm_projector(torch.cat(mined))
        if self.family == "gemma":
            # MGM-2B was trained with HF's GemmaModel scaling *all* inputs_embeds by √H; vLLM's Gemma scales only
            # the text rows it embeds itself (docs/mgm.md §11.6), so the image rows are scaled here, in the same dtype.
            features = features * self.language_model.model.normalizer.to(features.dtype)
        return features

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        pixel_values = kwargs.pop("pixel_values", None)
        pixel_values_aux = kwargs.pop("pixel_values_aux", None)
        if pixel_values is None and pixel_values_aux is None:
            return []
        g = self.geometry
        pixel_values = self._check_pixels("pixel_values", pixel_values, (g.num_views, 3, g.lr_size, g.lr_size))
        pixel_values_aux = self._check_pixels("pixel_values_aux", pixel_values_aux, (3, g.hr_size, g.hr_size))
        if pixel_values.shape[0] != pixel_values_aux.shape[0]:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} images, pixel_values_aux {pixel_values_aux.shape[0]}")
        _trace_encoder(pixel_values.shape[0])
        return self._encode_images(pixel_values, pixel_values_aux)  # (num_images, tokens_per_image, H)

    # -- language model -----------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    # -- weights ------------------------------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load an official checkpoint strictly: every tensor is loaded or deliberately skipped; an unknown,
        duplicate or mis-shaped key, or a missing one, raises ``ValueError`` naming it.

        ``lm_head`` (docs/mgm.md §5.2; MGM-2B stores one although Gemma ties it): when the checkpoint has the tensor,
        vLLM itself builds the head untied before this runs (``ModelConfig.maybe_untie_word_embeddings``), so it
        is loaded here, and re-tied after loading if it equals ``embed_tokens``; a *different* stored head is
        used, with vLLM's warning — the rule of transformers 5 as well. Only a tied config may omit it.
        """
        strict = StrictWeights(self.config)
        loaded = AutoWeightsLoader(self).load_weights(strict.filter(weights), mapper=self.hf_to_vllm_mapper)
        strict.check_complete()
        return loaded
