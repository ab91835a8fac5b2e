"""engine.prompt: the official template strings (docs/mgm.md §6), message rendering, Jinja twins, template choice,
stop strings and the chunk-wise ``tokenizer_image_token`` ids."""

from __future__ import annotations

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.names import GEN_SUFFIX, IMAGE_TOKEN_INDEX, TEMPLATE_NAMES
from engine.prompt import (
    TEMPLATES,
    chat_template,
    choose_template,
    content_to_text,
    render_prompt,
    stop_strings,
    stop_token_ids,
    tokenize_official,
)
from engine.retokenize import adds_bos, retokenize_official
from support.image_tokens import expand_image_tokens

Q = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
Q2 = Q + [{"role": "assistant", "content": "A cat."}, {"role": "user", "content": "Color?"}]

VICUNA_SYS = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
              "detailed, and polite answers to the user's questions.")
LLAMA3_SYS = ("<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful language and vision assistant. You are "
              "able to understand the visual content that the user provides, and assist the user with a variety of "
              "tasks using natural language.<|eot_id|>")

# Single-turn generation prompts, docs/mgm.md §6 table.
FIRST_TURN = {
    "vicuna_v1": VICUNA_SYS + " USER: <image>\nWhat is this? ASSISTANT:",
    "gemma": "<start_of_turn>user\n<image>\nWhat is this?<end_of_turn>\n<start_of_turn>model\n",
    "mistral_instruct": "[INST] <image>\nWhat is this? [/INST]",
    "chatml_direct": "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is this?"
                     "<|im_end|><|im_start|>assistant\n",
    "llama_3": LLAMA3_SYS + "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is this?<|eot_id|>"
               "<|start_header_id|>system<|end_header_id|>\n\n",
}

# Second-turn prompts produced by the official get_prompt() (verified ground truth, docs/mgm.md §6). The vicuna and
# llama_3 strings are quoted there with a leading "..."; the prefix is the system part checked above.
SECOND_TURN = {
    "vicuna_v1": VICUNA_SYS + " USER: <image>\nWhat is this? ASSISTANT: A cat.</s>USER: Color? ASSISTANT:",
    "gemma": "<start_of_turn>user\n<image>\nWhat is this?<end_of_turn>\n<start_of_turn>model\nA cat.<end_of_turn>\n"
             "<eos><start_of_turn>user\nColor?<end_of_turn>\n<start_of_turn>model\n",
    "mistral_instruct": "[INST] <image>\nWhat is this? [/INST] A cat. </s><s>[INST] Color? [/INST]",
    "chatml_direct": "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is this?"
                     "<|im_end|><|im_start|>assistant\nA cat.<|im_end|><|im_start|>user\nColor?<|im_end|>"
                     "<|im_start|>assistant\n",
    "llama_3": LLAMA3_SYS + "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is this?<|eot_id|>"
               "<|start_header_id|>system<|end_header_id|>\n\nA cat.<|eot_id|><|start_header_id|>user<|end_header_id|>"
               "\n\nColor?<|eot_id|><|start_header_id|>system<|end_header_id|>\n\n",
}
SECOND_TURN_TAILS = {  # verbatim from docs/mgm.md §6, after its "..."
    "vicuna_v1": "USER: <image>\nWhat is this? ASSISTANT: A cat.</s>USER: Color? ASSISTANT:",
    "llama_3": "<|eot_id|><|start_header_id|>system<|end_header_id|>\n\nA cat.<|eot_id|><|start_header_id|>user"
               "<|end_header_id|>\n\nColor?<|eot_id|><|start_header_id|>system<|end_header_id|>\n\n",
}


# The strings above are the official code at HEAD, whose llama_3 begins with one BOS (the tokenizer's): our
# "single" variant; the default, "double", is the code at MGM-8B's release (test_llama3_bos_variants).


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_first_turn_strings(name):
    assert render_prompt(Q, name, llama3_bos="single") == FIRST_TURN[name]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_second_turn_strings(name):
    got = render_prompt(Q2, name, llama3_bos="single")
    assert got == SECOND_TURN[name]
    if name in SECOND_TURN_TAILS:
        assert got.endswith(SECOND_TURN_TAILS[name])


def test_string_content_and_image_first():
    # String content is verbatim; image parts go first whatever their position, one "<image>\n" each.
    assert render_prompt([{"role": "user", "content": "<image>\nWhat is this?"}], "vicuna_v1") == FIRST_TURN["vicuna_v1"]
    parts = [{"type": "text", "text": "Compare"}, {"type": "image_url", "image_url": {"url": "data:,"}},
             {"type": "text", "text": "them."}, {"type": "image"}]
    assert content_to_text(parts) == ("<image>\n<image>\nCompare\nthem.", 2)
    # Images in a later turn stay in that turn.
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]}]
    assert render_prompt(conv, "chatml_direct").endswith("<|im_start|>user\n<image>\nAnd this?<|im_end|><|im_start|>assistant\n")


def test_system_messages():
    sys_q = [{"role": "system", "content": "Be brief."}] + Q
    assert render_prompt(sys_q, "vicuna_v1") == "Be brief. USER: <image>\nWhat is this? ASSISTANT:"
    assert render_prompt(sys_q, "chatml_direct").startswith("<|im_start|>system\nBe brief.<|im_end|><|im_start|>user\n")
    assert render_prompt(sys_q, "llama_3").startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user")
    assert render_prompt(sys_q, "mistral_instruct") == "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n<image>\nWhat is this? [/INST]"
    # Gemma has no system slot: merged into the first user turn, after the image.
    assert render_prompt(sys_q, "gemma") == (
        "<start_of_turn>user\n<image>\nBe brief.\n\nWhat is this?<end_of_turn>\n<start_of_turn>model\n")


TWO_IMAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]}]


def test_several_images_are_numbered_as_the_official_cli():
    """mgm/serve/cli.py: a prompt with two or more <image> gets "Image k:" in front of each, over the whole prompt."""
    assert render_prompt(TWO_IMAGES, "vicuna_v1") == (
        VICUNA_SYS + " USER: Image 1:<image>\nImage 2:<image>\nSame? ASSISTANT:")
    assert render_prompt(Q, "vicuna_v1") == FIRST_TURN["vicuna_v1"]  # one image: unchanged
    later = Q + [{"role": "assistant", "content": "A cat."}, {"role": "user", "content": Q[0]["content"]}]
    assert render_prompt(later, "chatml_direct").count("Image ") == 2
    assert "user\nImage 1:<image>\nWhat is this?" in render_prompt(later, "chatml_direct")
    assert "user\nImage 2:<image>\nWhat is this?" in render_prompt(later, "chatml_direct")


def test_answers_in_the_history_are_stripped():
    """vLLM's Vicuna/Mixtral answers start with a space; the official conversation keeps answers stripped."""
    spaced = Q + [{"role": "assistant", "content": " A cat.\n"}, {"role": "user", "content": "Color?"}]
    for name in TEMPLATES:
        assert render_prompt(spaced, name, llama3_bos="single") == SECOND_TURN[name], name
        assert _jinja_render(chat_template(name, "single"), spaced, True) == SECOND_TURN[name], name


def test_llama3_bos_variants():
    """--llama3-bos: "double" (default) is the official code when MGM-8B was uploaded, a literal <|begin_of_text|>
    in front of the system header; "single" is the code since. Other templates are the same either way."""
    for messages in (Q, Q2, [{"role": "system", "content": "Be brief."}] + Q):
        single = render_prompt(messages, "llama_3", llama3_bos="single")
        assert render_prompt(messages, "llama_3") == "<|begin_of_text|>" + single
        for variant in ("double", "single"):
            assert _jinja_render(chat_template("llama_3", variant), messages, True) == render_prompt(
                messages, "llama_3", llama3_bos=variant)
    assert chat_template("vicuna_v1", "single") == chat_template("vicuna_v1", "double")
    with pytest.raises(ValueError, match="llama3_bos"):
        render_prompt(Q, "llama_3", llama3_bos="triple")


def test_generation_marks_every_user_turn():
    """The official --gen appends " <GEN>" to every user input, so the history carries it; once is enough."""
    prompt = render_prompt(Q2, "vicuna_v1", generate_image=True)
    assert "What is this? <GEN> ASSISTANT: A cat.</s>USER: Color? <GEN> ASSISTANT:" in prompt
    marked = [Q2[0], Q2[1], {"role": "user", "content": "Color?" + GEN_SUFFIX}]
    assert render_prompt(marked, "vicuna_v1", generate_image=True) == prompt


def test_generation_suffix_and_closed_conversations():
    assert render_prompt(Q, "vicuna_v1", generate_image=True).endswith("USER: <image>\nWhat is this? <GEN> ASSISTANT:")
    assert render_prompt(Q, "mistral_instruct", generate_image=True) == "[INST] <image>\nWhat is this? <GEN> [/INST]"
    assert GEN_SUFFIX == " <GEN>"  # the official CLI: inp + ' <GEN>'
    closed = Q + [{"role": "assistant", "content": "A cat."}]
    assert render_prompt(closed, "gemma").endswith("model\nA cat.<end_of_turn>\n<eos>")
    assert render_prompt(Q, "vicuna_v1", add_generation_prompt=False).endswith("What is this? ")


@pytest.mark.parametrize(
    "messages",
    [
        [],
        [{"role": "assistant", "content": "x"}],
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "system", "content": "s"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image"}]}],
        [{"role": "user", "content": [{"type": "audio"}]}],
    ],
)
def test_invalid_messages(messages):
    with pytest.raises(ValueError):
        render_prompt(messages, "vicuna_v1")


def test_template_names_are_the_described_templates():
    # engine.names lists them for the CLI without importing this module; the two must not drift.
    assert tuple(TEMPLATES) == TEMPLATE_NAMES


def test_unknown_template():
    with pytest.raises(ValueError, match="unknown conversation template"):
        render_prompt(Q, "llava_v1")


def _jinja_render(source: str, messages, add_generation_prompt: bool) -> str:
    # The environment transformers uses for chat templates.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message):
        raise ValueError(message)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(source).render(messages=messages, add_generation_prompt=add_generation_prompt)


CONVERSATIONS = [
    Q,
    Q2,
    [{"role": "system", "content": "Be brief."}] + Q2,
    [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "x"}},
                                   {"type": "image"}, {"type": "text", "text": "b"}]}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
    [{"role": "system", "content": [{"type": "text", "text": "Sys"}]}, {"role": "user", "content": "plain"}],
    Q + [{"role": "assistant", "content": " A cat. "}, {"role": "user", "content": Q[0]["content"]}],
]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_jinja_twin_matches_python(name):
    source = chat_template(name)
    for messages in CONVERSATIONS:
        for gen in (True, False):
            assert _jinja_render(source, messages, gen) == render_prompt(messages, name, add_generation_prompt=gen)
    with pytest.raises(ValueError):
        _jinja_render(source, [{"role": "assistant", "content": "x"}], True)


def test_choose_template():
    assert choose_template("mgm_gemma") == choose_template("mini_gemini_gemma") == "gemma"
    assert choose_template("mgm_mixtral") == choose_template("mini_gemini_mixtral") == "mistral_instruct"
    assert choose_template("mgm", {"<s>": 1}) == choose_template("mini_gemini") == "vicuna_v1"
    assert choose_template("mgm", {"<|begin_of_text|>": 0, "<|eot_id|>": 1}) == "llama_3"
    assert choose_template("mini_gemini", {"<|im_start|>": 0, "<|im_end|>": 7}) == "chatml_direct"
    assert choose_template("mgm_gemma", override="chatml_direct") == "chatml_direct"
    from engine.config import MiniGeminiMixtralConfig

    assert choose_template(MiniGeminiMixtralConfig()) == "mistral_instruct"
    with pytest.raises(ValueError):
        choose_template("llava")
    with pytest.raises(ValueError):
        choose_template("mgm", override="nope")


def test_stop_strings():
    assert stop_strings("vicuna_v1") == ("</s>",)
    assert stop_strings("gemma") == ("<end_of_turn>", "<eos>")
    assert stop_strings("mistral_instruct") == ("</s>",)
    assert stop_strings("chatml_direct") == ("<|im_end|>",)
    assert stop_strings("llama_3") == ("<|eot_id|>",)


# ---- chunk-wise tokenisation ------------------------------------------------------------------------------------


class CharTokenizer:
    """Stub: one id per character, optional BOS — makes the official rule checkable by hand."""

    def __init__(self, bos: int | None):
        self.bos_token_id = bos

    def __call__(self, text: str):
        return {"input_ids": ([self.bos_token_id] if self.bos_token_id is not None else []) + [ord(c) for c in text]}


def test_tokenize_official_rule_by_hand():
    ids, pos = tokenize_official(CharTokenizer(bos=1), "ab<image>\ncd")
    assert ids == [1, ord("a"), ord("b"), IMAGE_TOKEN_INDEX, ord("\n"), ord("c"), ord("d")]
    assert pos == [3]
    # leading and adjacent images: empty chunks contribute only their (dropped) BOS
    ids, pos = tokenize_official(CharTokenizer(bos=1), "<image>\n<image>\nq")
    assert ids == [1, IMAGE_TOKEN_INDEX, 10, IMAGE_TOKEN_INDEX, 10, ord("q")] and pos == [1, 3]
    ids, pos = tokenize_official(CharTokenizer(bos=1), "<image><image>")
    assert ids == [1, IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX] and pos == [1, 2]
    # no BOS (e.g. Yi): nothing is dropped
    ids, pos = tokenize_official(CharTokenizer(bos=None), "a<image>b")
    assert ids == [ord("a"), IMAGE_TOKEN_INDEX, ord("b")]
    assert tokenize_official(CharTokenizer(bos=1), "no image") == ([1] + [ord(c) for c in "no image"], [])
    assert tokenize_official(CharTokenizer(bos=1), "a<image>b", image_token_id=99)[0] == [1, 97, 99, 98]


def test_tokenize_official_llama_like(tiny_tokenizer):
    tok = tiny_tokenizer("llama")
    prompt = FIRST_TURN["vicuna_v1"]
    head, tail = prompt.split("<image>")
    ids, pos = tokenize_official(tok, prompt)
    assert ids == tok(head).input_ids + [IMAGE_TOKEN_INDEX] + tok(tail).input_ids[1:]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1 and pos == [len(tok(head).input_ids)]
    # SentencePiece-style dummy prefix: the chunk after the image starts "▁", "<0x0A>" — a whole-prompt encoding
    # (what vLLM does by default) has no "▁" there. This is the boundary difference chunking must reproduce.
    after = tok.convert_ids_to_tokens(ids[pos[0] + 1:pos[0] + 3])
    assert after == ["▁", "<0x0A>"]
    whole = tok(prompt.replace("<image>", "")).input_ids
    assert [i for i in ids if i != IMAGE_TOKEN_INDEX] != whole


def test_tokenize_official_gemma_like(tiny_tokenizer):
    tok = tiny_tokenizer("gemma")
    prompt = SECOND_TURN["gemma"]
    ids, pos = tokenize_official(tok, prompt)
    assert ids[0] == tok.bos_token_id == 2 and ids.count(2) == 1 and len(pos) == 1
    assert tok.decode([i for i in ids if i >= 0]) == "<bos>" + prompt.replace("<image>", "")
    assert stop_token_ids(tok, "gemma") == [tok.convert_tokens_to_ids("<end_of_turn>"), tok.eos_token_id]


def test_expand_image_tokens():
    assert expand_image_tokens([1, IMAGE_TOKEN_INDEX, 5], 3, placeholder_id=0) == [1, 0, 0, 0, 5]


# ---- retokenize_official: official ids rebuilt from a one-pass tokenisation (what vLLM hands the processor) ----

RETOKENIZE_PROMPTS = [
    *FIRST_TURN.values(),
    *SECOND_TURN.values(),
    "<image>\n<image>\nCompare the two pictures.",  # leading and adjacent images
    "Before <image> between<image>after, tabs\tand  double  spaces\n\n",
    "Ünïcödé 日本語 🙂 <image>\n</s> literal specials <s> and <unk> in text",
    "no image at all",
]


@pytest.mark.parametrize("backbone", ["llama", "gemma"])
@pytest.mark.parametrize("prompt", RETOKENIZE_PROMPTS, ids=range(len(RETOKENIZE_PROMPTS)))
def test_retokenize_official_from_one_pass_ids(tiny_tokenizer, backbone, prompt):
    tok = tiny_tokenizer(backbone)
    expected = tokenize_official(tok, prompt)[0]
    with_bos = tok(prompt).input_ids  # vLLM completions / LLM.generate: add_special_tokens=True
    without_bos = tok(prompt, add_special_tokens=False).input_ids  # vLLM's OpenAI chat default
    assert retokenize_official(tok, with_bos) == expected
    assert retokenize_official(tok, without_bos) == expected
    assert retokenize_official(tok, with_bos, image_token_id=-7) == [(-7 if i == IMAGE_TOKEN_INDEX else i) for i in expected]


def test_retokenize_official_bos_written_in_text(tiny_tokenizer):
    tok = tiny_tokenizer("llama")
    prompt = "<s>USER: <image>\nhi ASSISTANT:"
    # With the tokenizer's BOS in front, a "<s>" written in the text stays: the official double BOS.
    assert retokenize_official(tok, tok(prompt).input_ids) == tokenize_official(tok, prompt)[0]
    assert tokenize_official(tok, prompt)[0][:2] == [1, 1]
    # Without it the leading BOS id is indistinguishable from the tokenizer's own and counts as that (documented).
    without = tok(prompt, add_special_tokens=False).input_ids
    assert retokenize_official(tok, without) == tokenize_official(tok, prompt.removeprefix("<s>"))[0]


def test_retokenize_official_differs_from_one_pass(tiny_tokenizer):
    # The whole point: the one-pass ids of the text around an image are not the official ones.
    tok = tiny_tokenizer("llama")
    prompt = FIRST_TURN["vicuna_v1"]
    official = [i for i in retokenize_official(tok, tok(prompt).input_ids) if i != IMAGE_TOKEN_INDEX]
    assert official != tok(prompt.replace("<image>", "")).input_ids


def test_adds_bos(tiny_tokenizer):
    assert adds_bos(tiny_tokenizer("llama")) and adds_bos(tiny_tokenizer("gemma"))
    assert not adds_bos(CharTokenizer(bos=None))
