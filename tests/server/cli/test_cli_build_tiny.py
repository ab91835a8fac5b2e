"""server.cli and server.engine_cli: the ``mgm build-tiny`` subcommand, env-backed defaults and structured logs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from server.cli import build_parser, main


def _seed_of(path) -> int:
    return json.loads((path / "tiny_build.json").read_text())["seed"]


def test_build_tiny_json_logs(tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert main(["--log-format", "json", "build-tiny", str(out), "--backbone", "gemma", "--hd", "--seed", "3"]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "config.json").read_text())["image_grid"] == 2
    assert _seed_of(out) == 3
    records = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    built = next(r for r in records if r["msg"] == "built tiny checkpoint")
    assert built["backbone"] == "gemma" and built["hd"] is True and built["level"] == "info"


def test_env_seed_and_refusal_to_overwrite(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MGM_SEED", "11")
    out = tmp_path / "ckpt"
    assert main(["build-tiny", str(out)]) == 0
    assert _seed_of(out) == 11
    assert main(["build-tiny", str(out), "--seed", "12"]) == 2  # not empty, no --force
    assert "not empty" in capsys.readouterr().err
    # options after the subcommand work too; the flag beats the environment
    assert main(["build-tiny", str(out), "--seed", "12", "--force", "--log-level", "warning"]) == 0
    assert _seed_of(out) == 12


def test_bad_env_value_is_reported_by_argparse(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MGM_SEED", "abc")
    with pytest.raises(SystemExit) as exc:
        main(["build-tiny", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--seed" in err and "$MGM_SEED" in err


def test_bad_env_backbone(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MGM_TINY_BACKBONE", "qwen")  # checked against the choices when build-tiny parses
    with pytest.raises(SystemExit) as exc:
        main(["build-tiny", str(tmp_path / "x")])
    assert exc.value.code == 2 and "$MGM_TINY_BACKBONE" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    monkeypatch.setenv("MGM_SEED", "abc")  # another subcommand's bad variable is no error here
    assert build_parser().parse_args(["engine", "--model", str(tmp_path)]).device == "auto"


def test_only_real_subcommands():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"build-tiny", "engine"} <= set(sub.choices)
    # every registered subcommand runs something (no placeholders)
    assert all(callable(p.get_default("handler")) for p in sub.choices.values())


def test_help_does_not_import_heavy_libraries():
    code = ("import sys; from server.cli import build_parser; build_parser().format_help(); "
            "print(sorted(m for m in ('torch', 'vllm', 'transformers', 'diffusers', 'fastapi', 'uvicorn', 'httpx') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"
