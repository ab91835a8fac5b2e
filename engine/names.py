"""Names that the engine and the server share: model families, checkpoint type and architecture strings, conversation
template names and the text markers of MGM prompts (see docs/mgm.md).

Import-light on purpose (standard library only): ``mgm --help``, the gateway and the supervisor read these without
pulling in torch, transformers or vLLM.
"""

from __future__ import annotations

from typing import Literal

Family = Literal["llama", "gemma", "mixtral"]

#: The LLM backbones a checkpoint can have (and that ``mgm build-tiny`` can build).
BACKBONES: tuple[Family, ...] = ("llama", "gemma", "mixtral")

#: ``config.json["model_type"]`` strings in the wild: checkpoints uploaded before the 2024-04-21 rename say
#: ``mini_gemini*``, later ones ``mgm*``.
MODEL_TYPE_TO_FAMILY: dict[str, Family] = {
    "mgm": "llama",
    "mgm_gemma": "gemma",
    "mgm_mixtral": "mixtral",
    "mini_gemini": "llama",
    "mini_gemini_gemma": "gemma",
    "mini_gemini_mixtral": "mixtral",
}

#: The six ``config.json["architectures"]`` strings the vLLM plugin registers.
ARCHITECTURE_TO_FAMILY: dict[str, Family] = {
    "MGMLlamaForCausalLM": "llama",
    "MGMGemmaForCausalLM": "gemma",
    "MGMMixtralForCausalLM": "mixtral",
    "MiniGeminiLlamaForCausalLM": "llama",
    "MiniGeminiGemmaForCausalLM": "gemma",
    "MiniGeminiMixtralForCausalLM": "mixtral",
}

#: The plain text-only architecture serving the LLM part of each family.
FAMILY_TO_TEXT_ARCHITECTURE: dict[Family, str] = {
    "llama": "LlamaForCausalLM",
    "gemma": "GemmaForCausalLM",
    "mixtral": "MixtralForCausalLM",
}

#: Conversation template names (the official ``conv_templates`` keys that MGM checkpoints use).
TEMPLATE_NAMES: tuple[str, ...] = ("vicuna_v1", "gemma", "mistral_instruct", "chatml_direct", "llama_3")

#: The image slot in prompt text; no MGM tokenizer has it as a token (prompts are tokenised chunk-wise around it).
IMAGE_PLACEHOLDER = "<image>"
#: Official id of the image slot in ``input_ids`` (``IMAGE_TOKEN_INDEX`` of the official constants).
IMAGE_TOKEN_INDEX = -200
#: Appended to a user turn's text to ask for an SDXL prompt (generation mode); plain text, not a special token.
GEN_SUFFIX = " <GEN>"
#: The model writes the SDXL prompt between these tags.
CAPTION_OPEN, CAPTION_CLOSE = "<h>", "</h>"

#: ``mgm engine --sampling-defaults``: ``official`` = the official CLI's sampling (engine.serving.OFFICIAL_SAMPLING),
#: ``checkpoint`` = the checkpoint's generation config as it is (vLLM's own behaviour).
SAMPLING_DEFAULTS = ("official", "checkpoint")
#: ``mgm engine --llama3-bos``: how the ``llama_3`` prompt begins. ``double``: as the official code was when MGM-8B
#: was released (its system string began with a literal ``<|begin_of_text|>``, so with the tokenizer's own BOS the
#: ids start with two, docs/mgm.md §6.3); ``single``: as the official code is since commit 769820c.
LLAMA3_BOS = ("double", "single")
#: ``mgm build-tiny --vision``: the tiny towers, or the released checkpoints' tower sizes (engine.tiny.REAL_VISION).
VISION_SIZES = ("tiny", "real")
