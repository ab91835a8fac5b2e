"""Official MGM ids rebuilt from vLLM's one-pass tokenisation (what the processor hands the model).

vLLM tokenises the whole prompt text before a model sees it; the official code tokenises it chunk by chunk around
``<image>`` (:func:`engine.prompt.tokenize_official`), and for Vicuna, Yi and Mixtral with transformers 4.36's *slow*
SentencePiece ``LlamaTokenizer`` (``use_fast=False``), which transformers 5 no longer has and whose ids its
tokenizers-backed class does not always reproduce. :func:`retokenize_official` recovers the prompt text from vLLM's
ids and encodes it again the official way: with :class:`SlowLlamaRule` on the checkpoint's ``tokenizer.model``
where the official code used the slow tokenizer, else with the tokenizer itself. Proven on tiny tokenizers built
with the real families' settings (tests/engine/test_engine_tokenizers.py).
"""

from __future__ import annotations

import json
import logging
import os
import re
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.names import IMAGE_TOKEN_INDEX
from engine.prompt import encode_ids, tokenize_official

logger = logging.getLogger(__name__)



def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer's default encoding starts with BOS (Llama, Mistral, Gemma: yes)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and encode_ids(tokenizer, "a")[:1] == [bos]


_UNDERLINE = "▁"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _token_content(token: Any) -> str | None:
    """A token as tokenizer_config.json / special_tokens_map.json write it: a string or an AddedToken dict."""
    if token is None or isinstance(token, str):
        return token
    return str(token.get("content")) if isinstance(token, Mapping) else str(token)


class SlowLlamaRule:
    """transformers 4.36's slow ``LlamaTokenizer`` — what the official MGM code loads (``use_fast=False``) for the
    Vicuna, Yi and Mixtral checkpoints — as an encoder on the checkpoint's own ``tokenizer.model``.

    transformers 5 has only the tokenizers-backed class, rebuilt from the ``legacy`` flag whatever tokenizer.json says,
    and its ids differ from the slow ones where the SentencePiece model has no dummy prefix (Yi-style; 5 prepends
    "▁" anyway), where a template token is a SentencePiece user-defined piece that the config does not list (the
    slow rule leaves it to SentencePiece), where a non-legacy text starts with an added token that is not special
    (the slow rule keeps the lone "▁" in front of it), where the config omits ``legacy`` or ``add_bos_token`` (True
    in 4.36, False in 5), and where a text segment (the prompt start; with ``legacy``, also the text after an added
    token) begins with whitespace (the slow rule adds its "▁" in front; 5 does not — and its ids then no longer tell
    whether the whitespace was there, see :func:`_sentencepiece_text`).

    The 4.36 rule: split the text on the added tokens (longest first; an added token with ``lstrip``/``rstrip``
    eats the whitespace beside it); encode every other segment with SentencePiece. Non-legacy: the model loses its
    dummy prefix, the text gets one "▁" in front (a "▁" in the text counts as a space), a segment that starts with
    whitespace is encoded behind ``unk_token`` whose pieces are then cut off (so its leading "▁" survives), and a
    lone "▁" in front of a special token is dropped. BOS/EOS per ``add_bos_token``/``add_eos_token``.
    """

    def __init__(
        self,
        sp: Any,
        *,
        legacy: bool,
        add_bos_token: bool,
        add_eos_token: bool,
        bos_token_id: int | None,
        eos_token_id: int | None,
        unk_token: str,
        added: Mapping[str, tuple[int, bool, bool]],
        special: Iterable[str],
    ):
        self._sp = sp
        self.legacy = legacy
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id
        self.unk_token = unk_token
        self.unk_token_id = added[unk_token][0] if unk_token in added else sp.unk_id()
        self._added = dict(added)  # content -> (id, lstrip, rstrip)
        self._special = frozenset(special)
        self._unk_pieces = len(sp.encode(unk_token))
        underline = sp.piece_to_id(_UNDERLINE)
        self._underline = underline if sp.id_to_piece(underline) == _UNDERLINE else None
        alternatives = "|".join(re.escape(t) for t in sorted(self._added, key=len, reverse=True))
        self._splitter = re.compile(f"({alternatives})") if self._added else None

    @classmethod
    def from_checkpoint(cls, directory: str | Path, tokenizer: Any = None) -> SlowLlamaRule | None:
        """The rule for a tokenizer directory, or None where the official code did not load the slow
        ``LlamaTokenizer`` (another ``tokenizer_class``, no ``tokenizer.model``) or SentencePiece is missing.
        ``tokenizer`` (the fast one) supplies the id of a special token that neither the config nor the model has."""
        directory = Path(directory)
        model_file, config_file = directory / "tokenizer.model", directory / "tokenizer_config.json"
        if not (model_file.is_file() and config_file.is_file()):
            return None
        config = json.loads(config_file.read_text(encoding="utf-8"))
        if config.get("tokenizer_class") != "LlamaTokenizer":  # "…Fast" was loaded fast even with use_fast=False
            return None
        # 4.36: special_tokens_map.json overrides the config's special tokens; legacy defaults to True.
        specials = {key: config.get(key, default) for key, default in
                    (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"), ("pad_token", None))}
        extra = list(config.get("additional_special_tokens") or [])
        map_file = directory / "special_tokens_map.json"
        if map_file.is_file():
            for key, value in json.loads(map_file.read_text(encoding="utf-8")).items():
                if key == "additional_special_tokens":
                    extra += list(value or [])
                elif key in specials:
                    specials[key] = value
        legacy = config.get("legacy")
        legacy = True if legacy is None else bool(legacy)
        try:
            sp = _load_sentencepiece(model_file, no_dummy_prefix=not legacy)
        except ImportError as exc:
            logger.warning("official slow tokenisation unavailable (%s); using the fast tokenizer's ids", exc)
            return None
        added: dict[str, tuple[int, bool, bool]] = {}
        for key, token in (config.get("added_tokens_decoder") or {}).items():
            flags = token if isinstance(token, Mapping) else {}
            added[str(_token_content(token))] = (int(key), bool(flags.get("lstrip")), bool(flags.get("rstrip")))
        added_file = directory / "added_tokens.json"
        if added_file.is_file():
            for content, index in json.loads(added_file.read_text(encoding="utf-8")).items():
                added.setdefault(content, (int(index), False, False))
        names = {key: _token_content(value) for key, value in specials.items()}
        special = [t for t in [*names.values(), *(_token_content(t) for t in extra)] if t]
        for content in special:  # special tokens are added tokens too (4.36 adds them at init)
            if content not in added:
                index = sp.piece_to_id(content)
                if sp.id_to_piece(index) != content and tokenizer is not None:
                    index = tokenizer.convert_tokens_to_ids(content)
                added[content] = (int(index), False, False)

        def ident(key: str) -> int | None:
            name = names[key]
            return added[name][0] if name else None

        return cls(
            sp,
            legacy=legacy,
            add_bos_token=bool(config.get("add_bos_token", True)),
            add_eos_token=bool(config.get("add_eos_token", False)),
            bos_token_id=ident("bos_token"),
            eos_token_id=ident("eos_token"),
            unk_token=names["unk_token"] or "<unk>",
            added=added,
            special=special,
        )

    def _encode_segment(self, segment: str) -> list[int]:
        if self.legacy or not segment.startswith((_UNDERLINE, " ")):
            return list(self._sp.encode(segment))
        ids = self._sp.encode(self.unk_token + segment)
        return list(ids[self._unk_pieces:] if len(ids) >= self._unk_pieces else ids)

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without BOS/EOS."""
        if not self.legacy and text:
            text = _UNDERLINE + text.replace(_UNDERLINE, " ")
        parts = self._splitter.split(text) if self._splitter else [text]  # text, token, text, token, …, text
        for i in range(1, len(parts), 2):
            _, lstrip, rstrip = self._added[parts[i]]
            if rstrip:
                parts[i + 1] = parts[i + 1].lstrip()
            if lstrip:
                parts[i - 1] = parts[i - 1].rstrip()
        head = self._encode_segment(parts[0]) if parts[0] else []
        if (not self.legacy and len(parts) > 1 and parts[1] in self._special and self._underline is not None
                and head == [self._underline]):
            head = []  # the "▁" put in front of a text that starts with a special token
        ids = head
        for i in range(1, len(parts), 2):
            ids.append(self._added[parts[i]][0])
            if parts[i + 1]:
                ids.extend(self._encode_segment(parts[i + 1]))
        return ids

    def __call__(self, text: str) -> dict[str, list[int]]:
        ids = self.encode(text)
        if self.add_bos_token and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        if self.add_eos_token and self.eos_token_id is not None:
            ids.append(self.eos_token_id)
        return {"input_ids": ids}


def _load_sentencepiece(model_file: Path, *, no_dummy_prefix: bool) -> Any:
    import sentencepiece

    data = model_file.read_bytes()
    if no_dummy_prefix:  # as 4.36 loads the model for legacy=False
        from sentencepiece import sentencepiece_model_pb2  # needs protobuf

        proto = sentencepiece_model_pb2.ModelProto.FromString(data)
        proto.normalizer_spec.add_dummy_prefix = False
        data = proto.SerializeToString()
    return sentencepiece.SentencePieceProcessor(model_proto=data)


def _checkpoint_dir(tokenizer: Any) -> Path | None:
    vocab_file = getattr(tokenizer, "vocab_file", None)
    if isinstance(vocab_file, str) and vocab_file.endswith(".model") and os.path.isfile(vocab_file):
        return Path(vocab_file).parent
    name = getattr(tokenizer, "name_or_path", None)
    return Path(name) if isinstance(name, str) and name and os.path.isdir(name) else None


@dataclass(frozen=True)
class _Reading:
    """How to rebuild official ids for one fast tokenizer: the slow rule where the official code had one, whether
    the tokenizer writes spaces as SentencePiece's "▁", and where it put a "▁" of its own (at the text start; after
    an added token) — the last two to read its ids back as text."""

    rule: SlowLlamaRule | None
    sentencepiece: bool
    prepend_first: bool
    prepend_after_added: bool
    added_ids: frozenset[int]


_READINGS: weakref.WeakKeyDictionary[Any, _Reading | None] = weakref.WeakKeyDictionary()


def _reading(tokenizer: Any) -> _Reading | None:
    try:
        return _READINGS[tokenizer]
    except KeyError:
        pass
    except TypeError:  # not weak-referenceable: no cache
        return _build_reading(tokenizer)
    reading = _build_reading(tokenizer)
    _READINGS[tokenizer] = reading
    return reading


def _build_reading(tokenizer: Any) -> _Reading | None:
    if not all(hasattr(tokenizer, name) for name in ("tokenize", "convert_ids_to_tokens", "decode")):
        return None
    directory = _checkpoint_dir(tokenizer)
    try:
        rule = SlowLlamaRule.from_checkpoint(directory, tokenizer) if directory is not None else None
    except (OSError, ValueError, RuntimeError) as exc:  # unreadable config or SentencePiece model
        logger.warning("official slow tokenisation unavailable (%s); using the fast tokenizer's ids", exc)
        rule = None
    added = dict(getattr(tokenizer, "added_tokens_encoder", {}) or {})
    probe = next(iter(added), None)
    sentencepiece = any(_UNDERLINE in piece for piece in tokenizer.tokenize("a b"))
    first = bool(tokenizer.tokenize("a")[:1]) and tokenizer.tokenize("a")[0].startswith(_UNDERLINE)
    after = bool(probe) and tokenizer.tokenize(probe + "a")[-1].startswith(_UNDERLINE)
    return _Reading(rule, sentencepiece, first, after, frozenset(added.values()))


def _sentencepiece_text(tokenizer: Any, reading: _Reading, ids: Sequence[int]) -> str:
    """The text a fast SentencePiece tokenizer encoded as ``ids``: "▁" → space, ``<0xNN>`` → that byte, added tokens
    verbatim, and the "▁" the tokenizer itself put in front of a segment removed (its own ``decode`` keeps that "▁"
    after added tokens, as a space). The tokenizer prepends "▁" only to a segment that does not start with
    whitespace already, so a segment read as "▁▁x…" or "▁" had none prepended; "▁x…" is either "x…" with the
    prepended "▁" or " x…" without — the encodings are the same — and is read as the former."""
    out: list[str] = []
    segment: list[str] = []
    prepended = reading.prepend_first

    def flush() -> None:
        if prepended and segment and segment[0].startswith(_UNDERLINE):
            rest = segment[0][1:] or "".join(segment[1:2])
            if rest and not rest.startswith(_UNDERLINE):
                segment[0] = segment[0][1:]
        raw = bytearray()
        for piece in segment:
            byte = _BYTE_PIECE.fullmatch(piece)
            raw += bytes([int(byte.group(1), 16)]) if byte else piece.replace(_UNDERLINE, " ").encode("utf-8")
        out.append(raw.decode("utf-8", errors="replace"))
        segment.clear()

    for index, piece in zip(ids, tokenizer.convert_ids_to_tokens(list(ids))):
        if index in reading.added_ids:
            flush()
            out.append(piece)
            prepended = reading.prepend_after_added
        else:
            segment.append(piece)
    flush()
    return "".join(out)


def _text_of(tokenizer: Any, reading: _Reading | None, ids: Sequence[int]) -> str:
    """The prompt text behind one-pass ids: a text that the tokenizer encodes to exactly these ids. For a
    SentencePiece-style tokenizer :func:`_sentencepiece_text` (``decode`` writes the "▁" the tokenizer put after an
    added token as a space — a legacy tokenizer would then encode "</s> USER" as "</s>", "▁▁USER"), else ``decode``
    with special tokens verbatim and no space clean-up."""
    decoded = tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if reading is None or not reading.sentencepiece:
        return decoded
    text = _sentencepiece_text(tokenizer, reading, ids)
    if text != decoded and _encode_plain(tokenizer, text) != list(ids) and _encode_plain(tokenizer, decoded) == list(ids):
        return decoded
    return text


def _encode_plain(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def retokenize_official(
    tokenizer: Any, token_ids: Sequence[int], image_token_id: int = IMAGE_TOKEN_INDEX
) -> list[int]:
    """Official ids (:func:`tokenize_official`) of a prompt that someone else already tokenised in one pass.

    vLLM tokenises the whole prompt text before a model sees it, and ``"<image>"`` is no token of MGM tokenizers,
    so its ids differ from the official ones at every image boundary. The text is recovered from the ids
    (:func:`_text_of`) and tokenised again chunk by chunk. One leading BOS is taken as the tokenizer's own (present
    with ``add_special_tokens=True``, absent for vLLM's chat default) and dropped first: the official ids get exactly
    one from the first chunk either way. A BOS *written in the text* after it stays text, so a template that emits
    one gets the official double BOS, as in the official code.

    Where the official code loaded transformers 4.36's slow ``LlamaTokenizer`` (Vicuna, Yi, Mixtral: a
    ``tokenizer.model`` and ``tokenizer_class: LlamaTokenizer``), the chunks are encoded with that rule
    (:class:`SlowLlamaRule`), not with the fast tokenizer, whose ids differ from it in places. Other tokenizers
    (LLaMA-3, Gemma, a tokenizer.json run as it is) were loaded fast officially too and re-encode with themselves.
    """
    ids = list(token_ids)
    if ids and adds_bos(tokenizer) and ids[0] == tokenizer.bos_token_id:
        ids = ids[1:]
    reading = _reading(tokenizer)
    text = _text_of(tokenizer, reading, ids)
    encoder = reading.rule if reading is not None and reading.rule is not None else tokenizer
    return tokenize_official(encoder, text, image_token_id)[0]
