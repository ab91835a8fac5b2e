"""Build the vLLM MGM model in a plain process, without an engine, for weight-loading and vision-tower tests.

Runs inside a spawned worker (see ``model_worker`` in test_engine_weights.py): it initialises a one-rank gloo
"distributed" world, which must not leak into the pytest process that also starts real engines.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch


def init_worker() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import engine

    engine.register()


def _init_parallel_groups() -> None:
    """Inside the model's current vLLM config: the groups depend on it (an MoE model gets an expert group)."""
    from vllm.distributed import (destroy_model_parallel, init_distributed_environment, initialize_model_parallel,
                                  model_parallel_is_initialized)

    if not torch.distributed.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        init_distributed_environment(world_size=1, rank=0, local_rank=0,
                                     distributed_init_method=f"tcp://127.0.0.1:{port}", backend="gloo")
    if model_parallel_is_initialized():
        destroy_model_parallel()
    initialize_model_parallel(1, 1)


def _build(path: Path, dtype: torch.dtype = torch.float32):  # type: ignore[no-untyped-def]
    """What vLLM's loader does: create the model, stream the checkpoint through ``load_weights``, run the
    loader's strict "every parameter loaded" check, then the CPU weight post-processing."""
    from vllm.config import DeviceConfig, LoadConfig, ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.model_executor.model_loader.utils import process_weights_after_loading
    from vllm.utils.torch_utils import set_default_torch_dtype

    config = VllmConfig(model_config=ModelConfig(model=str(path), dtype=dtype, max_model_len=512),
                        device_config=DeviceConfig("cpu"), load_config=LoadConfig())
    with set_current_vllm_config(config):
        _init_parallel_groups()
        loader = get_model_loader(config.load_config)
        with set_default_torch_dtype(dtype), torch.device("cpu"):
            model = loader.create_model(vllm_config=config, model_config=config.model_config)
        loader.load_weights(model, config.model_config)
        process_weights_after_loading(model, config.model_config, torch.device("cpu"))
    return model


def load_error(path: str) -> str | None:
    """None if the checkpoint loads; otherwise the error as ``"Type: message"``."""
    try:
        _build(Path(path))
    except Exception as exc:  # noqa: BLE001 — the message is what the test checks
        return f"{type(exc).__name__}: {exc}"
    return None


def image_features(path: str, images: list) -> torch.Tensor:  # type: ignore[type-arg]
    """``embed_multimodal`` on the official preprocessing of ``images``: (num_images, tokens, hidden)."""
    from engine.processor import MGMImageProcessor

    model = _build(Path(path))
    pixels = MGMImageProcessor.from_config(model.config)(images)
    with torch.no_grad():
        return model.embed_multimodal(**pixels).clone()


def lm_head_report(path: str) -> dict[str, object]:
    """The head vLLM computes logits with, the embedding, and whether they share storage."""
    model = _build(Path(path))
    lm = model.language_model
    vocab = model.config.vocab_size  # vLLM pads the embedding rows to a multiple of 64
    return {"head": lm.lm_head.weight[:vocab].detach().clone(), "embed": lm.model.embed_tokens.weight[:vocab].detach().clone(),
            "tied": lm.lm_head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr()}
