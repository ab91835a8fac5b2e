"""MGM conversation templates, OpenAI-style message rendering and the official chunk-wise tokenisation.

The five templates reproduce the strings of the official ``conversation.py`` (docs/mgm.md §6), including its
quirks: the LLaMA-3 template uses the ``system`` header for the assistant role, ChatML has no newline after
``<|im_end|>``, Gemma closes an answer with ``<end_of_turn>\\n<eos>``. Each is described once, as a
:class:`ConvTemplate`; both the Python renderer (:func:`render_prompt`) and the Jinja chat template
(:func:`chat_template`) are generated from that description. Images become ``"<image>\\n"`` at the start of the
user turn that carries them (training put the image first); a prompt with two or more images numbers them
(``"Image 1:<image>"``, :func:`number_images`), and answers in the history are stripped, both as the official CLI
does (docs/mgm.md §6). The LLM tokenizers have no ``<image>`` token;
:func:`tokenize_official` splits on the literal string like ``tokenizer_image_token`` does
(:mod:`engine.retokenize` rebuilds those ids from vLLM's one-pass ids).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from engine.names import GEN_SUFFIX, IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX, LLAMA3_BOS, MODEL_TYPE_TO_FAMILY

IMAGE_PART_TYPES = frozenset({"image", "image_url", "input_image", "image_pil", "image_embeds"})
TEXT_PART_TYPES = frozenset({"text", "input_text"})

Message = Mapping[str, Any]


@dataclass(frozen=True)
class Affix:
    """What a template writes around a piece of text."""

    prefix: str
    suffix: str

    def wrap(self, text: str) -> str:
        return self.prefix + text + self.suffix


@dataclass(frozen=True)
class ConvTemplate:
    """One conversation template, described once; :meth:`render` and :func:`chat_template` (Jinja) both read it.

    A conversation is rendered as ``[system slot] turn turn … [generation prompt]``, each turn its role's
    ``prefix + text + suffix``, every user turn after the first preceded by ``later_user_prefix``.
    """

    name: str
    user: Affix
    assistant: Affix
    stop: tuple[str, ...]
    #: Wraps the system text (the caller's, or ``default_system`` when there is no system message).
    system: Affix
    #: ``"slot"``: the wrapped system text opens every prompt. Templates without a system slot merge a caller's
    #: non-empty system text into the first user turn, in front of its text: ``"before_images"`` in front of its
    #: ``"<image>\n"`` lines as well, ``"after_images"`` behind them (as Gemma's own template merges it).
    system_placement: Literal["slot", "before_images", "after_images"] = "slot"
    default_system: str = ""
    later_user_prefix: str = ""
    #: The open assistant header appended for generation; None = ``assistant.prefix``.
    generation_prompt: str | None = None

    @property
    def merge_system(self) -> bool:
        """No system slot: a system message goes into the first user turn."""
        return self.system_placement != "slot"

    @property
    def open_assistant(self) -> str:
        return self.assistant.prefix if self.generation_prompt is None else self.generation_prompt

    def render(self, system: str | None, turns: list[tuple[str, str]], add_generation_prompt: bool = True) -> str:
        """``turns``: alternating (role, text), role in {"user", "assistant"}, first "user", a merged system text
        already inside the first turn; ``system``: the slot's text (None = ``default_system``)."""
        out = self.system.wrap(self.default_system if system is None else system) if not self.merge_system else ""
        for i, (role, text) in enumerate(turns):
            if role == "user":
                out += (self.later_user_prefix if i else "") + self.user.wrap(text)
            else:
                out += self.assistant.wrap(text)
        if add_generation_prompt and turns[-1][0] == "user":
            out += self.open_assistant
        return out


VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAMA3_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the user "
    "provides, and assist the user with a variety of tasks using natural language."
)
CHATML_SYSTEM = "Answer the questions."

_LLAMA3_SYSTEM_HEADER = "<|start_header_id|>system<|end_header_id|>\n\n"

TEMPLATES: dict[str, ConvTemplate] = {
    template.name: template
    for template in (
        # Official "TWO" style: system + " ", "USER: q ", "ASSISTANT: a</s>", open slot "ASSISTANT:" (no space).
        ConvTemplate(
            "vicuna_v1",
            user=Affix("USER: ", " "),
            assistant=Affix("ASSISTANT: ", "</s>"),
            stop=("</s>",),
            system=Affix("", " "),
            default_system=VICUNA_SYSTEM,
            generation_prompt="ASSISTANT:",
        ),
        # Empty system slot officially, and Gemma has no system role: merged into the first user turn. An answer
        # closes with "<end_of_turn>\n<eos>".
        ConvTemplate(
            "gemma",
            user=Affix("<start_of_turn>user\n", "<end_of_turn>\n"),
            assistant=Affix("<start_of_turn>model\n", "<end_of_turn>\n<eos>"),
            stop=("<end_of_turn>", "<eos>"),
            system=Affix("", "\n\n"),
            system_placement="after_images",
        ),
        # LLAMA_2 style with an empty default system: "[INST] q [/INST]", answers " a </s>", later turns
        # "<s>[INST] …"; a caller's system text gets the <<SYS>> wrapper inside the first [INST]. The open assistant
        # slot is the end of "[/INST]" itself.
        ConvTemplate(
            "mistral_instruct",
            user=Affix("[INST] ", " [/INST]"),
            assistant=Affix(" ", " </s>"),
            stop=("</s>",),
            system=Affix("<<SYS>>\n", "\n<</SYS>>\n\n"),
            system_placement="before_images",
            later_user_prefix="<s>",
            generation_prompt="",
        ),
        # MPT style; no newline after <|im_end|>.
        ConvTemplate(
            "chatml_direct",
            user=Affix("<|im_start|>user\n", "<|im_end|>"),
            assistant=Affix("<|im_start|>assistant\n", "<|im_end|>"),
            stop=("<|im_end|>",),
            system=Affix("<|im_start|>system\n", "<|im_end|>"),
            default_system=CHATML_SYSTEM,
        ),
        # MPT style. Not a typo: MGM-8B was trained with the *system* header in front of answers (docs/mgm.md §6).
        ConvTemplate(
            "llama_3",
            user=Affix("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
            assistant=Affix(_LLAMA3_SYSTEM_HEADER, "<|eot_id|>"),
            stop=("<|eot_id|>",),
            system=Affix(_LLAMA3_SYSTEM_HEADER, "<|eot_id|>"),
            default_system=LLAMA3_SYSTEM,
        ),
    )
}


_LLAMA3_BOS_TEXT = "<|begin_of_text|>"


def get_template(name: str, llama3_bos: str = LLAMA3_BOS[0]) -> ConvTemplate:
    try:
        template = TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown conversation template {name!r}; known: {sorted(TEMPLATES)}") from None
    if llama3_bos not in LLAMA3_BOS:
        raise ValueError(f"unknown llama3_bos {llama3_bos!r}; choose from {', '.join(LLAMA3_BOS)}")
    if name == "llama_3" and llama3_bos == "double":
        return replace(template, system=Affix(_LLAMA3_BOS_TEXT + template.system.prefix, template.system.suffix))
    return template


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
        if role == "assistant":  # the official CLI keeps its answers stripped in the conversation
            text = text.strip()
        if i == 0 and system and template.merge_system:
            head = n_images * len(IMAGE_PLACEHOLDER + "\n") if template.system_placement == "after_images" else 0
            text = text[:head] + template.system.wrap(system) + text[head:]
        turns.append((role, text))
    if not turns:
        raise ValueError("messages need at least one user message")
    if generate_image:  # every user turn of a generating conversation, as the official CLI's --gen
        turns = [(role, text + GEN_SUFFIX if role == "user" and not text.endswith(GEN_SUFFIX) else text)
                 for role, text in turns]
    return (None if template.merge_system else system), turns


def number_images(prompt: str) -> str:
    """The official CLI's rule for two or more images in a prompt: every ``<image>`` becomes ``Image k:<image>``
    (k from 1, in prompt order); one image or none leaves the prompt as it is."""
    pieces = prompt.split(IMAGE_PLACEHOLDER)
    if len(pieces) < 3:
        return prompt
    return "".join(piece + (f"Image {k}:{IMAGE_PLACEHOLDER}" if k < len(pieces) else "")
                   for k, piece in enumerate(pieces, start=1))


def render_prompt(
    messages: Sequence[Message],
    template: str,
    *,
    add_generation_prompt: bool = True,
    generate_image: bool = False,
    llama3_bos: str = LLAMA3_BOS[0],
) -> str:
    """Render chat messages into the official MGM prompt string.

    ``llama3_bos`` picks the ``llama_3`` variant (:data:`engine.names.LLAMA3_BOS`; other templates ignore it).
    ``generate_image`` appends :data:`GEN_SUFFIX` to every user text (unless it already ends with it), as the
    official CLI does with ``--gen`` (the worker's insertion point is buggy for most templates, docs/mgm.md §7, so
    the CLI behaviour is the reference).
    """
    conv = get_template(template, llama3_bos)
    system, turns = _turns(messages, conv, generate_image)
    return number_images(conv.render(system, turns, add_generation_prompt))


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


def encode_ids(tokenizer: Any, text: str) -> list[int]:
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
    chunks = [encode_ids(tokenizer, chunk) for chunk in prompt.split(IMAGE_PLACEHOLDER)]
    bos = getattr(tokenizer, "bos_token_id", None)
    offset = 1 if chunks[0] and bos is not None and chunks[0][0] == bos else 0
    ids: list[int] = list(chunks[0])
    positions: list[int] = []
    for chunk in chunks[1:]:
        positions.append(len(ids))
        ids.append(image_token_id)
        ids.extend(chunk[offset:])
    return ids, positions


# --- Jinja chat templates ------------------------------------------------------------------------------------------
# The same templates for tokenizers (``chat_template.jinja``) and for ``vllm serve --chat-template``, generated from
# the ConvTemplate descriptions above. The content loop makes vLLM pass OpenAI-style parts, so images are rendered
# here as "<image>\n" in front of the text. (The ``generate_image`` suffix is a server option, not part of the
# template.)


def _lit(text: str) -> str:
    """A Jinja string literal (Jinja decodes the JSON escapes as Python's unicode-escape does)."""
    return json.dumps(text)


def _list(values: Iterable[str]) -> str:
    return "[" + ", ".join(_lit(v) for v in sorted(values)) + "]"


_JINJA_COMMON = f"""
{{%- macro images(c) -%}}
{{%- if c is not string and c is not none -%}}
{{%- for p in c -%}}
{{%- if p['type'] in {_list(IMAGE_PART_TYPES)} -%}}{{{{- {_lit(IMAGE_PLACEHOLDER + chr(10))} -}}}}{{%- endif -%}}
{{%- endfor -%}}
{{%- endif -%}}
{{%- endmacro -%}}
{{%- macro body(c) -%}}
{{%- if c is string -%}}{{{{- c -}}}}
{{%- elif c is not none -%}}{{{{- c | selectattr('type', 'in', {_list(TEXT_PART_TYPES)}) | map(attribute='text') | join('\\n') -}}}}
{{%- endif -%}}
{{%- endmacro -%}}
{{%- if messages[0]['role'] == 'system' -%}}
{{%- set sys = body(messages[0]['content']) -%}}
{{%- set msgs = messages[1:] -%}}
{{%- else -%}}
{{%- set sys = none -%}}
{{%- set msgs = messages -%}}
{{%- endif -%}}
{{%- set ns = namespace(out='') -%}}
""".strip()

_JINJA_CHECK = """
{%- if m['role'] != ('user' if loop.index0 % 2 == 0 else 'assistant') -%}
{{- raise_exception('after an optional system message, roles must alternate user/assistant starting with user') -}}
{%- endif -%}
{%- set text = images(m['content']) + body(m['content']) -%}
""".strip()


def _wrap(affix: Affix, expr: str) -> str:
    """Jinja expression of ``affix.wrap(expr)``."""
    parts = (_lit(affix.prefix) if affix.prefix else "", expr, _lit(affix.suffix) if affix.suffix else "")
    return " + ".join(part for part in parts if part)


def _emit(expr: str) -> str:
    """Append to the prompt being built (``ns.out``): the images are numbered once it is complete."""
    return f"{{%- set ns.out = ns.out + {expr} -%}}"


#: :func:`number_images` in Jinja, on the finished prompt.
_JINJA_NUMBER_IMAGES = f"""
{{%- set pieces = ns.out.split({_lit(IMAGE_PLACEHOLDER)}) -%}}
{{%- if pieces | length > 2 -%}}
{{%- for piece in pieces -%}}{{{{- piece -}}}}{{%- if not loop.last -%}}{{{{- 'Image ' ~ loop.index ~ {_lit(':' + IMAGE_PLACEHOLDER)} -}}}}{{%- endif -%}}{{%- endfor -%}}
{{%- else -%}}{{{{- ns.out -}}}}
{{%- endif -%}}
""".strip()


def _jinja_body(t: ConvTemplate) -> list[str]:
    """The lines after the common header: the Jinja twin of :meth:`ConvTemplate.render` and ``_turns``' merge."""
    lines = []
    if not t.merge_system:
        lines.append(_emit(f"({_wrap(t.system, f'({_lit(t.default_system)} if sys is none else sys)')})"))
    lines += ["{%- for m in msgs -%}", _JINJA_CHECK]
    if t.merge_system:
        merged = _wrap(t.system, "sys")
        if t.system_placement == "after_images":
            merged = f"images(m['content']) + {merged} + body(m['content'])"
        else:
            merged = f"{merged} + text"
        lines.append(f"{{%- if loop.first and sys -%}}{{%- set text = {merged} -%}}{{%- endif -%}}")
    user = _wrap(t.user, "text")
    if t.later_user_prefix:
        user = f"('' if loop.first else {_lit(t.later_user_prefix)}) + {user}"
    answer = _wrap(t.assistant, "(text | trim)")  # answers in the history are stripped
    lines += [
        f"{{%- if m['role'] == 'user' -%}}{_emit(f'({user})')}",
        f"{{%- else -%}}{_emit(f'({answer})')}{{%- endif -%}}",
        "{%- endfor -%}",
    ]
    if t.open_assistant:
        gen = _lit(t.open_assistant)
        lines.append(f"{{%- if add_generation_prompt and msgs[-1]['role'] == 'user' -%}}{_emit(gen)}{{%- endif -%}}")
    return lines + [_JINJA_NUMBER_IMAGES]


def chat_template(name: str, llama3_bos: str = LLAMA3_BOS[0]) -> str:
    """Jinja source of a template, equivalent to :func:`render_prompt` for well-formed messages."""
    return "\n".join([_JINJA_COMMON, *_jinja_body(get_template(name, llama3_bos))]) + "\n"
