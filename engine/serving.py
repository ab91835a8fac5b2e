"""Files that make vLLM's OpenAI server speak the official MGM conversation format for a checkpoint.

vLLM takes the chat template from the tokenizer and the stop ids from ``generation_config.json``. Released MGM
checkpoints ship neither the MGM template (Vicuna has none, Gemma-2B-it has Gemma's own) nor the template's
stop tokens (MGM-2B stops on ``<end_of_turn>``, MGM-34B on ``<|im_end|>``, MGM-8B on ``<|eot_id|>``, docs/mgm.md §6),
so :func:`prepare_serving_files` writes both next to each other in a separate directory, leaving the checkpoint
untouched: the Jinja template of :mod:`engine.prompt` and the checkpoint's generation config with the template's
single-token stop strings added to ``eos_token_id`` (vLLM stops on every id listed there) and, by default, the
official CLI's sampling (:data:`OFFICIAL_SAMPLING`), which vLLM applies to every request that leaves a value unset.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from engine.names import LLAMA3_BOS, SAMPLING_DEFAULTS
from engine.prompt import chat_template, choose_template, stop_strings, stop_token_ids

logger = logging.getLogger(__name__)

#: ``mgm/serve/cli.py``: ``--temperature 0.2 --max-new-tokens 512``, sampling (``do_sample`` when the temperature is
#: above 0); HF's ``top_k`` of 50 applies unless the checkpoint's generation config sets its own.
OFFICIAL_SAMPLING = {"do_sample": True, "temperature": 0.2, "max_new_tokens": 512}
HF_DEFAULT_TOP_K = 50


@dataclass(frozen=True)
class ServingFiles:
    template: str  # conversation template name (engine.prompt.TEMPLATES)
    chat_template: Path  # Jinja file for --chat-template
    generation_config: Path  # directory for --generation-config
    stop_token_ids: tuple[int, ...]  # every id generation stops on
    stop_strings: tuple[str, ...]  # template stops that are not single tokens (the client must pass them)
    sampling: dict[str, object]  # the default sampling values written (temperature, top_k, max_new_tokens, ...)


def prepare_serving_files(model: str | Path, out: str | Path, template: str | None = None,
                          sampling: str = SAMPLING_DEFAULTS[0], llama3_bos: str = LLAMA3_BOS[0]) -> ServingFiles:
    """Write ``chat_template.jinja`` and ``generation_config.json`` for ``model`` into ``out``.

    ``template`` overrides the automatic choice (:func:`engine.prompt.choose_template`: by backbone, then by the
    tokenizer's special tokens); ``sampling`` is one of :data:`SAMPLING_DEFAULTS`, ``llama3_bos`` one of
    :data:`LLAMA3_BOS` (the ``llama_3`` template's variant).
    """
    if sampling not in SAMPLING_DEFAULTS:
        raise ValueError(f"unknown sampling defaults {sampling!r}; choose from {', '.join(SAMPLING_DEFAULTS)}")
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from engine.config import register_configs

    register_configs()
    model, out = Path(model), Path(out)
    config = AutoConfig.from_pretrained(model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    name = choose_template(config, tokenizer, override=template)
    out.mkdir(parents=True, exist_ok=True)

    template_path = out / "chat_template.jinja"
    template_path.write_text(chat_template(name, llama3_bos))

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
    if sampling == "official":
        for key, value in OFFICIAL_SAMPLING.items():
            setattr(generation, key, value)
        if generation.top_k is None:
            generation.top_k = HF_DEFAULT_TOP_K
    # Written as JSON by hand: GenerationConfig.save_pretrained validates sampling flags we do not touch.
    data = json.loads(generation.to_json_string(use_diff=True))
    data["eos_token_id"] = generation.eos_token_id
    if sampling == "official":  # written even where they equal HF's defaults: vLLM reads the file, not HF
        data.update(OFFICIAL_SAMPLING, top_k=generation.top_k)
    (out / "generation_config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    vocab = tokenizer.get_vocab()
    multi_token = tuple(s for s in stop_strings(name) if s not in vocab)
    if multi_token:
        logger.warning("stop strings %s are not single tokens of this tokenizer; pass them as 'stop'", multi_token)
    chosen = {k: data[k] for k in ("temperature", "top_k", "top_p", "max_new_tokens") if k in data}
    return ServingFiles(name, template_path, out, tuple(eos_ids), multi_token, chosen)
