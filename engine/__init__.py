"""Mini-Gemini model pieces for the vLLM plugin: config, processor, prompts, ConvNeXt tower, tiny checkpoints.

Kept import-free on purpose: ``import engine`` must not pull in torch, transformers or vLLM (the vLLM plugin
entry point and the CLI import it in every process). Import the submodules you need.
"""
