"""Seeded random MGM checkpoints in the official layout, small enough for CPU tests.

The output directory looks like a released checkpoint (docs/mgm.md §1.2, §5.2): ``config.json`` with the official
keys (plus ``vision_config``/``vision_aux_config`` describing the small towers), one ``model.safetensors``
holding *every* key of the official layout (:func:`engine.weights.official_weight_layout`), a tokenizer without an
``<image>`` token, a chat template and a generation config.

Geometry (defaults): CLIP 56 px / patch 14 → G = 4, 16 tokens per view; windows M = 8 → HR 128 px
(HD: 2×2 crops + global, HR 256 px, 80 tokens per image). LLM head_dim 64 (vLLM's CPU attention supports
32/64/128).

Initialisation — chosen so that the image visibly moves the logits (tests/engine/test_engine_tiny.py measures it):

* every matrix/conv ~ N(0, 1/fan_in), so activations keep unit scale through every layer (HF's 0.02 init
  would shrink the vision path to noise);
* text embeddings ~ N(0, 1), so projected image rows and text rows have comparable size (Gemma: N(0, 1/H),
  because Gemma multiplies embeddings by √H and ties lm_head to them);
* norm weights 1 + 0.1·N(0, 1) (Gemma's RMSNorm stores w of (1 + w): 0.1·N(0, 1)), biases 0.1·N(0, 1):
  non-trivial so that a mis-mapped norm or bias shows up in parity tests;
* ConvNeXt layer scale (gamma) 0.5 + 0.05·N(0, 1) instead of timm's 1e-6, otherwise its blocks would be no-ops.

All tensors are drawn from one ``torch.Generator`` seeded with ``seed`` in a fixed key order, so a build is
byte-for-byte reproducible.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from engine.config import (
    MGMConfig,
    MGMGemmaConfig,
    MGMMixtralConfig,
    MiniGeminiConfig,
    MiniGeminiGemmaConfig,
    MiniGeminiMixtralConfig,
    backbone_family,
    validate_mm_config,
)
from engine.names import BACKBONES, IMAGE_PLACEHOLDER, VISION_SIZES, Family
from engine.prompt import TEMPLATES, chat_template, render_prompt
from engine.weights import Kind, official_weight_layout

logger = logging.getLogger(__name__)


# Official strings from the released configs; present only to prove they are never opened.
_OFFICIAL_CLIP_PATH = "model_zoo/OpenAI/clip-vit-large-patch14-336"
_OFFICIAL_CONVNEXT_PATH = "model_zoo/OpenAI/openclip-convnext-large-d-320-laion2B-s29B-b131K-ft-soup"

_ARCH = {
    ("llama", False): ("MGMLlamaForCausalLM", MGMConfig),
    ("gemma", False): ("MGMGemmaForCausalLM", MGMGemmaConfig),
    ("mixtral", False): ("MGMMixtralForCausalLM", MGMMixtralConfig),
    ("llama", True): ("MiniGeminiLlamaForCausalLM", MiniGeminiConfig),
    ("gemma", True): ("MiniGeminiGemmaForCausalLM", MiniGeminiGemmaConfig),
    ("mixtral", True): ("MiniGeminiMixtralForCausalLM", MiniGeminiMixtralConfig),
}

_TEMPLATE = {"llama": "vicuna_v1", "gemma": "gemma", "mixtral": "mistral_instruct"}

#: Side file recording how a tiny checkpoint was built (seed, sizes); not part of the official layout.
BUILD_INFO = "tiny_build.json"


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a tiny checkpoint. Defaults keep the real structure (GQA, 2-layer LLM, 3-layer CLIP, 4 stages)."""

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 256
    num_experts: int = 4
    experts_per_token: int = 2
    expert_intermediate_size: int = 128
    clip_hidden: int = 64
    clip_layers: int = 3
    clip_heads: int = 2
    clip_mlp: int = 128
    clip_image: int = 56  # G = 56 / 14 = 4
    clip_patch: int = 14
    window: int = 8  # M
    convnext_depths: tuple[int, ...] = (2, 2, 3, 2)
    convnext_dims: tuple[int, ...] = (16, 32, 48, 64)
    tokenizer_vocab: int = 800  # BPE merges target; the final vocab adds specials and 256 byte tokens


#: The released checkpoints' vision towers (CLIP ViT-L/14-336, ConvNeXt-L, 8x8 mining windows: 576 tokens per
#: image, HR side 768, HD 1536) with random weights: ``mgm build-tiny --vision real`` pairs them with the tiny LLM so
#: that benchmarks pay the encoder cost real checkpoints pay (~2 GB of float32 weights).
REAL_VISION = {"clip_hidden": 1024, "clip_layers": 24, "clip_heads": 16, "clip_mlp": 4096, "clip_image": 336,
               "clip_patch": 14, "window": 8, "convnext_depths": (3, 3, 27, 3), "convnext_dims": (192, 384, 768, 1536)}


def tiny_spec(vision: str = "tiny") -> TinySpec:
    """The tiny checkpoint's sizes, with the real vision towers for ``vision="real"``."""
    if vision not in VISION_SIZES:
        raise ValueError(f"vision must be one of {VISION_SIZES}, got {vision!r}")
    return TinySpec(**REAL_VISION) if vision == "real" else TinySpec()


# --- tokenizer ------------------------------------------------------------------------------------------------------

_CORPUS = """
A chat between a curious user and an artificial intelligence assistant.
The assistant gives helpful, detailed, and polite answers to the user's questions.
USER: What is this? ASSISTANT: A cat sitting on a red sofa.
USER: Color? ASSISTANT: The cat is black and white.
Describe the image in detail. The picture shows a street with cars, trees and people walking.
What is written on the sign? The sign says STOP in large white letters.
How many apples are on the table? There are three green apples and two red apples.
Answer the questions. Please generate an image of a dog running on the beach at sunset.
The quick brown fox jumps over the lazy dog. A small boat floats on a calm blue lake.
Mountains covered with snow rise behind a wooden house, and the sky is clear.
She reads a book in the library while it rains outside the window.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 24 42 100 336 768 1536 2024.
Punctuation: , . ; : ! ? ' " ( ) [ ] { } < > / \\ - _ + = * & % $ # @ ~ `
You are a helpful language and vision assistant. You are able to understand the visual content.
system user assistant model image photo picture chart table text document person animal food.
left right top bottom center middle front back inside outside above below near far.
""".strip().splitlines()


def tokenizer_corpus() -> list[str]:
    # Sentences plus each official template rendered once, so template words ("USER", "[INST]", "model") get pieces.
    sample = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "Color?"},
    ]
    # llama3_bos fixed: the corpus (so every tiny tokenizer's merges) must not move with a serving default
    return _CORPUS * 4 + [render_prompt(sample, name, llama3_bos="single") for name in TEMPLATES] * 2


_LLAMA_SPECIALS = ["<unk>", "<s>", "</s>"]
# Real Gemma ids: <pad> 0, <eos> 1, <bos> 2, <unk> 3; its turn markers sit at 106/107, here they follow directly.
_GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]


def build_tokenizer(backbone: Family, merges_target: int = 800):  # type: ignore[no-untyped-def]
    """A SentencePiece-like byte-fallback BPE trained on a built-in corpus (deterministic, no downloads).

    Llama/Mixtral: ``<unk>``=0, ``<s>``=1, ``</s>``=2, "▁" dummy prefix at the start of each encoded text (so the
    chunk after an image starts with "▁", as with the real slow tokenizer). Gemma: ``<pad> <eos> <bos> <unk>`` +
    turn markers, no dummy prefix. Never an ``<image>`` token: MGM tokenizers have none.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    gemma = backbone == "gemma"
    specials = _GEMMA_SPECIALS if gemma else _LLAMA_SPECIALS
    bos, eos, unk = ("<bos>", "<eos>", "<unk>") if gemma else ("<s>", "</s>", "<unk>")

    def shell(model: Any) -> Tokenizer:
        tok = Tokenizer(model)
        if gemma:
            tok.normalizer = normalizers.Replace(" ", "▁")
            tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
        else:
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
        return tok

    # 1) learn merges on the corpus; 2) rebuild the vocab as [specials, <0x00>..<0xFF>, learned pieces] so ids are
    # stable and byte fallback (any UTF-8 text encodes) works like Llama's SentencePiece model.
    trainer = trainers.BpeTrainer(vocab_size=merges_target, show_progress=False, special_tokens=specials)
    learner = shell(models.BPE(unk_token=unk))
    learner.train_from_iterator(tokenizer_corpus(), trainer)
    learned = json.loads(learner.to_str())["model"]
    vocab: dict[str, int] = {s: i for i, s in enumerate(specials)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    if not gemma:
        # Llama's SentencePiece has no "\n" piece; newlines go through byte fallback (<0x0A>), as here.
        merges = [m for m in merges if "\n" not in m[0] + m[1]]
    for piece, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        if gemma or "\n" not in piece:
            vocab.setdefault(piece, len(vocab))

    tok = shell(models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True, fuse_unk=True))
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps if gemma else [*steps, decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
    )
    extra = {"pad_token": "<pad>"} if gemma else {}
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk, model_max_length=4096, **extra
    )
    hf.chat_template = chat_template(_TEMPLATE[backbone])
    return hf


# --- config ---------------------------------------------------------------------------------------------------------


def build_config(
    backbone: Family,
    *,
    vocab_size: int,
    hd: bool = False,
    spec: TinySpec = TinySpec(),
    legacy_names: bool = False,
    dtype: str = "float32",
):  # type: ignore[no-untyped-def]
    """The config of a tiny checkpoint: official keys with released values, small sizes, towers described by the
    ``vision_config`` / ``vision_aux_config`` extension keys."""
    arch, cls = _ARCH[(backbone, legacy_names)]
    grid = spec.clip_image // spec.clip_patch
    image_grid = 2 if hd else 1
    common: dict[str, Any] = dict(
        architectures=[arch],
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=4096,
        dtype=dtype,
        # official multimodal keys (docs/mgm.md §1.2), released values except for the sizes
        mm_vision_tower=_OFFICIAL_CLIP_PATH,
        mm_vision_tower_aux=_OFFICIAL_CONVNEXT_PATH,
        mm_hidden_size=spec.clip_hidden,
        mm_hidden_size_aux=sum(spec.convnext_dims),
        mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        use_mm_proj=True,
        image_size_aux=4 * image_grid * grid * spec.window,
        optimize_vision_tower=False,
        optimize_vision_tower_aux=False,
        image_grid=image_grid,
        image_global=hd,
        image_aspect_ratio="pad",
        image_grid_pinpoints=None,
        tokenizer_padding_side="right",
        tokenizer_model_max_length=4096 if hd else 2048,
        tune_mm_mlp_adapter=False,
        freeze_mm_mlp_adapter=False,
        mm_projector_lr=None,
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        # extension keys describing the small towers
        vision_config=dict(
            hidden_size=spec.clip_hidden,
            intermediate_size=spec.clip_mlp,
            num_hidden_layers=spec.clip_layers,
            num_attention_heads=spec.clip_heads,
            num_channels=3,
            image_size=spec.clip_image,
            patch_size=spec.clip_patch,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
            projection_dim=spec.clip_hidden,
        ),
        vision_aux_config=dict(depths=list(spec.convnext_depths), dims=list(spec.convnext_dims)),
    )
    if backbone == "llama":
        extra: dict[str, Any] = dict(
            intermediate_size=spec.intermediate_size,
            num_key_value_heads=spec.num_heads,  # Vicuna: plain multi-head attention
            rms_norm_eps=1e-5,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=None,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
    elif backbone == "gemma":
        extra = dict(
            intermediate_size=spec.intermediate_size,
            num_key_value_heads=1,  # Gemma-2B: multi-query attention
            rms_norm_eps=1e-6,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
            # MGM-2B stores a separate lm_head; we store a copy of embed_tokens and keep Gemma's tying (docs/mgm.md §5.2),
            # which is what both HF and vLLM's Gemma compute.
            tie_word_embeddings=True,
            hidden_act="gelu_pytorch_tanh",
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
    else:
        extra = dict(
            intermediate_size=spec.expert_intermediate_size,
            num_key_value_heads=1,  # grouped-query attention, as Mixtral
            num_local_experts=spec.num_experts,
            num_experts_per_tok=spec.experts_per_token,
            rms_norm_eps=1e-5,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=None,
            tie_word_embeddings=False,
            sliding_window=None,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        )
    config = cls(**common, **extra)
    validate_mm_config(config)
    return config


# --- weights --------------------------------------------------------------------------------------------------------


def _init(shape: tuple[int, ...], kind: Kind, gen: torch.Generator, embed_std: float) -> torch.Tensor:
    x = torch.randn(shape, generator=gen, dtype=torch.float32)
    if kind == "matrix":
        return x / math.sqrt(math.prod(shape[1:]))
    if kind == "embedding":
        return x * embed_std
    if kind == "norm":
        return 1.0 + 0.1 * x
    if kind == "rmsnorm":  # Gemma computes x · (1 + w)
        return 0.1 * x
    if kind == "layer_scale":
        return 0.5 + 0.05 * x
    return 0.1 * x  # bias


def build_weights(config: Any, seed: int, *, progress: bool = False) -> dict[str, torch.Tensor]:
    family = backbone_family(config)
    gen = torch.Generator().manual_seed(seed)
    embed_std = 1.0 / math.sqrt(config.hidden_size) if family == "gemma" else 1.0
    dtype = config.dtype if isinstance(config.dtype, torch.dtype) else torch.float32
    layout = official_weight_layout(config)
    weights: dict[str, torch.Tensor] = {}
    for name, (shape, kind) in tqdm(layout.items(), desc="tensors", disable=not progress, leave=False):
        weights[name] = _init(shape, kind, gen, embed_std).to(dtype)
    if family == "gemma" and config.tie_word_embeddings:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    return weights


#: Keys the official training script writes (docs/mgm.md §1.2) plus our two extension keys.
OFFICIAL_MM_KEYS = (
    "mm_vision_tower", "mm_vision_tower_aux", "mm_hidden_size", "mm_hidden_size_aux", "mm_projector_type",
    "mm_vision_select_layer", "mm_vision_select_feature", "use_mm_proj", "image_size_aux", "optimize_vision_tower",
    "optimize_vision_tower_aux", "image_grid", "image_global", "image_aspect_ratio", "image_grid_pinpoints",
    "tokenizer_padding_side", "tokenizer_model_max_length", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter",
    "mm_projector_lr", "mm_use_im_start_end", "mm_use_im_patch_token", "vision_config", "vision_aux_config",
)

_CORE_KEYS = (
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings",
    "rms_norm_eps", "rope_parameters", "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings",
    "num_local_experts", "num_experts_per_tok",
)


def _write_config(config: Any, path: Path) -> None:
    # The diff against class defaults keeps the file short, but the MM keys are written even when they equal our
    # defaults, as in the released files (a reader must not depend on our defaults).
    data = config.to_diff_dict()
    for key in (*_CORE_KEYS, *OFFICIAL_MM_KEYS):
        if hasattr(config, key):
            data[key] = getattr(config, key)
    data["dtype"] = str(data.get("dtype", "float32")).removeprefix("torch.")
    path.write_text(json.dumps(dict(sorted(data.items())), indent=2) + "\n")


# --- the whole checkpoint -------------------------------------------------------------------------------------------


def build_tiny(
    out: str | Path,
    *,
    backbone: Family = "llama",
    hd: bool = False,
    seed: int = 0,
    dtype: str = "float32",
    legacy_names: bool = False,
    spec: TinySpec = TinySpec(),
    progress: bool = False,
) -> Path:
    """Write a tiny checkpoint to ``out`` (created; existing files are overwritten). Returns the directory."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer(backbone, spec.tokenizer_vocab)
    if IMAGE_PLACEHOLDER in tokenizer.get_vocab():  # would silently change chunk-wise tokenisation
        raise AssertionError("tiny tokenizer must not contain <image>")
    config = build_config(backbone, hd=hd, vocab_size=len(tokenizer), spec=spec, legacy_names=legacy_names, dtype=dtype)
    weights = build_weights(config, seed, progress=progress)

    _write_config(config, out / "config.json")
    GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    ).save_pretrained(out)
    tokenizer.save_pretrained(out)
    # One metadata key only: safetensors writes metadata from a hash map, so a second key makes the bytes vary.
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    build_info = {"builder": "engine.tiny", "backbone": backbone, "hd": hd, "seed": seed, "dtype": dtype,
                  "legacy_names": legacy_names, "spec": asdict(spec)}
    (out / BUILD_INFO).write_text(json.dumps(build_info, indent=2) + "\n")
    n_params = sum(t.numel() for t in weights.values())
    logger.info(
        "built tiny checkpoint",
        extra={"fields": {"out": str(out), "backbone": backbone, "hd": hd, "seed": seed, "params": n_params,
                          "tensors": len(weights), "vocab": len(tokenizer), "arch": config.architectures[0]}},
    )
    return out
