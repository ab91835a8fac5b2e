"""`mgm serve` options and plan (server.supervisor), without starting anything."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from server.cli import build_parser, main
from server.supervisor import ServeConfig, plan_children, serve_config, vllm_args


def _args(argv: list[str]):  # type: ignore[no-untyped-def]
    args, passthrough = build_parser().parse_known_args(["serve", *argv])
    args.passthrough = passthrough
    return args


def test_defaults_and_env_overrides(monkeypatch):  # type: ignore[no-untyped-def]
    for name in ("MGM_HOST", "MGM_PORT", "MGM_NUM_ENGINES", "MGM_NUM_SDXL_WORKERS", "MGM_MODEL", "MGM_IMAGE_MODEL"):
        monkeypatch.delenv(name, raising=False)
    args = _args([])
    assert (args.host, args.port, args.engines, args.sdxl_workers, args.model, args.image_model) == (
        "127.0.0.1", 8000, 1, 1, None, None)
    defaults = ServeConfig()  # the flags' defaults are the config's
    assert serve_config(args) == ServeConfig(log_level=args.log_level, log_format=args.log_format)
    assert (defaults.host, defaults.port, defaults.ready_timeout_s) == ("127.0.0.1", 8000, 900.0)
    monkeypatch.setenv("MGM_PORT", "9001")
    monkeypatch.setenv("MGM_NUM_ENGINES", "3")
    monkeypatch.setenv("MGM_NUM_SDXL_WORKERS", "0")
    monkeypatch.setenv("MGM_MODEL", "/m")
    args = _args([])
    assert (args.port, args.engines, args.sdxl_workers, args.model) == (9001, 3, 0, Path("/m"))
    assert _args(["--port", "9002"]).port == 9002  # the flag wins


def test_plan_passes_vllm_args_and_wires_the_gateway():
    args = _args(["--engines", "2", "--sdxl-workers", "2", "--port", "8123", "--model-name", "alias",
                  "--", "--max-model-len", "512", "--port", "1"])
    extra = vllm_args(args.passthrough)
    assert extra == ["--max-model-len", "512", "--port", "1"]
    config = serve_config(args)
    assert config.vllm_args == tuple(extra) and config.model_name == "alias" and config.logs == Path(".cache/logs")
    children = plan_children(config, Path("/ckpt"), Path("/sdxl"), extra, Path("/logs"))
    assert [c.name for c in children] == ["engine-0", "engine-1", "sdxl-worker-0", "sdxl-worker-1", "gateway"]
    urls = [c.ready_url.rsplit("/", 1)[0] for c in children[:-1]]  # type: ignore[union-attr]
    ports = [int(u.rsplit(":", 1)[1]) for u in urls]
    assert len(set(ports)) == 4 and 8123 not in ports and all(u.startswith("http://127.0.0.1:") for u in urls)
    engine = children[0].argv
    assert engine[engine.index("engine"):][:3] == ["engine", "--model", "/ckpt"]
    assert engine[-4:] == ["--max-model-len", "512", "--port", "1"]
    gateway = children[-1].argv
    assert gateway.count("--engine") == 2 and gateway.count("--sdxl-worker") == 2
    assert urls[0] in gateway and urls[3] in gateway and gateway[-4:] == ["--model-name", "alias", "--routing", "affinity"]
    least = plan_children(serve_config(_args(["--routing", "least-loaded"])), Path("/c"), None, [], Path("/l"))
    assert least[-1].argv[-2:] == ["--routing", "least-loaded"]
    assert children[-1].ready_url == "http://127.0.0.1:8123/ready"
    assert children[-1].log == Path("/logs/gateway.log")


@pytest.mark.parametrize("argv", [["--engines", "0"], ["--sdxl-workers", "-1"], ["--port", "0"]])
def test_bad_values_exit_2(argv, tmp_path):  # type: ignore[no-untyped-def]
    assert main(["serve", "--cache-dir", str(tmp_path), *argv]) == 2


def test_busy_port_exits_2_before_starting_anything(tmp_path):  # type: ignore[no-untyped-def]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert main(["serve", "--cache-dir", str(tmp_path), "--port", str(s.getsockname()[1])]) == 2
    assert not (tmp_path / "tiny-mgm").exists() and not (tmp_path / "logs").exists()


def test_bad_env_value_is_a_parse_error_naming_the_variable(monkeypatch, capsys):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MGM_NUM_ENGINES", "two")
    with pytest.raises(SystemExit) as exc:
        _args([])
    assert exc.value.code == 2 and "$MGM_NUM_ENGINES" in capsys.readouterr().err


def test_api_keys_from_env_or_flags(monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MGM_API_KEYS", "k1, k2")
    assert serve_config(_args([])).api_keys == ("k1", "k2")
    assert serve_config(_args(["--api-key", "k3"])).api_keys == ("k3",)  # the flag replaces the variable
