"""The vLLM multimodal processor of engine.model, without an engine: official prompt ids around every image,
placeholder expansion, tensors, the per-prompt image limit, bad prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from engine.processor import MGMImageProcessor
from engine.names import IMAGE_TOKEN_INDEX
from engine.prompt import render_prompt, tokenize_official
from support.image_tokens import expand_image_tokens

TEMPLATE = {"llama": "vicuna_v1", "gemma": "gemma", "mixtral": "mistral_instruct"}
TOKENS = {False: 16, True: 80}  # tiny geometry: G = 4 → 16 per view; HD: 5 views


@pytest.fixture(scope="session")
def mm_processor(tiny_checkpoint):
    import engine
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY

    engine.register()
    cache = {}

    def get(backbone: str, hd: bool = False):
        if (backbone, hd) not in cache:
            config = ModelConfig(model=str(tiny_checkpoint(backbone, hd)), dtype="float32", max_model_len=2048,
                                 limit_mm_per_prompt={"image": 3})
            cache[(backbone, hd)] = MULTIMODAL_REGISTRY.create_processor(config)
        return cache[(backbone, hd)]

    return get


def noise(seed: int, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


CONVERSATIONS = {
    "one": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
    "two-multiturn": [
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}]},
        {"role": "assistant", "content": "A cat. And a dog."},
        {"role": "user", "content": "Colours?\n  Be brief."},
    ],
    "system": [
        {"role": "system", "content": "Answer tersely."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Ünïcödé 🙂 <b>?</b>"}]},
    ],
}


@pytest.mark.parametrize(("backbone", "hd"), [("llama", False), ("llama", True), ("gemma", False), ("mixtral", False)])
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("bos", [True, False], ids=["add_special_tokens", "no_special_tokens"])
def test_prompt_ids_are_the_official_chunkwise_ids(mm_processor, tiny_tokenizer, backbone, hd, conversation, bos):
    proc = mm_processor(backbone, hd)
    tok = tiny_tokenizer(backbone)
    prompt = render_prompt(CONVERSATIONS[conversation], TEMPLATE[backbone])
    n_images = prompt.count("<image>")
    images = [noise(i) for i in range(n_images)]
    one_pass = tok(prompt, add_special_tokens=bos).input_ids  # what vLLM's renderer hands the processor
    out = proc(one_pass, proc.info.parse_mm_data({"image": images}))

    official, positions = tokenize_official(tok, prompt)
    placeholder = proc.info.placeholder_token_id
    assert out["prompt_token_ids"] == expand_image_tokens(official, TOKENS[hd], placeholder)
    assert 0 <= placeholder < len(tok)
    # one placeholder range per image, where the official code puts the image features
    ranges = out["mm_placeholders"]["image"]
    assert [(r.offset, r.length) for r in ranges] == [(p + k * (TOKENS[hd] - 1), TOKENS[hd]) for k, p in enumerate(positions)]
    kwargs = out["mm_kwargs"]["image"]
    assert len(kwargs) == n_images


def test_one_pass_ids_differ_so_the_rebuild_matters(mm_processor, tiny_tokenizer):
    # Guard against a vacuous test above: without the rebuild the ids around the image would be different.
    tok = tiny_tokenizer("llama")
    prompt = render_prompt(CONVERSATIONS["one"], "vicuna_v1")
    head = tok(prompt.split("<image>")[0]).input_ids
    one_pass = tok(prompt).input_ids
    official = tokenize_official(tok, prompt)[0]
    assert one_pass[: len(head) - 1] == official[: len(head) - 1]
    assert one_pass[len(head) - 1:len(head) + 3] != official[len(head) - 1:len(head) + 3]


def test_tensors_are_the_official_preprocessing(mm_processor, tiny_checkpoint):
    from transformers import AutoConfig

    proc = mm_processor("llama", True)
    image = noise(7, (90, 40))
    out = proc("USER: <image>\nx", proc.info.parse_mm_data({"image": [image]}))
    item = out["mm_kwargs"]["image"][0]
    expected = MGMImageProcessor.from_config(AutoConfig.from_pretrained(tiny_checkpoint("llama", True))).preprocess(image)
    assert torch.equal(item["pixel_values"].data, expected.pixel_values)  # (5, 3, 56, 56) [crops…, global]
    assert torch.equal(item["pixel_values_aux"].data, expected.pixel_values_aux)  # (3, 256, 256)


@pytest.mark.parametrize("hd", [False, True])
def test_odd_images(mm_processor, hd):
    proc = mm_processor("llama", hd)
    rgba = Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 20, 4), dtype=np.uint8), "RGBA")
    images = [rgba, Image.new("P", (17, 9), 3), Image.new("L", (1, 1), 9)]
    out = proc("<image><image><image>", proc.info.parse_mm_data({"image": images}))
    assert len(out["mm_placeholders"]["image"]) == 3
    out = proc("<image>", proc.info.parse_mm_data({"image": [Image.new("RGB", (10000, 50), (0, 0, 255))]}))
    views = out["mm_kwargs"]["image"][0]["pixel_values"].data
    assert views.shape == ((5, 3, 56, 56) if hd else (1, 3, 56, 56)) and torch.isfinite(views).all()


@pytest.mark.parametrize(("prompt", "n_images", "found"), [("USER: hi", 1, 0), ("<image><image>", 1, 2), ("<image>", 2, 1)])
def test_placeholder_count_mismatch_is_a_clear_error(mm_processor, prompt, n_images, found):
    proc = mm_processor("llama")
    with pytest.raises(ValueError, match=f"{found} '<image>' placeholder.*{n_images} image"):
        proc(prompt, proc.info.parse_mm_data({"image": [noise(i) for i in range(n_images)]}))


def test_limit_mm_per_prompt(mm_processor):
    from vllm.exceptions import VLLMValidationError

    proc = mm_processor("gemma")
    with pytest.raises(VLLMValidationError, match="At most 3 image"):
        proc.info.parse_mm_data({"image": [noise(i) for i in range(4)]})


def test_profiling_dummy_inputs(mm_processor):
    proc = mm_processor("mixtral", False)
    dummy = proc.get_dummy_mm_inputs({"image": 2})
    assert len(dummy["mm_placeholders"]["image"]) == 2
    assert all(r.length == 16 for r in dummy["mm_placeholders"]["image"])
    assert IMAGE_TOKEN_INDEX not in dummy["prompt_token_ids"]
    assert proc.info.get_mm_max_tokens_per_item(2048, {"image": 1}) == {"image": 16}


def test_register_is_idempotent_and_covers_all_names():
    import subprocess
    import sys

    import engine
    from vllm import ModelRegistry

    from engine.names import ARCHITECTURE_TO_FAMILY

    engine.register()
    engine.register()
    assert set(ARCHITECTURE_TO_FAMILY) <= set(ModelRegistry.get_supported_archs())
    assert len(ARCHITECTURE_TO_FAMILY) == 6
    # the entry point vLLM loads in every process, and `import engine` stays free of torch/vLLM
    code = ("import sys; from importlib.metadata import entry_points; import engine; "
            "eps = {e.name: e.value for e in entry_points(group='vllm.general_plugins')}; "
            "print(eps.get('mgm'), 'torch' in sys.modules, 'vllm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.split() == ["engine:register", "False", "False"]
