"""The official MGM weight layout (docs/mgm.md §5.2) and the strict check a checkpoint must pass against it.

:func:`official_weight_layout` lists every tensor an official checkpoint holds for a config — LLM, ``mm_projector``,
the three ``vlm_uni_*`` projectors, the full CLIP tower (including its unused last layer and ``post_layernorm``)
and the ConvNeXt — with its shape and a *kind* (how :mod:`engine.tiny` initialises it). The vLLM loader
(:mod:`engine.model`) filters a checkpoint through :class:`StrictWeights`; the tiny-checkpoint builder writes
exactly this layout.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Literal

import torch

from engine.config import backbone_family, clip_layers_needed
from engine.names import Family

Kind = Literal["matrix", "bias", "norm", "rmsnorm", "embedding", "layer_scale"]
Layout = dict[str, tuple[tuple[int, ...], Kind]]

CLIP_PREFIX = "model.vision_tower.vision_tower.vision_model."
#: Checkpoint buffers that some saves contain and no module needs (recomputed at load time).
HARMLESS_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids")


def _llm_shapes(config: Any, family: Family) -> Iterator[tuple[str, tuple[int, ...], Kind]]:
    h, v = config.hidden_size, config.vocab_size
    hd = config.head_dim
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    norm: Kind = "rmsnorm" if family == "gemma" else "norm"
    yield "model.embed_tokens.weight", (v, h), "embedding"
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        yield p + "self_attn.q_proj.weight", (q, h), "matrix"
        yield p + "self_attn.k_proj.weight", (kv, h), "matrix"
        yield p + "self_attn.v_proj.weight", (kv, h), "matrix"
        yield p + "self_attn.o_proj.weight", (h, q), "matrix"
        inter = config.intermediate_size
        if family == "mixtral":
            # Legacy per-expert names, as in the released MGM-8x7B shards.
            yield p + "block_sparse_moe.gate.weight", (config.num_local_experts, h), "matrix"
            for e in range(config.num_local_experts):
                yield p + f"block_sparse_moe.experts.{e}.w1.weight", (inter, h), "matrix"
                yield p + f"block_sparse_moe.experts.{e}.w2.weight", (h, inter), "matrix"
                yield p + f"block_sparse_moe.experts.{e}.w3.weight", (inter, h), "matrix"
        else:
            yield p + "mlp.gate_proj.weight", (inter, h), "matrix"
            yield p + "mlp.up_proj.weight", (inter, h), "matrix"
            yield p + "mlp.down_proj.weight", (h, inter), "matrix"
        yield p + "input_layernorm.weight", (h,), norm
        yield p + "post_attention_layernorm.weight", (h,), norm
    yield "model.norm.weight", (h,), norm
    yield "lm_head.weight", (v, h), "matrix"


def _projector_shapes(config: Any) -> Iterator[tuple[str, tuple[int, ...], Kind]]:
    h, dv, da = config.hidden_size, config.mm_hidden_size, config.mm_hidden_size_aux
    yield "model.mm_projector.0.weight", (h, dv), "matrix"
    yield "model.mm_projector.0.bias", (h,), "bias"
    yield "model.mm_projector.2.weight", (h, h), "matrix"
    yield "model.mm_projector.2.bias", (h,), "bias"
    for name, d_in in (("query", dv), ("aux", da), ("val", da)):
        p = f"model.vlm_uni_{name}_projector."
        yield p + "0.weight", (d_in,), "norm"
        yield p + "0.bias", (d_in,), "bias"
        yield p + "1.weight", (dv, d_in), "matrix"
        yield p + "1.bias", (dv,), "bias"


def _clip_shapes(config: Any) -> Iterator[tuple[str, tuple[int, ...], Kind]]:
    c = config.clip_vision_config()
    d, m, p = c.hidden_size, c.intermediate_size, c.patch_size
    yield CLIP_PREFIX + "embeddings.class_embedding", (d,), "embedding"
    yield CLIP_PREFIX + "embeddings.patch_embedding.weight", (d, c.num_channels, p, p), "matrix"
    yield CLIP_PREFIX + "embeddings.position_embedding.weight", ((c.image_size // p) ** 2 + 1, d), "embedding"
    yield CLIP_PREFIX + "pre_layrnorm.weight", (d,), "norm"  # sic: HF CLIP's spelling
    yield CLIP_PREFIX + "pre_layrnorm.bias", (d,), "bias"
    for i in range(c.num_hidden_layers):  # all layers, although select_layer -2 never runs the last one
        lp = f"{CLIP_PREFIX}encoder.layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            yield lp + f"self_attn.{proj}.weight", (d, d), "matrix"
            yield lp + f"self_attn.{proj}.bias", (d,), "bias"
        yield lp + "layer_norm1.weight", (d,), "norm"
        yield lp + "layer_norm1.bias", (d,), "bias"
        yield lp + "mlp.fc1.weight", (m, d), "matrix"
        yield lp + "mlp.fc1.bias", (m,), "bias"
        yield lp + "mlp.fc2.weight", (d, m), "matrix"
        yield lp + "mlp.fc2.bias", (d,), "bias"
        yield lp + "layer_norm2.weight", (d,), "norm"
        yield lp + "layer_norm2.bias", (d,), "bias"
    yield CLIP_PREFIX + "post_layernorm.weight", (d,), "norm"
    yield CLIP_PREFIX + "post_layernorm.bias", (d,), "bias"


def _convnext_shapes(config: Any) -> Iterator[tuple[str, tuple[int, ...], Kind]]:
    from torch import nn

    from engine.convnext import ConvNeXtTower

    # The tower module is the source of truth for its parameter names (they equal the checkpoint keys).
    with torch.device("meta"):
        tower = ConvNeXtTower.from_config(config)
    kinds: dict[str, Kind] = {}
    for mod_name, module in tower.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if p_name == "gamma":
                kinds[full] = "layer_scale"
            elif p_name == "bias":
                kinds[full] = "bias"
            elif isinstance(module, nn.LayerNorm):
                kinds[full] = "norm"
            else:
                kinds[full] = "matrix"
    for name, param in tower.state_dict().items():
        yield "model.vision_tower_aux." + name, tuple(param.shape), kinds[name]


def official_weight_layout(config: Any) -> Layout:
    """Every key of an official MGM checkpoint for this config → (shape, kind), in a fixed order."""
    family = backbone_family(config)
    layout: Layout = {}
    for part in (_llm_shapes(config, family), _projector_shapes(config), _clip_shapes(config), _convnext_shapes(config)):
        for name, shape, kind in part:
            layout[name] = (shape, kind)
    return layout


def skipped_keys(config: Any, layout: Iterable[str]) -> set[str]:
    """Official keys that are read and deliberately not loaded: CLIP's ``post_layernorm`` and the CLIP layers after
    ``mm_vision_select_layer``, which never run (docs/mgm.md §4)."""
    kept_layers = clip_layers_needed(config)
    layers = CLIP_PREFIX + "encoder.layers."
    skipped = {CLIP_PREFIX + "post_layernorm.weight", CLIP_PREFIX + "post_layernorm.bias"}
    for key in layout:
        if key.startswith(layers) and int(key[len(layers):].split(".")[0]) >= kept_layers:
            skipped.add(key)
    return skipped


class StrictWeights:
    """Checks a checkpoint's tensors against the official layout while a loader consumes them.

    :meth:`filter` raises ``ValueError`` naming an unknown, duplicate or mis-shaped tensor and yields the ones to
    load; :meth:`check_complete`, called after loading, raises on missing tensors. ``lm_head.weight`` may be absent
    only when the config ties it to the embeddings.
    """

    def __init__(self, config: Any) -> None:
        self.config = config
        self.family = backbone_family(config)
        self.shapes = {name: shape for name, (shape, _) in official_weight_layout(config).items()}
        self.skipped = skipped_keys(config, self.shapes)
        self.optional = {"lm_head.weight"} if config.tie_word_embeddings else set()
        self.seen: set[str] = set()

    def filter(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            if name not in self.shapes:
                if name.endswith(HARMLESS_SUFFIXES):
                    continue
                raise ValueError(f"unexpected tensor {name!r} in the checkpoint: not part of the official MGM "
                                 f"layout for this config ({type(self.config).__name__}, {self.family})")
            if name in self.seen:
                raise ValueError(f"tensor {name!r} appears twice in the checkpoint")
            if tuple(tensor.shape) != tuple(self.shapes[name]):
                raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected "
                                 f"{tuple(self.shapes[name])} from config.json")
            self.seen.add(name)
            if name not in self.skipped:
                yield name, tensor

    def check_complete(self) -> None:
        missing = sorted(set(self.shapes) - self.seen - self.optional)
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise ValueError(f"checkpoint is missing {len(missing)} tensor(s): {missing[:5]}{more}")
