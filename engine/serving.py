"""Files that make vLLM's OpenAI server speak the official MGM conversation format for a checkpoint.

vLLM takes the chat template from the tokenizer and the stop ids from ``generation_config.json``. Released MGM
checkpoints ship neither the MGM template (Vicuna has none, Gemma-2B-it has Gemma's own) nor the template's
stop tokens (MGM-2B stops on ``<end_of_turn>``, MGM-34B on ``<|im_end|>``, MGM-8B on ``<|eot_id|>``, docs/mgm.md §6),
so :func:`prepare_serving_files` writes both next to each other in a separate directory, leaving the checkpoint
untouched: the Jinja template of :mod:`engine.prompt` and the checkpoint's generation config with the template's
single-token stop strings added to ``eos_token_id`` (vLLM stops on every id listed there).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from engine.prompt import chat_template, choose_template, stop_strings, stop_token_ids

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServingFiles:
    template: str  # conversation template name (engine.prompt.TEMPLATES)
    chat_template: Path  # Jinja file for --chat-template
    generation_config: Path  # directory for --generation-config
    stop_token_ids: tuple[int, ...]  # every id generation stops on
    stop_strings: tuple[str, ...]  # template stops that are not single tokens (the client must pass them)


def prepare_serving_files(model: str | Path, out: str | Path, template: str | None = None) -> ServingFiles:
    """Write ``chat_template.jinja`` and ``generation_config.json`` for ``model`` into ``out``.

    ``template`` overrides the automatic choice (:func:`engine.prompt.choose_template`: by backbone, then by the
    tokenizer's special tokens).
    """
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from engine.config import register_configs

    register_configs()
    model, out = Path(model), Path(out)
    config = AutoConfig.from_pretrained(model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    name = choose_template(config, tokenizer, override=template)
    out.mkdir(parents=True, exist_ok=True)

    template_path = out / "chat_template.jinja"
    template_path.write_text(chat_template(name))

    try:
        generation = GenerationConfig.from_pretrained(model)
    except OSError:  # no generation_config.json: start from the model config's special tokens
        generation = GenerationConfig.from_model_config(config)
    eos = generation.eos_token_id if generation.eos_token_id is not None else tokenizer.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    for token_id in stop_token_ids(tokenizer, name):
        if token_id not in eos_ids:
            eos_ids.append(token_id)
    generation.eos_token_id = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    # Written as JSON by hand: GenerationConfig.save_pretrained validates sampling flags we do not touch.
    data = json.loads(generation.to_json_string(use_diff=True))
    data["eos_token_id"] = generation.eos_token_id
    (out / "generation_config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    vocab = tokenizer.get_vocab()
    multi_token = tuple(s for s in stop_strings(name) if s not in vocab)
    if multi_token:
        logger.warning("stop strings %s are not single tokens of this tokenizer; pass them as 'stop'", multi_token)
    return ServingFiles(name, template_path, out, tuple(eos_ids), multi_token)
