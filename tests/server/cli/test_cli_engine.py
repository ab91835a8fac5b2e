"""``mgm engine``: the vLLM server command line and environment it builds (no server started)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from server.cli import build_parser, main
from server.engine_cli import VLLM_SERVER_MODULE, engine_command


def _command(argv: list[str], environ: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    args, extra = build_parser().parse_known_args(["engine", *argv])
    return engine_command(args, extra, Path("/s/chat_template.jinja"), Path("/s"), environ or {})


def test_cpu_defaults(tmp_path, monkeypatch):
    monkeypatch.delenv("MGM_KV_CACHE_GIB", raising=False)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)  # flag defaults are read when the parser is built
    argv, env = _command(["--model", str(tmp_path), "--device", "cpu", "--port", "8011", "--max-model-len", "512"])
    assert argv[:3] == [sys.executable, "-m", VLLM_SERVER_MODULE]
    assert argv[3:5] == ["--model", str(tmp_path)]
    assert argv[argv.index("--chat-template") + 1] == "/s/chat_template.jinja"
    assert argv[argv.index("--served-model-name") + 1] == tmp_path.name  # the directory's name, never its path
    assert argv[argv.index("--generation-config") + 1] == "/s"
    assert "--enforce-eager" in argv and argv[-4:] == ["--port", "8011", "--max-model-len", "512"]
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    cpus = sorted(os.sched_getaffinity(0))
    assert env["VLLM_CPU_OMP_THREADS_BIND"].split(",")[0].split("-")[0] == str(cpus[0])
    def bound(*flags: str) -> set[int]:  # "0-2,5" → {0, 1, 2, 5}
        spec = _command(["--model", str(tmp_path), "--device", "cpu", *flags])[1]["VLLM_CPU_OMP_THREADS_BIND"]
        return {c for part in spec.split(",") for a, _, b in [part.partition("-")] for c in range(int(a), int(b or a) + 1)}

    # default 'reserve': every usable CPU but the last, which is left to the API server; 'all': every one
    assert bound() == (set(cpus[:-1]) if len(cpus) > 1 else set(cpus))
    assert bound("--cpu-threads-bind", "all") == set(cpus)
    assert env["VLLM_TARGET_DEVICE"] == "cpu"
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "6")  # an existing vLLM setting is the next default
    assert _command(["--model", str(tmp_path), "--device", "cpu"])[1]["VLLM_CPU_KVCACHE_SPACE"] == "6"


def test_flags_env_and_user_overrides(tmp_path, monkeypatch):
    monkeypatch.setenv("MGM_KV_CACHE_GIB", "3")
    args, extra = build_parser().parse_known_args(
        ["engine", "--model", str(tmp_path), "--device", "cpu", "--cpu-threads-bind", "auto",
         "--chat-template", "mine.jinja", "--generation-config=vllm", "--no-enforce-eager"])
    argv, env = engine_command(args, extra, Path("/s/t.jinja"), Path("/s"), {"KEEP": "1"})
    assert argv.count("--chat-template") == 1 and "mine.jinja" in argv and "/s/t.jinja" not in argv
    assert "/s" not in argv and "--enforce-eager" not in argv
    argv, _ = _command(["--model", str(tmp_path), "--served-model-name", "mine"])
    assert argv.count("--served-model-name") == 1 and argv[argv.index("--served-model-name") + 1] == "mine"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "3" and env["KEEP"] == "1"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "auto" and env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    # --compile lets vLLM compile; a GPU run gets no CPU settings at all
    argv, _ = _command(["--model", str(tmp_path), "--device", "cpu", "--compile"])
    assert "--enforce-eager" not in argv
    argv, env = _command(["--model", str(tmp_path), "--device", "gpu"])
    assert "--enforce-eager" not in argv and "VLLM_CPU_KVCACHE_SPACE" not in env
    with pytest.raises(ValueError, match="--kv-cache-gib"):
        _command(["--model", str(tmp_path), "--device", "cpu", "--kv-cache-gib", "0"])


def test_exif_rotation_is_an_opt_in(tmp_path, monkeypatch):
    """The plugin's image parser reads MGM_EXIF_ROTATE in the vLLM process (engine.media): off unless asked."""
    monkeypatch.delenv("MGM_EXIF_ROTATE", raising=False)
    assert _command(["--model", str(tmp_path), "--device", "cpu"])[1]["MGM_EXIF_ROTATE"] == "0"
    assert _command(["--model", str(tmp_path), "--exif-rotate"])[1]["MGM_EXIF_ROTATE"] == "1"
    argv, _ = _command(["--model", str(tmp_path)])  # compact structured JSON unless the user configures it
    assert argv[argv.index("--structured-outputs-config") + 1] == '{"backend": "xgrammar", "disable_any_whitespace": true}'
    argv, _ = _command(["--model", str(tmp_path), "--structured-outputs-config", "{}"])
    assert argv.count("--structured-outputs-config") == 1 and "{}" in argv
    monkeypatch.setenv("MGM_EXIF_ROTATE", "yes")
    assert _command(["--model", str(tmp_path)])[1]["MGM_EXIF_ROTATE"] == "1"


def test_cli_errors(tmp_path, capsys):
    assert main(["engine", "--model", str(tmp_path / "nope")]) == 2
    assert "no config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["build-tiny", str(tmp_path / "x"), "--port", "1"])  # only `engine` passes arguments through
    assert "unrecognized arguments: --port 1" in capsys.readouterr().err




def test_kv_cache_is_whole_gib(tmp_path, monkeypatch):
    """vLLM parses VLLM_CPU_KVCACHE_SPACE with int(): a fraction would crash the engine at start-up."""
    monkeypatch.setenv("MGM_KV_CACHE_GIB", "1.5")
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_known_args(["engine", "--model", str(tmp_path)])
    assert exc.value.code == 2
