"""MGM in plain PyTorch + HF transformers, independent of the serving path: the engine tests' float64 reference and,
at serving precision (float32 on CPU), the model behind the official-serving baseline (official_server.py).

Written from docs/mgm.md (§2 mining, §3 ConvNeXt/preprocessing, §4 CLIP, §6 prompts, §11.6 Gemma) and the official
code as quoted there, sharing nothing with the serving path except the config classes and the official
tokenisation rule (itself tested against hand-written ids in tests/engine/test_engine_prompt.py):

* preprocessing: the official ``expand2square`` + HF ``CLIPImageProcessor`` + bilinear LR views / CLI crop reshape;
* CLIP: HF transformers ``CLIPVisionModel`` with *all* checkpoint layers, ``hidden_states[select_layer][:, 1:]``;
* ConvNeXt: a functional ConvNeXt (:func:`reference_convnext`), stages upsampled and concatenated;
* mining: the official ``unified_resampler`` tensor ops on the concatenated map (HD: tiles + ½-downsampled map);
* projector and LLM: plain tensors and the HF transformers LLM fed with ``inputs_embeds`` — so HF ``generate``
  works as in the official ``MGMLlamaForCausalLM.generate`` (embeddings built first, then ``generate(inputs_embeds)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer, CLIPVisionModel

from engine.config import backbone_family
from engine.names import IMAGE_TOKEN_INDEX
from engine.prompt import tokenize_official

CLIP_PREFIX = "model.vision_tower.vision_tower.vision_model."  # transformers 5: CLIPVisionModel has no vision_model.
VISION_PREFIXES = ("model.vision_tower.", "model.vision_tower_aux.", "model.mm_projector.", "model.vlm_uni_")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)


def _sub(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


# ---- functional ConvNeXt (written from the timm description in docs/mgm.md §3.1) ----------------------------------------


def _ln_channels(x, w, b, eps=1e-6):  # type: ignore[no-untyped-def]
    # LayerNorm over dim 1 of NCHW, by hand.
    mu = x.mean(dim=1, keepdim=True)
    var = ((x - mu) ** 2).mean(dim=1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w[None, :, None, None] + b[None, :, None, None]


def _gelu_exact(x):  # type: ignore[no-untyped-def]
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def reference_convnext(params: dict[str, torch.Tensor], depths, x: torch.Tensor,  # type: ignore[no-untyped-def]
                       dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    """The four ConvNeXt stage maps of ``x`` (N, 3, S, S), computed in ``dtype``."""
    p = {k: v.to(dtype) for k, v in params.items()}
    x = x.to(dtype)
    x = F.conv2d(x, p["vision_stem.0.weight"], p["vision_stem.0.bias"], stride=4)
    x = _ln_channels(x, p["vision_stem.1.weight"], p["vision_stem.1.bias"])
    outs = []
    for s, depth in enumerate(depths):
        if s > 0:
            q = f"vision_stages.{s}.downsample."
            x = _ln_channels(x, p[q + "0.weight"], p[q + "0.bias"])
            x = F.conv2d(x, p[q + "1.weight"], p[q + "1.bias"], stride=2)
        for b in range(depth):
            q = f"vision_stages.{s}.blocks.{b}."
            y = F.conv2d(x, p[q + "conv_dw.weight"], p[q + "conv_dw.bias"], padding=3, groups=x.shape[1])
            y = _ln_channels(y, p[q + "norm.weight"], p[q + "norm.bias"])
            y = torch.einsum("bchw,oc->bohw", y, p[q + "mlp.fc1.weight"]) + p[q + "mlp.fc1.bias"][None, :, None, None]
            y = _gelu_exact(y)
            y = torch.einsum("bchw,oc->bohw", y, p[q + "mlp.fc2.weight"]) + p[q + "mlp.fc2.bias"][None, :, None, None]
            x = x + y * p[q + "gamma"][None, :, None, None]
        outs.append(x)
    return outs


# ---- the whole model ---------------------------------------------------------------------------------------------


def expand2square(image: Image.Image, color: tuple[int, ...]) -> Image.Image:
    """Official ``mgm/mm_utils.py`` expand2square. Deliberately not engine/processor.py's: the reference shares no
    preprocessing code with the serving path it checks."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), color)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


def _ln_linear(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    x = F.layer_norm(x, p["0.weight"].shape, p["0.weight"], p["0.bias"], 1e-5)
    return F.linear(x, p["1.weight"], p["1.bias"])


def _concat_stages(stages: list[torch.Tensor]) -> torch.Tensor:
    size = stages[0].shape[-2:]
    return torch.cat([stages[0]] + [F.interpolate(s, size=size, mode="bilinear", align_corners=False)
                                    for s in stages[1:]], dim=1)


@dataclass
class Logits:
    ids: list[int]  # expanded prompt ids (image slots = placeholder id)
    logits: torch.Tensor  # (len(ids), vocab) in the model's dtype
    image_spans: list[tuple[int, int]]  # [start, end) of each image block


@dataclass
class Embeds:
    ids: list[int]  # expanded prompt ids (image slots = placeholder id)
    embeds: torch.Tensor  # (1, len(ids), H): what the LLM is fed
    image_spans: list[tuple[int, int]]


class MGMReference:
    """MGM on HF transformers in ``dtype``: float64 for the fidelity tests, float32 to serve the baseline on CPU."""

    def __init__(self, path: Path, placeholder_id: int, dtype: torch.dtype = torch.float64) -> None:
        self.config = config = AutoConfig.from_pretrained(path)
        self.family = backbone_family(config)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.placeholder_id = placeholder_id
        self.dtype = dtype
        self.weights = {k: v.to(dtype) for k, v in load_file(Path(path) / "model.safetensors").items()}
        clip_cfg = config.clip_vision_config()
        self.lr, self.grid = clip_cfg.image_size, clip_cfg.image_size // clip_cfg.patch_size
        self.clip = CLIPVisionModel(clip_cfg).to(dtype).eval()
        clip_state = _sub(self.weights, CLIP_PREFIX)
        missing, unexpected = self.clip.load_state_dict(clip_state, strict=False)
        assert not unexpected and not [m for m in missing if "position_ids" not in m], (missing, unexpected)
        self.llm = self._build_llm()

    # -- LLM --------------------------------------------------------------------------------------------------

    def _build_llm(self):  # type: ignore[no-untyped-def]
        from transformers import (GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM, MixtralConfig,
                                  MixtralForCausalLM)

        cls, cfg_cls = {"llama": (LlamaForCausalLM, LlamaConfig), "gemma": (GemmaForCausalLM, GemmaConfig),
                        "mixtral": (MixtralForCausalLM, MixtralConfig)}[self.family]
        raw = self.config.to_dict()
        raw.pop("model_type", None)
        cfg = cfg_cls(**raw)
        if self.dtype == torch.float64:
            cfg._attn_implementation = "eager"
            cfg._experts_implementation = "eager"  # the grouped-mm default has no float64 kernel
        llm = cls(cfg).to(self.dtype).eval()
        state = {k: v for k, v in self.weights.items() if not k.startswith(VISION_PREFIXES)}
        if self.family == "mixtral":  # released per-expert names → transformers 5's fused expert tensors
            for i in range(cfg.num_hidden_layers):
                p = f"model.layers.{i}.block_sparse_moe."
                experts = range(cfg.num_local_experts)
                state[f"model.layers.{i}.mlp.gate.weight"] = state.pop(p + "gate.weight")
                state[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
                    [torch.cat([state.pop(f"{p}experts.{e}.w1.weight"), state.pop(f"{p}experts.{e}.w3.weight")])
                     for e in experts])
                state[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack(
                    [state.pop(f"{p}experts.{e}.w2.weight") for e in experts])
        missing, unexpected = llm.load_state_dict(state, strict=False)
        assert not missing and not unexpected, (missing, unexpected)
        if cfg.tie_word_embeddings:
            llm.tie_weights()
            assert llm.lm_head.weight.data_ptr() == llm.model.embed_tokens.weight.data_ptr()
        return llm

    def embed_text(self, ids: list[int]) -> torch.Tensor:
        emb = self.llm.model.embed_tokens
        out = emb(torch.tensor(ids))
        if self.family == "gemma":
            # transformers 5 scales inside the embedding module (GemmaTextScaledWordEmbedding) and leaves
            # inputs_embeds alone; MGM-2B's training code scaled all inputs_embeds in the model instead. Check which
            # behaviour is installed, so the image rows below get exactly one √H, like the text rows.
            scaled = emb.weight[torch.tensor(ids)] * math.sqrt(self.config.hidden_size)
            assert torch.allclose(out, scaled.to(out.dtype), rtol=1e-3 if self.dtype != torch.float64 else 1e-5)
        return out

    # -- vision -----------------------------------------------------------------------------------------------

    def preprocess(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        """Official CLI: (views (V, 3, lr, lr) in [crops…, global] order, hr (1, 3, S, S)), in the model's dtype."""
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        size, g = self.config.image_size_aux, self.config.image_grid
        proc = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        padded = expand2square(image.convert("RGB"), tuple(int(x * 255) for x in CLIP_MEAN))
        hr = proc(padded, return_tensors="pt")["pixel_values"].to(self.dtype)
        canvas = F.interpolate(hr, size=(self.lr * g, self.lr * g), mode="bilinear", align_corners=False)
        if g == 1:
            return canvas, hr
        crops = canvas[0].reshape(3, g, self.lr, g, self.lr).permute(1, 3, 0, 2, 4).reshape(g * g, 3, self.lr, self.lr)
        glob = F.interpolate(canvas, size=(self.lr, self.lr), mode="bilinear", align_corners=False)
        return torch.cat([crops, glob]), hr

    def _resampler(self, x: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        """Official ``unified_resampler`` + the residual of ``encode_images``: returns x + mined."""
        n, num, _ = x.shape
        patch_num = int(num**0.5)
        patch_size = aux.shape[-1] // patch_num
        c = aux.shape[1]
        aux = aux.permute(0, 2, 3, 1).reshape(n, patch_num, patch_size, patch_num, patch_size, c)
        aux = aux.permute(0, 1, 3, 2, 4, 5).reshape(n, patch_num**2, patch_size**2, c)
        w = self.weights
        q = _ln_linear(x, _sub(w, "model.vlm_uni_query_projector."))
        k = _ln_linear(aux, _sub(w, "model.vlm_uni_aux_projector."))
        v = _ln_linear(aux, _sub(w, "model.vlm_uni_val_projector."))
        att = q[:, :, None] @ (k.transpose(-1, -2) / k.shape[-1] ** 0.5)
        att = att.nan_to_num()
        return x + (att.softmax(-1) @ v).mean(2)

    @torch.no_grad()
    def image_tokens(self, image: Image.Image) -> torch.Tensor:
        """(tokens_per_image, H): projected features in the official order [global, crops…]."""
        views, hr = self.preprocess(image)
        feats = self.clip(views, output_hidden_states=True).hidden_states[self.config.mm_vision_select_layer][:, 1:]
        stages = reference_convnext(_sub(self.weights, "model.vision_tower_aux."),
                                    self.config.convnext_spec().depths, hr, self.dtype)
        aux = _concat_stages(stages)
        g = self.config.image_grid
        if g == 1:
            mined = self._resampler(feats, aux)[0]
        else:
            tile = aux.shape[-1] // g
            c = aux.shape[1]
            tiles = aux.reshape(1, c, g, tile, g, tile).permute(0, 2, 4, 1, 3, 5).reshape(g * g, c, tile, tile)
            local = self._resampler(feats[: g * g], tiles).reshape(-1, feats.shape[-1])
            glob_aux = F.interpolate(aux, scale_factor=1 / g, mode="bilinear", align_corners=False)
            glob = self._resampler(feats[g * g:], glob_aux)[0]
            mined = torch.cat([glob, local])
        p = _sub(self.weights, "model.mm_projector.")
        out = F.linear(F.gelu(F.linear(mined, p["0.weight"], p["0.bias"])), p["2.weight"], p["2.bias"])
        if self.family == "gemma":
            out = out * math.sqrt(self.config.hidden_size)  # HF GemmaModel of MGM's training scaled these too
        return out

    # -- whole forward ----------------------------------------------------------------------------------------

    def official_ids(self, prompt: str) -> list[int]:
        return tokenize_official(self.tokenizer, prompt)[0]

    @torch.no_grad()
    def embed(self, prompt: str, images: list[Image.Image], extra: list[int] = (),  # type: ignore[assignment]
              features: list[torch.Tensor] | None = None) -> Embeds:
        """The LLM input for the official ids of ``prompt`` + ``extra``, one image block per ``<image>``
        (``features``: precomputed :meth:`image_tokens` of ``images``)."""
        ids = self.official_ids(prompt) + list(extra)
        slots = [i for i, t in enumerate(ids) if t == IMAGE_TOKEN_INDEX]
        if len(slots) != len(images):
            raise ValueError(f"the prompt has {len(slots)} <image> slots but {len(images)} images were given")
        if features is None:
            features = [self.image_tokens(image) for image in images]
        rows, expanded, spans = [], [], []
        prev = 0
        for slot, feats in zip(slots, features):
            text = ids[prev:slot]
            rows.append(self.embed_text(text))
            expanded += text
            spans.append((len(expanded), len(expanded) + feats.shape[0]))
            rows.append(feats)
            expanded += [self.placeholder_id] * feats.shape[0]
            prev = slot + 1
        rows.append(self.embed_text(ids[prev:]))
        expanded += ids[prev:]
        return Embeds(expanded, torch.cat(rows)[None], spans)

    @torch.no_grad()
    def forward(self, prompt: str, images: list[Image.Image], extra: list[int] = (),  # type: ignore[assignment]
                features: list[torch.Tensor] | None = None) -> Logits:
        """Logits over the expanded official sequence of ``prompt`` followed by the tokens ``extra``."""
        e = self.embed(prompt, images, extra, features)
        return Logits(e.ids, self.llm(inputs_embeds=e.embeds).logits[0], e.image_spans)

    def greedy(self, prompt: str, images: list[Image.Image], steps: int) -> tuple[list[int], list[float]]:
        """Greedy continuation and, per step, the margin between the best and second-best logit."""
        tokens: list[int] = []
        margins: list[float] = []
        features = [self.image_tokens(image) for image in images]
        for _ in range(steps):
            last = self.forward(prompt, images, tokens, features).logits[-1]
            top = last.topk(2)
            tokens.append(int(top.indices[0]))
            margins.append(float(top.values[0] - top.values[1]))
        return tokens, margins
