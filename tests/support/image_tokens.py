"""The prompt layout the LLM sees after vLLM's prompt update, rebuilt independently for the engine tests."""

from __future__ import annotations

from collections.abc import Iterable

from engine.names import IMAGE_TOKEN_INDEX


def expand_image_tokens(
    ids: Iterable[int], tokens_per_image: int, placeholder_id: int, image_token_id: int = IMAGE_TOKEN_INDEX
) -> list[int]:
    """Replace each image slot by ``tokens_per_image`` copies of ``placeholder_id``."""
    out: list[int] = []
    for i in ids:
        out.extend([placeholder_id] * tokens_per_image if i == image_token_id else [i])
    return out
