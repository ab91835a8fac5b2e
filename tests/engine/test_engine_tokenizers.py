"""Official ids for multi-turn image prompts with tokenizers built like the real families'.

The official MGM code tokenises with transformers 4.36's *slow* SentencePiece ``LlamaTokenizer`` for Vicuna and Yi
(``use_fast=False``); we serve with transformers 5, whose ``AutoTokenizer`` always builds the tokenizers-backed class,
and rebuild the official ids from vLLM's one-pass ids (``retokenize_official``). The tiny test tokenizers elsewhere
are built with ``tokenizers`` and cannot show a slow/fast difference, so here the SentencePiece models are trained
offline with the ``sentencepiece`` package with the real families' settings, saved as checkpoints saved from slow
tokenizers are (``tokenizer.model`` + ``tokenizer_config.json``, no tokenizer.json), and compared against the slow
rule rebuilt in :mod:`support.slow_sentencepiece`. LLaMA-3 (MGM-8B) has no slow tokenizer: there the reference is the
official chunk-wise rule on the same fast tokenizer.

Each check: ``retokenize_official(fast, fast(prompt)["input_ids"]) == tokenize_official(reference, prompt)``, the
serving path (vLLM's whole-prompt ids, the gateway's ``add_special_tokens=True``; vLLM's chat default without BOS too)
against the official ids.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest

from engine.names import IMAGE_TOKEN_INDEX
from engine.prompt import render_prompt, tokenize_official
from engine.retokenize import retokenize_official
from engine.tiny import tokenizer_corpus
from support.slow_sentencepiece import SlowLlamaTokenizer, load_sentencepiece

IMAGE = {"type": "image"}


def _user(text: str, images: int = 0) -> dict:
    return {"role": "user", "content": [IMAGE] * images + [{"type": "text", "text": text}]}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


CONVERSATIONS = {
    # image in the first turn, an answer, a text follow-up: "…A cat.</s>USER: Color? ASSISTANT:"
    "follow-up": [_user("What is this?", 1), _assistant("A cat."), _user("Color?")],
    # two images in a later turn: three "<image>" in all, numbered "Image k:" over the whole prompt
    "two-images": [_user("What is this?", 1), _assistant("A cat."), _user("And these two?", 2)],
    # digits (split one by one) and text outside the tiny vocab (byte fallback), tabs and double spaces
    "digits-non-ascii": [
        {"role": "system", "content": "Be brief, 100 words."},
        _user("Count 12 345 apples; 2024 ünïcödé 日本語 🙂", 1),
        _assistant("There are 42 — café."),
        _user("Déjà vu?\t1536 px,  two  spaces"),
    ],
    "one-turn-two-images": [_user("Same?", 2)],
}

# Llama's SentencePiece settings (a BPE model with byte fallback, digits split, identity normalisation, spaces kept as
# they are, unk/bos/eos = 0/1/2, dummy prefix on); fixed options and one thread: the model is the same every run.
LLAMA_SPM = dict(
    model_type="bpe", vocab_size=700, character_coverage=1.0, byte_fallback=True, split_digits=True,
    normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
    allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
    hard_vocab_limit=False,
)
YI_CHAT_TOKENS = ["<|im_start|>", "<|im_end|>", "<|im_sep|>"]


def _train(lines: list[str], **options) -> bytes:
    import sentencepiece as spm

    spm.set_random_generator_seed(0)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, **{**LLAMA_SPM, **options})
    return model.getvalue()


@pytest.fixture(scope="module")
def vicuna_model() -> bytes:
    # Llama's vocab has no "\n" piece (newlines are <0x0A>): the corpus is fed line by line.
    return _train([line for text in tokenizer_corpus() for line in text.split("\n") if line])


@pytest.fixture(scope="module")
def yi_models() -> dict[bool, bytes]:
    """Yi-like: <|startoftext|>/<|endoftext|> as BOS/EOS and the chat tokens as pieces of tokenizer.model
    (user-defined symbols, which SentencePiece itself matches in raw text), "\\n" a piece; with and without a dummy
    prefix, as we cannot check offline which one Yi's model sets."""
    options = dict(bos_piece="<|startoftext|>", eos_piece="<|endoftext|>", user_defined_symbols=YI_CHAT_TOKENS)
    return {dummy: _train(tokenizer_corpus(), add_dummy_prefix=dummy, **options) for dummy in (True, False)}


def _checkpoint(root: Path, model: bytes, config: dict, tokenizer_json: Path | None = None) -> Path:
    root.mkdir(parents=True)
    (root / "tokenizer.model").write_bytes(model)
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    if tokenizer_json is not None:
        shutil.copy(tokenizer_json, root / "tokenizer.json")
    return root


def _fast(directory: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)  # what vLLM loads: always the tokenizers-backed class


def _assert_serving_gives_official(fast, reference, prompt: str, with_bos_only: bool = False) -> list[int]:  # type: ignore[no-untyped-def]
    official = tokenize_official(reference, prompt)[0]
    for add_special_tokens in (True,) if with_bos_only else (True, False):
        one_pass = fast(prompt, add_special_tokens=add_special_tokens)["input_ids"]
        assert retokenize_official(fast, one_pass) == official, (prompt, add_special_tokens)
    return official


def _pieces(reference: SlowLlamaTokenizer, ids: list[int]) -> list[str]:
    return ["<image>" if i == IMAGE_TOKEN_INDEX else reference.sp.id_to_piece(i) for i in ids]


VICUNA_CONFIG = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
                 "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None}


# ---- 1. Vicuna-like -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "non-legacy"])
def test_vicuna_reference_follows_the_slow_rule(tmp_path, vicuna_model, legacy):
    """The reference is the 4.36 rule, not the fast tokenizer again: after a special token the legacy rule
    re-adds SentencePiece's dummy prefix ("</s>", "▁USER"), the non-legacy one does not ("</s>", "USER"); at the
    image boundary both start the next chunk with "▁" (the official ids show it before "\\n")."""
    reference = SlowLlamaTokenizer.from_pretrained(_checkpoint(tmp_path / "v", vicuna_model,
                                                               {**VICUNA_CONFIG, "legacy": legacy}))
    prompt = render_prompt(CONVERSATIONS["follow-up"], "vicuna_v1")
    assert "A cat.</s>USER: Color? ASSISTANT:" in prompt
    pieces = _pieces(reference, tokenize_official(reference, prompt)[0])
    after_eos = pieces[pieces.index("</s>") + 1]
    assert after_eos.startswith("▁") is legacy, after_eos
    assert pieces[0] == "<s>" and pieces.count("<s>") == 1
    image = pieces.index("<image>")
    assert pieces[image + 1:image + 3] == ["▁", "<0x0A>"]
    # plain text: both are SentencePiece with its dummy prefix; after a special token only legacy adds the "▁"
    as_is = load_sentencepiece(tmp_path / "v" / "tokenizer.model")
    assert reference.tokenize("Color? 42") == as_is.encode("Color? 42", out_type=str) == ["▁Color", "?", "▁", "4", "2"]
    assert reference.tokenize("</s>a") == ["</s>", "▁a" if legacy else "a"]


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "non-legacy"])
def test_vicuna_multi_turn_image_prompts_give_official_ids(tmp_path, vicuna_model, legacy, conversation):
    """A checkpoint as MGM-7B/13B ship it (saved from the slow tokenizer: tokenizer.model and tokenizer_config.json,
    tokenizer_class LlamaTokenizer, legacy and add_bos_token written): the serving path gives the official ids."""
    directory = _checkpoint(tmp_path / "v", vicuna_model, {**VICUNA_CONFIG, "legacy": legacy})
    reference, fast = SlowLlamaTokenizer.from_pretrained(directory), _fast(directory)
    prompt = render_prompt(CONVERSATIONS[conversation], "vicuna_v1")
    official = _assert_serving_gives_official(fast, reference, prompt)
    assert official.count(IMAGE_TOKEN_INDEX) == prompt.count("<image>")
    if conversation == "digits-non-ascii":
        pieces = _pieces(reference, official)
        assert "<0xC3>" in pieces and "<0xF0>" in pieces  # ü…, 🙂: byte fallback
        assert any(pieces[i:i + 5] == ["▁", "2", "0", "2", "4"] for i in range(len(pieces)))  # digits split


def test_whitespace_at_a_segment_start_is_lost_in_one_pass_ids(tmp_path, vicuna_model):
    """Documented limit: transformers 5 does not prepend "▁" to a segment that starts with whitespace, so
    "</s>USER" and "</s> USER" (legacy), or a prompt with and without a leading space, have the same one-pass ids
    while their official ids differ. The serving path reads such ids as the template writes them (no space)."""
    directory = _checkpoint(tmp_path / "v", vicuna_model, {**VICUNA_CONFIG, "legacy": True})
    reference, fast = SlowLlamaTokenizer.from_pretrained(directory), _fast(directory)
    for plain, spaced in (("x</s>USER: hi", "x</s> USER: hi"), ("Hi <image>\nq", " Hi <image>\nq")):
        assert fast(plain)["input_ids"] == fast(spaced)["input_ids"]
        assert tokenize_official(reference, plain)[0] != tokenize_official(reference, spaced)[0]
        assert retokenize_official(fast, fast(spaced)["input_ids"]) == tokenize_official(reference, plain)[0]


# ---- 2. "legacy fast": a legacy tokenizer.json, and configs without the keys ------------------------------------


@pytest.fixture(scope="module")
def legacy_tokenizer_json(tmp_path_factory, vicuna_model) -> Path:
    """tokenizer.json as 4.36's LlamaConverter wrote it (legacy whatever the config said): normaliser
    Prepend("▁") + Replace(" ", "▁") — a "▁" in front of every segment, after special tokens too — no pre-tokenizer."""
    from tokenizers import normalizers

    directory = _checkpoint(tmp_path_factory.mktemp("legacy-json") / "v", vicuna_model,
                            {**VICUNA_CONFIG, "legacy": True})
    backend = _fast(directory).backend_tokenizer
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    backend.save(str(directory / "tokenizer.json"))
    return directory / "tokenizer.json"


CONFIG_VARIANTS = {
    "legacy-false": {**VICUNA_CONFIG, "legacy": False},
    # 4.36 defaults legacy and add_bos_token to True; transformers 5's LlamaTokenizer to False
    "no-legacy-key": dict(VICUNA_CONFIG),
    "no-legacy-no-bos-keys": {k: v for k, v in VICUNA_CONFIG.items() if k != "add_bos_token"},
}


@pytest.mark.parametrize("variant", sorted(CONFIG_VARIANTS))
def test_legacy_tokenizer_json_and_missing_config_keys(tmp_path, vicuna_model, legacy_tokenizer_json, variant):
    """transformers 5 does not load a LlamaTokenizer's tokenizer.json as it is: it keeps the vocab, merges and
    post-processor and rebuilds normaliser and pre-tokenizer from the config's ``legacy`` (default False), so a
    legacy tokenizer.json with ``legacy: false`` gives the non-legacy (official) ids. Where the config omits
    ``legacy`` or ``add_bos_token``, 4.36 took True and 5 takes False: the fast tokenizer's own chunk-wise ids are
    then *not* the official ones (no "▁" after "</s>", no BOS), and the serving path must — and does — give the
    official ids anyway."""
    from tokenizers import Tokenizer

    config = CONFIG_VARIANTS[variant]
    directory = _checkpoint(tmp_path / "v", vicuna_model, config, tokenizer_json=legacy_tokenizer_json)
    reference, fast = SlowLlamaTokenizer.from_pretrained(directory), _fast(directory)
    assert Tokenizer.from_file(str(legacy_tokenizer_json)).encode("</s>USER").tokens[-1] == "▁USER"  # the file as is
    assert fast.backend_tokenizer.normalizer is None  # ... is not what transformers 5 runs
    assert fast.tokenize("</s>USER") == ["</s>", "USER"]
    official_rule_is_fast = variant == "legacy-false"
    for name in ("follow-up", "two-images"):
        prompt = render_prompt(CONVERSATIONS[name], "vicuna_v1")
        official = _assert_serving_gives_official(fast, reference, prompt)
        assert official[0] == reference.bos_token_id
        assert (tokenize_official(fast, prompt)[0] == official) is official_rule_is_fast


def test_a_tokenizers_class_loads_tokenizer_json_as_it_is(tmp_path, vicuna_model, legacy_tokenizer_json):
    """With ``tokenizer_class: PreTrainedTokenizerFast`` transformers 5 (like 4.36, which had no slow class for it,
    so ``use_fast=False`` changed nothing) runs tokenizer.json as it is: the legacy normaliser stays, whatever the
    config's ``legacy``. No slow rule there: the official ids are the fast tokenizer's own chunk-wise ids. Its
    ``decode`` writes the "▁" it put after "</s>" as a space, and "</s> USER" re-encodes as "</s>", "▁▁USER": the
    serving path must read the ids back without that space."""
    config = {**VICUNA_CONFIG, "legacy": False, "tokenizer_class": "PreTrainedTokenizerFast"}
    fast = _fast(_checkpoint(tmp_path / "v", vicuna_model, config, tokenizer_json=legacy_tokenizer_json))
    assert fast.tokenize("</s>USER") == ["</s>", "▁USER"]
    for name in ("follow-up", "two-images"):
        prompt = render_prompt(CONVERSATIONS[name], "vicuna_v1")
        _assert_serving_gives_official(fast, fast, prompt)


# ---- 3. Yi-like (chatml_direct) -----------------------------------------------------------------------------------

YI_LISTINGS = {
    # the chat tokens only in tokenizer.model: the slow rule leaves them to SentencePiece
    "model-only": {},
    # also in added_tokens_decoder (as Yi's configs list <|im_end|>): the slow rule splits on them first
    "added": {"added": True},
    # and in additional_special_tokens: a leading "▁" in front of them is dropped (non-legacy)
    "special": {"added": True, "special": True},
}


def _yi_config(model: bytes, legacy: bool, listing: str) -> dict:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=model)
    listed = ["<unk>", "<|startoftext|>", "<|endoftext|>"] + (YI_CHAT_TOKENS if YI_LISTINGS[listing] else [])
    config = {
        "tokenizer_class": "LlamaTokenizer", "legacy": legacy, "add_bos_token": False, "add_eos_token": False,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<unk>", "pad_token": "<unk>",
        "added_tokens_decoder": {str(sp.piece_to_id(t)): {"content": t, "lstrip": False, "normalized": False,
                                                          "rstrip": False, "single_word": False, "special": True}
                                 for t in listed},
    }
    if YI_LISTINGS[listing].get("special"):
        config["additional_special_tokens"] = YI_CHAT_TOKENS
    return config


@pytest.mark.parametrize("listing", sorted(YI_LISTINGS))
@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "non-legacy"])
@pytest.mark.parametrize("dummy_prefix", [True, False], ids=["dummy-prefix", "no-dummy-prefix"])
def test_yi_multi_turn_image_prompts_give_official_ids(tmp_path, yi_models, dummy_prefix, legacy, listing):
    """Yi-34B-like: no BOS added (``add_bos_token: false``, as Yi ships), chat tokens in tokenizer.model. Every
    combination gives the official ids on the serving path. The fast tokenizer's own rule agrees only for legacy
    with a dummy prefix and the chat tokens listed as added tokens, and for non-legacy with them listed as special.
    Otherwise the slow rule is needed, because transformers 5 prepends "▁" whatever the model's dummy-prefix
    setting, splits on chat tokens that the slow rule leaves to SentencePiece, and drops the "▁" in front of the
    prompt's leading <|im_start|> where the slow rule keeps it (not special, or not split)."""
    model = yi_models[dummy_prefix]
    directory = _checkpoint(tmp_path / "yi", model, _yi_config(model, legacy, listing))
    reference, fast = SlowLlamaTokenizer.from_pretrained(directory), _fast(directory)
    if legacy:
        fast_rule_is_official = dummy_prefix and listing != "model-only"
    else:
        fast_rule_is_official = listing == "special"
    agreed = []
    for name in sorted(CONVERSATIONS):
        prompt = render_prompt(CONVERSATIONS[name], "chatml_direct")
        assert prompt.startswith("<|im_start|>system\n")
        official = _assert_serving_gives_official(fast, reference, prompt)
        assert reference.bos_token_id not in official  # Yi: no BOS, nothing dropped after an image
        assert official.count(IMAGE_TOKEN_INDEX) == prompt.count("<image>")
        agreed.append(tokenize_official(fast, prompt)[0] == official)
    assert all(agreed) if fast_rule_is_official else not any(agreed)
    # the reference's own reading of the model's dummy-prefix setting (legacy: as the model says)
    if legacy:
        assert reference.tokenize("Answer")[0].startswith("▁") is dummy_prefix


# ---- 4. LLaMA-3-like (tiktoken-style byte-level BPE) -------------------------------------------------------------

# LLaMA-3's pre-tokenizer split: contractions, letters with one leading non-letter, 1–3 digits, punctuation runs,
# newlines, other whitespace.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@pytest.fixture(scope="module")
def llama3_tokenizer(tmp_path_factory):  # type: ignore[no-untyped-def]
    """Byte-level BPE with LLaMA-3's split regex, trained on the corpus; special tokens after the vocab (as
    LLaMA-3's 128000+), BOS added by a TemplateProcessing post-processor as in LLaMA-3's tokenizer.json; saved as a
    PreTrainedTokenizerFast and loaded back (official MGM-8B loads it fast too: it has no slow class)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=900, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(tokenizer_corpus(), trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIALS])
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                      special_tokens=[(bos, tok.token_to_id(bos))]),
    ])
    directory = tmp_path_factory.mktemp("llama3")
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="<|eot_id|>").save_pretrained(directory)
    assert not (directory / "tokenizer.model").exists()
    return _fast(directory)


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("llama3_bos", ["double", "single"])
def test_llama3_multi_turn_image_prompts_give_official_ids(llama3_tokenizer, llama3_bos, conversation):
    """MGM-8B: ``"double"`` puts a literal <|begin_of_text|> in the text, so the official ids start with two BOS
    (the tokenizer's and the text's), ``"single"`` with one; every later chunk loses its own BOS, nothing else."""
    tok = llama3_tokenizer
    prompt = render_prompt(CONVERSATIONS[conversation], "llama_3", llama3_bos=llama3_bos)
    # "double" needs the tokenizer's own BOS in vLLM's ids (the gateway's add_special_tokens=True) to keep the
    # literal one apart; without it a leading BOS counts as the tokenizer's (test_engine_prompt documents it).
    official = _assert_serving_gives_official(tok, tok, prompt, with_bos_only=llama3_bos == "double")
    bos = tok.bos_token_id
    leading = 2 if llama3_bos == "double" else 1
    assert official[:leading] == [bos] * leading and official[leading] != bos
    assert official.count(bos) == leading
    for position, token in enumerate(official):
        if token == IMAGE_TOKEN_INDEX and official[position + 1] != IMAGE_TOKEN_INDEX:
            assert tok.decode(official[position + 1:position + 2]) == "\n"  # "<image>\n": the "\n" is kept
