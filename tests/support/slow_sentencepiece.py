"""The official MGM tokenizer for Vicuna and Yi — transformers 4.36's slow ``LlamaTokenizer`` (``use_fast=False``) —
rebuilt on a ``sentencepiece.SentencePieceProcessor``, as the reference the serving path must match.

transformers 5 has no slow Llama tokenizer any more (``AutoTokenizer`` always builds the tokenizers-backed class, and
its optional SentencePiece backend lacks the non-legacy ``tokenize`` wrapper), so the rule is written here from the
4.36 code:

* ``tokenize(text)``: legacy or empty text → the base tokenize; otherwise the base tokenize of ``"▁" + text`` (with
  "▁" in the text turned into spaces), and a lone leading "▁" in front of a *special* token is dropped.
* base tokenize: split on the added tokens (leftmost-longest); added tokens stay whole, every other segment goes
  through ``_tokenize``.
* ``_tokenize(seg)``: ``sp.encode(seg)`` if legacy or ``seg`` does not start with "▁"/" "; else encode
  ``unk_token + seg`` and drop the pieces of ``unk_token`` (so SentencePiece keeps the leading "▁").
* non-legacy loads the SentencePiece model with ``add_dummy_prefix = False``; legacy uses the model as it is.
* ``add_bos_token`` (default True) puts BOS in front, ``add_eos_token`` (default False) EOS behind.

Only what ``engine.prompt.tokenize_official`` needs: ``__call__`` → ``{"input_ids": …}``, ``tokenize``,
``bos_token_id``, ``unk_token_id``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

SPIECE_UNDERLINE = "▁"


def _content(token: Any) -> str | None:
    """A token as tokenizer_config.json writes it: a string or an ``AddedToken`` dict."""
    if token is None or isinstance(token, str):
        return token
    return token["content"]


def load_sentencepiece(model_file: str | Path, *, add_dummy_prefix: bool | None = None):  # type: ignore[no-untyped-def]
    """A ``SentencePieceProcessor`` for ``model_file``; ``add_dummy_prefix`` given = that normaliser setting forced
    by editing the model proto (what 4.36 does for ``legacy=False``)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    if add_dummy_prefix is not None:
        proto.normalizer_spec.add_dummy_prefix = add_dummy_prefix
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


class SlowLlamaTokenizer:
    """transformers 4.36 ``LlamaTokenizer`` (slow) on a SentencePiece model; see the module docstring."""

    def __init__(
        self,
        model_file: str | Path,
        *,
        legacy: bool = True,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        bos_token: str = "<s>",
        eos_token: str = "</s>",
        unk_token: str = "<unk>",
        pad_token: str | None = None,
        added_tokens: Mapping[str, int] | Iterable[str] = (),
        additional_special_tokens: Iterable[str] = (),
    ):
        self.legacy = legacy
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.bos_token, self.eos_token, self.unk_token = bos_token, eos_token, unk_token
        self.sp = load_sentencepiece(model_file, add_dummy_prefix=None if legacy else False)
        # 4.36 registers the special tokens (and every added_tokens_decoder entry) as added tokens at init.
        special = [t for t in (bos_token, eos_token, unk_token, pad_token) if t] + list(additional_special_tokens)
        self.all_special_tokens = frozenset(special)
        # added token -> id: the config's id (added_tokens_decoder), else the SentencePiece piece's
        ids = dict(added_tokens) if isinstance(added_tokens, Mapping) else {t: self.sp.piece_to_id(t) for t in added_tokens}
        self.added_tokens = {**{t: self.sp.piece_to_id(t) for t in special}, **ids}
        self.unk_token_length = len(self.sp.encode(unk_token, out_type=str))
        self.bos_token_id = self.added_tokens[bos_token]
        self.eos_token_id = self.added_tokens[eos_token]
        self.unk_token_id = self.added_tokens[unk_token]

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> SlowLlamaTokenizer:
        """Read ``tokenizer.model`` and ``tokenizer_config.json`` (4.36 defaults: legacy and BOS on, EOS off)."""
        directory = Path(directory)
        config = json.loads((directory / "tokenizer_config.json").read_text())
        special_map = directory / "special_tokens_map.json"
        extra = json.loads(special_map.read_text()).get("additional_special_tokens", []) if special_map.exists() else []
        extra = [_content(t) for t in [*extra, *config.get("additional_special_tokens", [])]]
        return cls(
            directory / "tokenizer.model",
            legacy=config.get("legacy", True),
            add_bos_token=config.get("add_bos_token", True),
            add_eos_token=config.get("add_eos_token", False),
            bos_token=_content(config.get("bos_token", "<s>")),
            eos_token=_content(config.get("eos_token", "</s>")),
            unk_token=_content(config.get("unk_token", "<unk>")),
            pad_token=_content(config.get("pad_token")),
            added_tokens={_content(t): int(i) for i, t in config.get("added_tokens_decoder", {}).items()},
            additional_special_tokens=extra,
        )

    # --- tokenisation ---------------------------------------------------------------------------------------------

    def _split_added(self, text: str) -> list[str]:
        """Leftmost-longest split on the added tokens (what 4.36's trie does); added tokens are their own items."""
        out: list[str] = []
        start = i = 0
        while i < len(text):
            match = max((t for t in self.added_tokens if text.startswith(t, i)), key=len, default=None)
            if match is None:
                i += 1
                continue
            if start < i:
                out.append(text[start:i])
            out.append(match)
            i = start = i + len(match)
        if start < len(text):
            out.append(text[start:])
        return out

    def _tokenize(self, segment: str) -> list[str]:
        if self.legacy or not segment.startswith((SPIECE_UNDERLINE, " ")):
            return self.sp.encode(segment, out_type=str)
        pieces = self.sp.encode(self.unk_token + segment, out_type=str)
        return pieces[self.unk_token_length:] if len(pieces) >= self.unk_token_length else pieces

    def _base_tokenize(self, text: str) -> list[str]:
        pieces: list[str] = []
        for segment in self._split_added(text):
            pieces.extend([segment] if segment in self.added_tokens else self._tokenize(segment))
        return pieces

    def tokenize(self, text: str) -> list[str]:
        if self.legacy or not text:
            return self._base_tokenize(text)
        pieces = self._base_tokenize(SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " "))
        if len(pieces) > 1 and pieces[0] == SPIECE_UNDERLINE and pieces[1] in self.all_special_tokens:
            pieces = pieces[1:]
        return pieces

    def convert_tokens_to_ids(self, pieces: Iterable[str]) -> list[int]:
        return [self.added_tokens[p] if p in self.added_tokens else self.sp.piece_to_id(p) for p in pieces]

    def __call__(self, text: str) -> dict[str, list[int]]:
        ids = self.convert_tokens_to_ids(self.tokenize(text))
        ids = ([self.bos_token_id] if self.add_bos_token else []) + ids
        return {"input_ids": ids + ([self.eos_token_id] if self.add_eos_token else [])}
