"""Mini-Gemini model pieces for the vLLM plugin: config, processor, prompts, ConvNeXt tower, tiny checkpoints.

Kept import-free on purpose: ``import engine`` must not pull in torch, transformers or vLLM (the vLLM plugin
entry point and the CLI import it in every process). Import the submodules you need.
"""

from __future__ import annotations

#: "module:Class" of the vLLM model; lazy, so vLLM imports it only in the processes that build the model.
MODEL_CLASS = "engine.model:MGMForCausalLM"


def register() -> None:
    """vLLM ``general_plugins`` entry point: MGM configs for transformers, the six architecture names for vLLM.

    vLLM calls this in every process (API server, engine core, workers), possibly more than once; it is idempotent
    and cheap (the model module itself is imported lazily by vLLM).
    """
    from vllm import ModelRegistry

    from engine.config import register_configs
    from engine.names import ARCHITECTURE_TO_FAMILY

    register_configs()
    supported = set(ModelRegistry.get_supported_archs())
    for arch in ARCHITECTURE_TO_FAMILY:
        if arch not in supported:
            ModelRegistry.register_model(arch, MODEL_CLASS)
