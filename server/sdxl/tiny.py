"""A seeded random SDXL pipeline, small enough to render 64×64 images on a CPU in well under a second.

The layout is the real one (``model_index.json`` + ``unet/ vae/ text_encoder/ text_encoder_2/ tokenizer/
tokenizer_2/ scheduler/``), written by ``StableDiffusionXLPipeline.save_pretrained`` and read back by
``StableDiffusionXLPipeline.from_pretrained`` — so the worker exercises exactly the code path of a real checkpoint.
What is kept from SDXL base 1.0:

* UNet with ``addition_embed_type="text_time"`` (pooled text embedding + 6 size/crop time ids), three resolution
  levels (plain, cross-attn, cross-attn), linear projections in the transformers, more transformer layers deeper;
* two CLIP text encoders — ``CLIPTextModel`` and ``CLIPTextModelWithProjection`` — whose penultimate hidden states
  are concatenated (so ``cross_attention_dim`` = sum of their widths) and whose projection feeds the pooled branch;
* two byte-level BPE CLIP tokenizers (``tokenizer_2`` pads with "!", as SDXL's does), max length 77;
* a 4-level ``AutoencoderKL`` (VAE scale factor 8, SDXL's ``scaling_factor`` 0.13025, ``force_upcast``);
* ``EulerDiscreteScheduler`` with SDXL base's settings.

Everything is built locally: the tokenizers' merges are learned by a small deterministic BPE on a built-in corpus,
and every module is initialised from ``torch.manual_seed(seed + k)`` in a fixed order, so a build is reproducible.
The weights are random: images are coloured noise, not pictures.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Side file recording how a tiny SDXL checkpoint was built; the worker reads it to warn about random weights.
BUILD_INFO = "tiny_build.json"
#: Image side the tiny UNet defaults to (sample_size 8 latents × VAE factor 8).
DEFAULT_SIZE = 64

# --- tokenizer ------------------------------------------------------------------------------------------------------

_CORPUS = """
a photo of a cat sitting on a red sofa, studio lighting, highly detailed
a dog running on the beach at sunset, golden hour, 4k, photorealistic
a watercolor painting of mountains covered with snow behind a wooden house
portrait of a woman reading a book in a library, soft light, bokeh
a futuristic city street at night with neon signs and flying cars, cinematic
a bowl of fresh fruit on a wooden table, still life, oil painting
out of frame, lowres, text, error, cropped, worst quality, low quality, jpeg artifacts, ugly, duplicate, morbid,
mutilated, extra fingers, mutated hands, poorly drawn hands, poorly drawn face, mutation, deformed, blurry,
dehydrated, bad anatomy, bad proportions, extra limbs, cloned face, disfigured, gross proportions, malformed limbs,
missing arms, missing legs, extra arms, extra legs, fused fingers, too many fingers, long neck, username, watermark,
signature
"""

_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokenizer split (letters runs, single digits, punctuation runs); enough for learning merges.
_WORD = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+|_+")


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes 0..255 (printable Latin-1 bytes map to themselves,
    the rest to code points from 256 up), in byte order — the mapping the ByteLevel pre-tokenizer applies."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table: dict[int, str] = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def learn_clip_bpe(text: str, num_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-format vocab and merges: the byte alphabet, the same with ``</w>``, one piece per merge, then the two
    specials. Merges are learned greedily on ``text`` (most frequent pair; ties broken by the pair itself)."""
    alphabet = _byte_alphabet()
    to_sym = dict(enumerate(alphabet))
    words = Counter(_WORD.findall(text.lower()))
    # Each word as a tuple of byte symbols, the last one carrying the end-of-word marker (CLIP's "</w>").
    splits: dict[tuple[str, ...], int] = {}
    for word, count in words.items():
        syms = [to_sym[b] for b in word.encode("utf-8")]
        syms[-1] += "</w>"
        splits[tuple(syms)] = splits.get(tuple(syms), 0) + count
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):  # bounded: at most num_merges rounds, stops early when nothing is left to merge
        pairs: Counter[tuple[str, str]] = Counter()
        for syms, count in splits.items():
            for pair in zip(syms, syms[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged: dict[tuple[str, ...], int] = {}
        for syms, count in splits.items():
            out: list[str] = []
            i = 0
            while i < len(syms):
                if i + 1 < len(syms) and (syms[i], syms[i + 1]) == best:
                    out.append(syms[i] + syms[i + 1])
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + count
        splits = merged
    pieces = alphabet + [s + "</w>" for s in alphabet] + ["".join(m) for m in merges] + [_BOS, _EOS]
    vocab: dict[str, int] = {}
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    return vocab, merges


def build_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], pad_token: str = _EOS) -> Any:
    """A ``CLIPTokenizer`` from in-memory vocab/merges (SDXL: tokenizer pads with <|endoftext|>, tokenizer_2 with !)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m) for m in merges], pad_token=pad_token,
                         model_max_length=77)


# --- modules --------------------------------------------------------------------------------------------------------


def _text_config(vocab: dict[str, int], hidden: int, layers: int, act: str, projection_dim: int) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=77, hidden_act=act, projection_dim=projection_dim,
        bos_token_id=vocab[_BOS], eos_token_id=vocab[_EOS], pad_token_id=vocab[_EOS],
    )


def build_modules(seed: int = 0, *, progress: bool = False) -> dict[str, Any]:
    """All pipeline components, each initialised from ``seed + k`` in a fixed order (k = position below)."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from tqdm.auto import tqdm
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    vocab, merges = learn_clip_bpe(_CORPUS, num_merges=300)
    te1_width, te2_width, proj_dim, time_dim = 32, 32, 32, 8

    def unet() -> Any:
        return UNet2DConditionModel(
            sample_size=DEFAULT_SIZE // 8,
            in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(16, 32, 64),
            layers_per_block=1,
            transformer_layers_per_block=(1, 1, 2),
            attention_head_dim=(2, 4, 4),  # diffusers' legacy name: these are head *counts*, as in SDXL's config
            norm_num_groups=8,
            cross_attention_dim=te1_width + te2_width,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            # 6 time ids (original size, crop top-left, target size) × time_dim + text_encoder_2's pooled projection.
            projection_class_embeddings_input_dim=6 * time_dim + proj_dim,
        )

    def vae() -> Any:
        return AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4,
            sample_size=DEFAULT_SIZE, scaling_factor=0.13025, force_upcast=True,
        )

    steps: list[tuple[str, Any]] = [
        ("tokenizer", lambda: build_tokenizer(vocab, merges)),
        ("tokenizer_2", lambda: build_tokenizer(vocab, merges, pad_token="!")),
        ("text_encoder", lambda: CLIPTextModel(_text_config(vocab, te1_width, 2, "quick_gelu", proj_dim))),
        ("text_encoder_2",
         lambda: CLIPTextModelWithProjection(_text_config(vocab, te2_width, 2, "gelu", proj_dim))),
        ("unet", unet),
        ("vae", vae),
        ("scheduler", lambda: EulerDiscreteScheduler(
            num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            prediction_type="epsilon", timestep_spacing="leading", steps_offset=1, interpolation_type="linear",
            use_karras_sigmas=False)),
    ]
    modules: dict[str, Any] = {}
    for k, (name, make) in enumerate(tqdm(steps, desc="tiny sdxl", disable=not progress, leave=False)):
        torch.manual_seed(seed + k)
        modules[name] = make()
        if isinstance(modules[name], torch.nn.Module):
            modules[name].eval()
    return modules


def build_tiny_sdxl(out: str | Path, *, seed: int = 0, progress: bool = False) -> Path:
    """Write a tiny random SDXL pipeline to ``out`` (created; files are overwritten). Returns the directory."""
    from diffusers import StableDiffusionXLPipeline

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    modules = build_modules(seed, progress=progress)
    # add_watermarker=False: the invisible-watermark package is optional and would change pixels when present.
    pipe = StableDiffusionXLPipeline(**modules, force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    n_params = sum(p.numel() for name in ("unet", "vae", "text_encoder", "text_encoder_2")
                   for p in modules[name].parameters())
    info = {"builder": "server.sdxl.tiny", "seed": seed, "default_size": DEFAULT_SIZE, "params": n_params,
            "vocab": len(modules["tokenizer"]), "random_weights": True}
    (out / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
    logger.info("built tiny SDXL pipeline (random weights)", extra={"fields": {"out": str(out), **info}})
    return out


def is_tiny(model_dir: str | Path) -> bool:
    """True for a directory written by :func:`build_tiny_sdxl` (random weights)."""
    return (Path(model_dir) / BUILD_INFO).is_file()
