"""``mgm build-tiny-sdxl`` and server.sdxl.tiny: the real save_pretrained/from_pretrained round trip, determinism,
speed, and the CLI's checks of both SDXL subcommands."""

from __future__ import annotations

import json
import time

import pytest
import torch
from server.cli import main
from server.sdxl.tiny import BUILD_INFO, build_tiny_sdxl, learn_clip_bpe


def _weights(path, component: str) -> bytes:
    return (path / component / "diffusion_pytorch_model.safetensors").read_bytes()


def test_round_trip_through_from_pretrained(tiny_sdxl):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    index = json.loads((tiny_sdxl / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert json.loads((tiny_sdxl / BUILD_INFO).read_text())["random_weights"] is True

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    assert isinstance(pipe.tokenizer, CLIPTokenizer) and isinstance(pipe.tokenizer_2, CLIPTokenizer)
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    # SDXL's conditioning wiring: concatenated penultimate states, pooled projection + 6 time ids.
    unet = pipe.unet.config
    assert unet.addition_embed_type == "text_time"
    assert unet.cross_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert unet.projection_class_embeddings_input_dim == (
        6 * unet.addition_time_embed_dim + pipe.text_encoder_2.config.projection_dim)
    assert pipe.vae_scale_factor == 8 and pipe.default_sample_size * pipe.vae_scale_factor == 64
    assert pipe.vae.config.force_upcast is True
    assert pipe.tokenizer.model_max_length == 77 and pipe.tokenizer_2.pad_token == "!"
    ids = pipe.tokenizer("A photo of a cat").input_ids
    assert ids[0] == pipe.tokenizer.bos_token_id and ids[-1] == pipe.tokenizer.eos_token_id
    assert pipe.tokenizer.decode(ids, skip_special_tokens=True) == "a photo of a cat"
    # Byte-level BPE: any text encodes without unknowns (CLIP's unk is <|endoftext|>, so look between bos and eos).
    assert pipe.tokenizer.unk_token_id not in pipe.tokenizer("日本の猫 ✨").input_ids[1:-1]

    # A 64×64 image with a few steps, well under a second (1 thread: fastest for tiny ops on a busy machine).
    pipe.set_progress_bar_config(disable=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe("warm up", num_inference_steps=2)
        start = time.perf_counter()
        image = pipe("a cat", num_inference_steps=4, generator=torch.Generator().manual_seed(0)).images[0]
        elapsed = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    assert image.size == (64, 64)
    print(f"tiny SDXL: 64x64, 4 steps in {elapsed:.3f} s")
    assert elapsed < 3.0  # typically ~0.05 s; generous for a shared machine


def test_build_is_reproducible_and_seeded(tiny_sdxl, tmp_path):
    again = build_tiny_sdxl(tmp_path / "again", seed=0)
    files = ["unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
             "text_encoder/model.safetensors", "text_encoder_2/model.safetensors", "tokenizer/tokenizer.json",
             "tokenizer_2/tokenizer.json", "scheduler/scheduler_config.json"]
    for name in files:
        assert (again / name).read_bytes() == (tiny_sdxl / name).read_bytes(), name
    other = build_tiny_sdxl(tmp_path / "other", seed=1)
    assert _weights(other, "unet") != _weights(tiny_sdxl, "unet")


def test_bpe_learner_is_deterministic_and_clip_shaped():
    vocab, merges = learn_clip_bpe("a cat and a cat, cats", num_merges=20)
    assert (vocab, merges) == learn_clip_bpe("a cat and a cat, cats", num_merges=20)
    assert len(vocab) == 512 + len(merges) + 2  # bytes, bytes + </w>, one piece per merge, two specials
    assert "cat</w>" in vocab and vocab["<|endoftext|>"] == len(vocab) - 1
    assert len(merges) < 20  # stops when nothing is left to merge


def test_cli_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["build-tiny-sdxl", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["build-tiny-sdxl", str(tmp_path / "file")]) == 2


def test_worker_cli_rejects_bad_settings(tmp_path, tiny_sdxl, monkeypatch, capsys):
    assert main(["sdxl-worker", "--model", str(tmp_path)]) == 2  # no model_index.json
    assert "model_index.json" in capsys.readouterr().err
    assert main(["sdxl-worker", "--model", str(tiny_sdxl), "--max-batch", "0"]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["sdxl-worker", "--model", str(tiny_sdxl), "--bogus", "1"])  # only `engine` passes arguments on
    assert exc.value.code == 2
    monkeypatch.setenv("MGM_SDXL_DEVICE", "tpu")  # env defaults are checked against the choices when parsing
    with pytest.raises(SystemExit) as exc:
        main(["sdxl-worker", "--model", str(tiny_sdxl)])
    assert exc.value.code == 2 and "$MGM_SDXL_DEVICE" in capsys.readouterr().err
    monkeypatch.delenv("MGM_SDXL_DEVICE")
    monkeypatch.setenv("MGM_SDXL_MAX_QUEUE", "lots")
    with pytest.raises(SystemExit) as exc:
        main(["sdxl-worker", "--model", str(tiny_sdxl)])
    assert exc.value.code == 2 and "--max-queue" in capsys.readouterr().err
    monkeypatch.delenv("MGM_SDXL_MAX_QUEUE")
    if not torch.cuda.is_available():
        assert main(["sdxl-worker", "--model", str(tiny_sdxl), "--dtype", "float16"]) == 2
        assert "float16 is not supported on CPU" in capsys.readouterr().err


def test_worker_model_from_env(tmp_path, monkeypatch):
    from server.cli import build_parser

    monkeypatch.setenv("MGM_SDXL_MODEL", str(tmp_path))
    monkeypatch.setenv("MGM_SDXL_PORT", "9123")
    args = build_parser().parse_args(["sdxl-worker"])
    assert args.model == tmp_path and args.port == 9123 and args.host == "127.0.0.1"
    args = build_parser().parse_args(["sdxl-worker", "--port", "9000", "--model", "/x"])
    assert args.port == 9000 and str(args.model) == "/x"  # the flag wins
