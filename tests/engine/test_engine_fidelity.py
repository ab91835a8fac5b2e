"""vLLM ``LLM(...)`` serving the tiny checkpoints against the independent float64 reference (bench/baselines/mgm_hf.py).

Per backbone (Llama, Llama-HD, Gemma, Mixtral): prompt ids equal to the official chunk-wise ids (generate and
chat), prompt logprobs of the text after each image within 2e-3, greedy tokens equal while the reference's
top-2 margin is clear. Plus: 32 concurrent prompts with different images = one at a time, the per-prompt image
limit, and the template's stop tokens. Engines run in float32; at most one is alive at a time (2-core CI box).
"""

from __future__ import annotations

import base64
import functools
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.names import IMAGE_TOKEN_INDEX
from engine.prompt import render_prompt

TEMPLATE = {"llama": "vicuna_v1", "gemma": "gemma", "mixtral": "mistral_instruct"}
LOGPROB_TOL = 2e-3
MARGIN = 1e-3  # logits: float32 vs float64 differ by ~1e-5 here (measured), so a 1e-3 lead cannot flip
GREEDY_STEPS = 6
#: Measured max |logprob diff| per case, printed at the end of the session (run with -s to see them).
MEASURED: dict[str, float] = {}


def noise(seed: int, size=(64, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")  # lossless: the server decodes exactly these pixels
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="session")
def llm_engine(tiny_checkpoint, tmp_path_factory):
    """Factory ``(backbone, hd) -> (LLM, checkpoint path)`` keeping a single engine alive (start-ups are the cost)."""
    import os

    from vllm import LLM

    from engine.serving import prepare_serving_files

    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # LLM.apply_model sends a function to the engine core

    current: dict[tuple[str, bool], tuple[LLM, Path]] = {}

    def close() -> None:
        for llm, _ in current.values():
            llm.llm_engine.engine_core.shutdown()
        current.clear()

    def get(backbone: str, hd: bool = False):  # type: ignore[no-untyped-def]
        key = (backbone, hd)
        if key not in current:
            close()
            path = tiny_checkpoint(backbone, hd)
            files = prepare_serving_files(path, tmp_path_factory.mktemp(f"serving-{backbone}-{int(hd)}"))
            llm = LLM(model=str(path), dtype="float32", max_model_len=2048, enforce_eager=True, seed=0,
                      limit_mm_per_prompt={"image": 3}, generation_config=str(files.generation_config),
                      max_num_seqs=32)
            current[key] = (llm, path)
        return current[key]

    yield get
    close()
    if MEASURED:
        print("\nmax |prompt logprob diff| vs float64 reference:",
              ", ".join(f"{k}={v:.2e}" for k, v in MEASURED.items()))


@pytest.fixture(scope="session")
def reference(tiny_checkpoint):
    from bench.baselines.mgm_hf import MGMReference
    from engine.model import placeholder_token_id

    cache = {}

    def get(backbone: str, hd: bool = False) -> MGMReference:
        if (backbone, hd) not in cache:
            path = tiny_checkpoint(backbone, hd)
            from transformers import AutoTokenizer

            cache[(backbone, hd)] = MGMReference(path, placeholder_token_id(AutoTokenizer.from_pretrained(path)))
        return cache[(backbone, hd)]

    return get


def _sampling(**kw):  # type: ignore[no-untyped-def]
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, ignore_eos=True, **kw)


# --- batching first: it shares the Llama engine with the first fidelity case -------------------------------------


def test_32_concurrent_prompts_equal_one_at_a_time(llm_engine):
    llm, _ = llm_engine("llama")
    questions = ["What is this?", "Describe the image in detail.", "What colour is it?", "How many?"]
    prompts = [
        {"prompt": render_prompt([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                                 "vicuna_v1"),
         "multi_modal_data": {"image": noise(100 + i, (40 + 7 * i, 90 - 2 * i))}}
        for i, q in enumerate(questions * 8)
    ]
    params = _sampling(max_tokens=8, logprobs=0)
    batched = llm.generate(prompts, params, use_tqdm=False)
    single = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]
    for i, (b, s) in enumerate(zip(batched, single)):
        assert b.prompt_token_ids == s.prompt_token_ids, i
        assert b.outputs[0].token_ids == s.outputs[0].token_ids, i
        for lb, ls in zip(b.outputs[0].logprobs, s.outputs[0].logprobs):
            (tb, vb), = lb.items()
            assert abs(vb.logprob - ls[tb].logprob) < 1e-3, i
    # the images matter: same question, different image → different continuations
    same_question = [tuple(b.outputs[0].token_ids) for b in batched[::4]]
    assert len(set(same_question)) > 1


# --- fidelity ------------------------------------------------------------------------------------------------------


def _cases(backbone: str, hd: bool) -> list[tuple[list[dict], list[Image.Image]]]:
    one = ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}], [noise(1)])
    two = ([{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                         {"type": "text", "text": "Compare the two pictures."}]},
            {"role": "assistant", "content": "A cat. And a dog."},
            {"role": "user", "content": "Which one is on the left?"}],
           [noise(2, (90, 30)), Image.new("RGB", (50, 50), (20, 200, 40))])
    return [one, two]


def _chat_messages(conversation: list[dict], images: list[Image.Image]) -> list[dict]:
    it = iter(images)
    out = []
    for m in conversation:
        content = m["content"]
        if isinstance(content, list):
            content = [{"type": "image_url", "image_url": {"url": data_url(next(it))}} if p["type"] == "image" else p
                       for p in content]
        out.append({**m, "content": content})
    return out


@pytest.mark.parametrize(("backbone", "hd"), [("llama", False), ("llama", True), ("mixtral", False), ("gemma", False)],
                         ids=["llama", "llama-hd", "mixtral", "gemma"])
def test_fidelity_against_float64_reference(llm_engine, reference, backbone, hd):
    llm, _ = llm_engine(backbone, hd)
    ref = reference(backbone, hd)
    worst, compared = 0.0, 0
    for case, (conversation, images) in enumerate(_cases(backbone, hd)):
        prompt = render_prompt(conversation, TEMPLATE[backbone])
        out = llm.generate({"prompt": prompt, "multi_modal_data": {"image": images}},
                           _sampling(max_tokens=GREEDY_STEPS, prompt_logprobs=0), use_tqdm=False)[0]
        want = ref.forward(prompt, images)

        # 1. prompt ids: the official chunk-wise ids, each image expanded in place
        assert out.prompt_token_ids == want.ids, case
        assert IMAGE_TOKEN_INDEX not in out.prompt_token_ids
        chat = llm.chat(_chat_messages(conversation, images), _sampling(max_tokens=1), use_tqdm=False,
                        chat_template_content_format="openai")[0]
        assert chat.prompt_token_ids == want.ids, case  # OpenAI messages render as the official conversation

        # 2. prompt logprobs of every text token after the first image
        logprobs = want.logits.log_softmax(-1)
        in_image = {p for start, end in want.image_spans for p in range(start, end)}
        after = [p for p in range(want.image_spans[0][0], len(want.ids)) if p not in in_image]
        assert len(after) > 5
        diffs = []
        for p in after:
            token = want.ids[p]
            diffs.append(abs(out.prompt_logprobs[p][token].logprob - logprobs[p - 1, token].item()))
        worst = max(worst, max(diffs))
        assert max(diffs) < LOGPROB_TOL, (case, max(diffs))

        # 3. greedy continuation, compared while the reference's choice is clear
        tokens, margins = ref.greedy(prompt, images, GREEDY_STEPS)
        got = list(out.outputs[0].token_ids)
        clear = next((i for i, m in enumerate(margins) if m < MARGIN), len(margins))
        assert got[:clear] == tokens[:clear], (case, got, tokens, margins)
        compared += clear
    assert compared >= 3, f"too few greedy tokens with a clear reference margin ({compared}) to compare"
    MEASURED[f"{backbone}{'-hd' if hd else ''}"] = worst

    # 4. the image features themselves: the engine's vision front end (its default path: vLLM's CLIP, the fused
    #    channels-last ConvNeXt, the folded mining, the projector) against the official math in float64
    image = noise(7, (70, 50))
    views, hr = ref.preprocess(image)
    # A module-level function with partial arguments: the engine core unpickles it by name.
    got, fused = llm.apply_model(functools.partial(_engine_features, views=views.float()[None], hr=hr.float()))[0]
    got = torch.as_tensor(got, dtype=torch.float64)  # the RPC answer carries the tensor as nested lists
    want = ref.image_tokens(image)
    assert fused, "the engine's ConvNeXt did not take the fused CPU path"
    assert got.shape == want.shape
    assert ((got.double() - want).norm() / want.norm()).item() <= 1e-4  # the fp32 tolerance of the kernels' tests


def _engine_features(model, views, hr):  # type: ignore[no-untyped-def]
    """Runs inside the engine core: (features of one image, whether every ConvNeXt block ran the fused path)."""
    import torch

    from engine import convnext

    seen = []
    real = convnext.ConvNeXtBlock._forward_onednn
    convnext.ConvNeXtBlock._forward_onednn = lambda self, x: seen.append(1) or real(self, x)
    try:
        with torch.inference_mode():
            features = model._encode_images(views, hr)[0].cpu().tolist()
    finally:
        convnext.ConvNeXtBlock._forward_onednn = real
    return features, len(seen) == sum(model.vision_tower_aux.depths)


def test_template_stop_tokens(llm_engine, tiny_tokenizer):
    """Gemma stops on <end_of_turn> (docs/mgm.md §6), which is not its eos: the serving generation config adds it."""
    from vllm import SamplingParams

    llm, _ = llm_engine("gemma")  # still alive from the last fidelity case
    tok = tiny_tokenizer("gemma")
    end_of_turn = tok.convert_tokens_to_ids("<end_of_turn>")
    assert end_of_turn != tok.eos_token_id
    prompt = render_prompt([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}], "gemma")
    for stop in (end_of_turn, tok.eos_token_id):
        forced = SamplingParams(temperature=0, max_tokens=5, allowed_token_ids=[stop])
        out = llm.generate({"prompt": prompt, "multi_modal_data": {"image": noise(3)}}, forced, use_tqdm=False)[0]
        assert out.outputs[0].finish_reason == "stop" and list(out.outputs[0].token_ids) == [stop]


def test_limit_mm_per_prompt_in_engine(llm_engine):
    llm, _ = llm_engine("gemma")
    prompt = "<start_of_turn>user\n" + "<image>\n" * 4 + "Hi<end_of_turn>\n<start_of_turn>model\n"
    with pytest.raises(Exception, match="At most 3 image"):
        llm.generate({"prompt": prompt, "multi_modal_data": {"image": [noise(i) for i in range(4)]}},
                     _sampling(max_tokens=1), use_tqdm=False)
