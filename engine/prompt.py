"""MGM conversation templates, OpenAI-style message rendering and the official chunk-wise tokenisation.

The five templates reproduce the strings of the official ``conversation.py`` (mgm.md §6), including its quirks:
the LLaMA-3 template uses the ``system`` header for the assistant role, ChatML has no newline after
``<|im_end|>``, Gemma closes an answer with ``<end_of_turn>\\n<eos>``. Images become ``"<image>\\n"`` at the start
of the user turn that carries them (training put the image first). The LLM tokenizers have no ``<image>``
token; :func:`tokenize_official` splits on the literal string like ``tokenizer_image_token`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from engine.config import MODEL_TYPE_TO_FAMILY

IMAGE_PLACEHOLDER = "<image>"
#: Official id of the image slot in ``input_ids`` (constants.IMAGE_TOKEN_INDEX).
IMAGE_TOKEN_INDEX = -200
#: Appended to the user text to ask for an SDXL prompt (mgm.md §7); plain text, not a special token.
GEN_SUFFIX = " <GEN>"

IMAGE_PART_TYPES = frozenset({"image", "image_url", "input_image", "image_pil", "image_embeds"})
TEXT_PART_TYPES = frozenset({"text", "input_text"})

Message = Mapping[str, Any]


@dataclass(frozen=True)
class ConvTemplate:
    name: str
    default_system: str
    stop: tuple[str, ...]
    render: Callable[[str | None, list[tuple[str, str]], bool], str]
    #: No system slot: a system message goes into the first user turn, after its images, + "\n\n".
    merge_system: bool = False

    def __call__(self, system: str | None, turns: list[tuple[str, str]], add_generation_prompt: bool = True) -> str:
        return self.render(system, turns, add_generation_prompt)


# Each renderer gets the system text (None = template default) and the alternating (role, text) turns,
# role in {"user", "assistant"}, first turn "user". An open assistant header is appended when
# add_generation_prompt and the last turn is the user's.

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAMA3_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the user "
    "provides, and assist the user with a variety of tasks using natural language."
)
CHATML_SYSTEM = "Answer the questions."


def _render_vicuna(system: str | None, turns: list[tuple[str, str]], gen: bool) -> str:
    # "TWO" style: system + " ", "USER: q ", "ASSISTANT: a</s>", open slot "ASSISTANT:".
    out = (VICUNA_SYSTEM if system is None else system) + " "
    for role, text in turns:
        out += f"USER: {text} " if role == "user" else f"ASSISTANT: {text}</s>"
    if gen and turns[-1][0] == "user":
        out += "ASSISTANT:"
    return out


def _render_gemma(system: str | None, turns: list[tuple[str, str]], gen: bool) -> str:
    # The official template has an empty system slot and Gemma has no system role: a caller's system text has
    # already been merged into the first user turn (ConvTemplate.merge_system), as Gemma's own template does.
    out = ""
    for role, text in turns:
        if role == "user":
            out += f"<start_of_turn>user\n{text}<end_of_turn>\n"
        else:
            out += f"<start_of_turn>model\n{text}<end_of_turn>\n<eos>"
    if gen and turns[-1][0] == "user":
        out += "<start_of_turn>model\n"
    return out


def _render_mistral(system: str | None, turns: list[tuple[str, str]], gen: bool) -> str:
    # LLAMA_2 style with an empty default system: "[INST] q [/INST]", answers " a </s>", later turns "<s>[INST] …".
    # A caller's system text uses the LLAMA_2 <<SYS>> wrapper inside the first [INST].
    out = ""
    for i, (role, text) in enumerate(turns):
        if role == "user":
            if i == 0 and system:
                text = f"<<SYS>>\n{system}\n<</SYS>>\n\n{text}"
            out += ("" if i == 0 else "<s>") + f"[INST] {text} [/INST]"
        else:
            out += f" {text} </s>"
    return out  # the open assistant slot is the end of "[/INST]" itself


def _mpt(system_header: str, default_system: str, user: str, assistant: str, sep: str):  # type: ignore[no-untyped-def]
    def render(system: str | None, turns: list[tuple[str, str]], gen: bool) -> str:
        out = system_header + (default_system if system is None else system) + sep
        for role, text in turns:
            out += (user if role == "user" else assistant) + text + sep
        if gen and turns[-1][0] == "user":
            out += assistant
        return out

    return render


TEMPLATES: dict[str, ConvTemplate] = {
    "vicuna_v1": ConvTemplate("vicuna_v1", VICUNA_SYSTEM, ("</s>",), _render_vicuna),
    "gemma": ConvTemplate("gemma", "", ("<end_of_turn>", "<eos>"), _render_gemma, merge_system=True),
    "mistral_instruct": ConvTemplate("mistral_instruct", "", ("</s>",), _render_mistral),
    "chatml_direct": ConvTemplate(
        "chatml_direct",
        CHATML_SYSTEM,
        ("<|im_end|>",),
        _mpt("<|im_start|>system\n", CHATML_SYSTEM, "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>"),
    ),
    "llama_3": ConvTemplate(
        "llama_3",
        LLAMA3_SYSTEM,
        ("<|eot_id|>",),
        _mpt(
            "<|start_header_id|>system<|end_header_id|>\n\n",
            LLAMA3_SYSTEM,
            "<|start_header_id|>user<|end_header_id|>\n\n",
            # Not a typo: MGM-8B was trained with the *system* header in front of answers (mgm.md §6).
            "<|start_header_id|>system<|end_header_id|>\n\n",
            "<|eot_id|>",
        ),
    ),
}


def get_template(name: str) -> ConvTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown conversation template {name!r}; known: {sorted(TEMPLATES)}") from None


def stop_strings(template: str) -> tuple[str, ...]:
    return get_template(template).stop


def _part_type(part: Mapping[str, Any]) -> str:
    kind = part.get("type")
    if kind is None:  # tolerate bare {"text": ...} / {"image_url": ...}
        kind = "text" if "text" in part else next((k for k in part if k in IMAGE_PART_TYPES), None)
    if kind not in TEXT_PART_TYPES and kind not in IMAGE_PART_TYPES:
        raise ValueError(f"unsupported content part type {kind!r}")
    return kind  # type: ignore[return-value]


def content_to_text(content: str | Sequence[Mapping[str, Any]] | None) -> tuple[str, int]:
    """OpenAI content → (text with one ``"<image>\\n"`` per image in front, number of images).

    A string is taken verbatim (it may already contain ``<image>``; the count then is 0 — the caller placed them).
    Text parts are joined with "\\n" (as vLLM joins them); images go first whatever their position among the parts.
    """
    if content is None:
        return "", 0
    if isinstance(content, str):
        return content, 0
    texts: list[str] = []
    images = 0
    for part in content:
        if _part_type(part) in IMAGE_PART_TYPES:
            images += 1
        else:
            texts.append(str(part.get("text", "")))
    return (IMAGE_PLACEHOLDER + "\n") * images + "\n".join(texts), images


def _turns(
    messages: Sequence[Message], template: ConvTemplate, generate_image: bool
) -> tuple[str | None, list[tuple[str, str]]]:
    if not messages:
        raise ValueError("messages must not be empty")
    system: str | None = None
    rest = list(messages)
    if rest[0].get("role") == "system":
        system, n = content_to_text(rest.pop(0).get("content"))
        if n:
            raise ValueError("images are not allowed in the system message")
    turns: list[tuple[str, str]] = []
    for i, message in enumerate(rest):
        role = message.get("role")
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(
                f"message {i + (system is not None)} has role {role!r}, expected {expected!r}: after an optional "
                "system message, roles must alternate user/assistant starting with user"
            )
        text, n_images = content_to_text(message.get("content"))
        if n_images and role != "user":
            raise ValueError("images are only allowed in user messages")
        if i == 0 and system and template.merge_system:
            head = n_images * len(IMAGE_PLACEHOLDER + "\n")
            text = text[:head] + system + "\n\n" + text[head:]
        turns.append((role, text))
    if not turns:
        raise ValueError("messages need at least one user message")
    if generate_image:
        last_user = max(i for i, (role, _) in enumerate(turns) if role == "user")
        turns[last_user] = ("user", turns[last_user][1] + GEN_SUFFIX)
    return (None if template.merge_system else system), turns


def render_prompt(
    messages: Sequence[Message],
    template: str,
    *,
    add_generation_prompt: bool = True,
    generate_image: bool = False,
) -> str:
    """Render chat messages into the official MGM prompt string.

    ``generate_image`` appends :data:`GEN_SUFFIX` to the last user text, as the official CLI does with ``--gen``
    (the worker's insertion point is buggy for most templates, mgm.md §7, so the CLI behaviour is the reference).
    """
    conv = get_template(template)
    system, turns = _turns(messages, conv, generate_image)
    return conv(system, turns, add_generation_prompt)


def with_gen_suffix(text: str) -> str:
    """User text asking for an image (official CLI: ``inp + ' <GEN>'``)."""
    return text if text.endswith(GEN_SUFFIX) else text + GEN_SUFFIX


def _vocab_has(tokenizer_or_vocab: Any, token: str) -> bool:
    if tokenizer_or_vocab is None:
        return False
    if hasattr(tokenizer_or_vocab, "get_vocab"):
        return token in tokenizer_or_vocab.get_vocab()
    return token in tokenizer_or_vocab


def choose_template(model_type: Any, tokenizer: Any = None, override: str | None = None) -> str:
    """Template for a checkpoint (``model_type`` string or config): the override if given, else by backbone and
    tokenizer vocab (a tokenizer or any container of token strings).

    Gemma → gemma, Mixtral → mistral_instruct; the Llama family covers Vicuna, LLaMA-3 and Yi, told apart by
    their special tokens (``<|eot_id|>`` → llama_3, ``<|im_end|>`` → chatml_direct, else vicuna_v1). The official
    CLI has no LLaMA-3 branch (it falls back to vicuna_v1), which is wrong for MGM-8B.
    """
    if override:
        return get_template(override).name
    if not isinstance(model_type, str):  # a config object
        model_type = getattr(model_type, "model_type", None)
    family = MODEL_TYPE_TO_FAMILY.get(model_type)  # type: ignore[arg-type]
    if family is None:
        raise ValueError(f"model_type {model_type!r} is not an MGM model type")
    if family == "gemma":
        return "gemma"
    if family == "mixtral":
        return "mistral_instruct"
    if _vocab_has(tokenizer, "<|eot_id|>"):
        return "llama_3"
    if _vocab_has(tokenizer, "<|im_end|>"):
        return "chatml_direct"
    return "vicuna_v1"


def stop_token_ids(tokenizer: Any, template: str) -> list[int]:
    """Ids of the template's stop strings that are single tokens of this tokenizer (others stay stop strings)."""
    vocab = tokenizer.get_vocab()
    return [vocab[s] for s in get_template(template).stop if s in vocab]


def _encode(tokenizer: Any, text: str) -> list[int]:
    out = tokenizer(text)
    ids = out["input_ids"] if isinstance(out, Mapping) or hasattr(out, "keys") else out.input_ids
    return list(ids)


def tokenize_official(
    tokenizer: Any, prompt: str, image_token_id: int = IMAGE_TOKEN_INDEX
) -> tuple[list[int], list[int]]:
    """Ids as the official ``tokenizer_image_token``: returns ``(ids, image_positions)``.

    The prompt is split on ``"<image>"`` and each chunk is tokenised on its own with the tokenizer's default
    special tokens. If the first chunk starts with BOS, BOS is kept once and the *first id of every later chunk is
    dropped* — blindly, as the official code does (it assumes that id is BOS). Chunks are joined by one
    ``image_token_id`` per image. Tokenising the whole string at once would give other ids at the boundaries
    (e.g. SentencePiece's dummy-prefix "▁" before the "\\n" that follows an image).
    """
    chunks = [_encode(tokenizer, chunk) for chunk in prompt.split(IMAGE_PLACEHOLDER)]
    bos = getattr(tokenizer, "bos_token_id", None)
    offset = 1 if chunks[0] and bos is not None and chunks[0][0] == bos else 0
    ids: list[int] = list(chunks[0])
    positions: list[int] = []
    for chunk in chunks[1:]:
        positions.append(len(ids))
        ids.append(image_token_id)
        ids.extend(chunk[offset:])
    return ids, positions


def count_images(prompt: str) -> int:
    return prompt.count(IMAGE_PLACEHOLDER)


def expand_image_tokens(
    ids: Iterable[int], tokens_per_image: int, placeholder_id: int, image_token_id: int = IMAGE_TOKEN_INDEX
) -> list[int]:
    """Replace each image slot by ``tokens_per_image`` copies of ``placeholder_id`` (the layout the LLM sees)."""
    out: list[int] = []
    for i in ids:
        out.extend([placeholder_id] * tokens_per_image if i == image_token_id else [i])
    return out


# --- Jinja chat templates ------------------------------------------------------------------------------------------
# The same five templates for tokenizers (``chat_template.jinja``) and for ``vllm serve --chat-template``. The
# content loop makes vLLM pass OpenAI-style parts, so images are rendered here as "<image>\n" in front of the text.
# (The ``generate_image`` suffix is a server option, not part of the template.)

_JINJA_COMMON = """
{%- macro images(c) -%}
{%- if c is not string and c is not none -%}
{%- for p in c -%}
{%- if p['type'] in ['image', 'image_url', 'input_image', 'image_pil', 'image_embeds'] -%}{{- '<image>\\n' -}}{%- endif -%}
{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- macro body(c) -%}
{%- if c is string -%}{{- c -}}
{%- elif c is not none -%}{{- c | selectattr('type', 'in', ['text', 'input_text']) | map(attribute='text') | join('\\n') -}}
{%- endif -%}
{%- endmacro -%}
{%- if messages[0]['role'] == 'system' -%}
{%- set sys = body(messages[0]['content']) -%}
{%- set msgs = messages[1:] -%}
{%- else -%}
{%- set sys = none -%}
{%- set msgs = messages -%}
{%- endif -%}
"""

_JINJA_CHECK = """
{%- if m['role'] != ('user' if loop.index0 % 2 == 0 else 'assistant') -%}
{{- raise_exception('after an optional system message, roles must alternate user/assistant starting with user') -}}
{%- endif -%}
{%- set text = images(m['content']) + body(m['content']) -%}
"""

_JINJA_BODIES = {
    "vicuna_v1": """
{{- (VICUNA_SYSTEM if sys is none else sys) + ' ' -}}
{%- for m in msgs -%}CHECK
{%- if m['role'] == 'user' -%}{{- 'USER: ' + text + ' ' -}}{%- else -%}{{- 'ASSISTANT: ' + text + '</s>' -}}{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt and msgs[-1]['role'] == 'user' -%}{{- 'ASSISTANT:' -}}{%- endif -%}
""",
    "gemma": """
{%- for m in msgs -%}CHECK
{%- if loop.first and sys -%}{%- set text = images(m['content']) + sys + '\\n\\n' + body(m['content']) -%}{%- endif -%}
{%- if m['role'] == 'user' -%}{{- '<start_of_turn>user\\n' + text + '<end_of_turn>\\n' -}}
{%- else -%}{{- '<start_of_turn>model\\n' + text + '<end_of_turn>\\n<eos>' -}}{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt and msgs[-1]['role'] == 'user' -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}
""",
    "mistral_instruct": """
{%- for m in msgs -%}CHECK
{%- if m['role'] == 'user' -%}
{%- if loop.first and sys -%}{%- set text = '<<SYS>>\\n' + sys + '\\n<</SYS>>\\n\\n' + text -%}{%- endif -%}
{{- ('' if loop.first else '<s>') + '[INST] ' + text + ' [/INST]' -}}
{%- else -%}{{- ' ' + text + ' </s>' -}}{%- endif -%}
{%- endfor -%}
""",
    "chatml_direct": """
{{- '<|im_start|>system\\n' + (CHATML_SYSTEM if sys is none else sys) + '<|im_end|>' -}}
{%- for m in msgs -%}CHECK
{%- if m['role'] == 'user' -%}{{- '<|im_start|>user\\n' + text + '<|im_end|>' -}}
{%- else -%}{{- '<|im_start|>assistant\\n' + text + '<|im_end|>' -}}{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt and msgs[-1]['role'] == 'user' -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}
""",
    # MGM-8B's assistant turns use the *system* header (see TEMPLATES["llama_3"]).
    "llama_3": """
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + (LLAMA3_SYSTEM if sys is none else sys) + '<|eot_id|>' -}}
{%- for m in msgs -%}CHECK
{%- if m['role'] == 'user' -%}{{- '<|start_header_id|>user<|end_header_id|>\\n\\n' + text + '<|eot_id|>' -}}
{%- else -%}{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + text + '<|eot_id|>' -}}{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt and msgs[-1]['role'] == 'user' -%}{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' -}}{%- endif -%}
""",
}


def chat_template(name: str) -> str:
    """Jinja source of a template, equivalent to :func:`render_prompt` for well-formed messages."""
    get_template(name)
    body = _JINJA_BODIES[name].replace("CHECK", _JINJA_CHECK.strip())
    for const, value in (("VICUNA_SYSTEM", VICUNA_SYSTEM), ("CHATML_SYSTEM", CHATML_SYSTEM), ("LLAMA3_SYSTEM", LLAMA3_SYSTEM)):
        assert '"' not in value
        body = body.replace(const, f'"{value}"')
    return (_JINJA_COMMON + body).strip() + "\n"


# --- rebuilding the official ids from a whole-prompt tokenisation --------------------------------------------------


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer's default encoding starts with BOS (Llama, Mistral, Gemma: yes)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and _encode(tokenizer, "a")[:1] == [bos]


def retokenize_official(
    tokenizer: Any, token_ids: Sequence[int], image_token_id: int = IMAGE_TOKEN_INDEX
) -> list[int]:
    """Official ids (:func:`tokenize_official`) of a prompt that someone else already tokenised in one pass.

    vLLM tokenises the whole prompt text before a model sees it, and ``"<image>"`` is no token of MGM tokenizers,
    so its ids differ from the official ones at every image boundary. The text is recovered by decoding (special
    tokens kept verbatim, no space clean-up) and tokenised again chunk by chunk. One leading BOS is taken as the
    tokenizer's own (present with ``add_special_tokens=True``, absent for vLLM's chat default) and dropped first:
    the official ids get exactly one from the first chunk either way. A BOS *written in the text* after it stays
    text, so a template that emits one gets the official double BOS, as in the official code.
    """
    ids = list(token_ids)
    if ids and adds_bos(tokenizer) and ids[0] == tokenizer.bos_token_id:
        ids = ids[1:]
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return tokenize_official(tokenizer, text, image_token_id)[0]
