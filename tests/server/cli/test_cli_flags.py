"""server.flags: env-backed flags (parse-time checks naming the variable; flag > env > default; --help names the
variable) and the subcommands' defaults coming from their config dataclasses."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from server.cli import build_parser
from server.flags import add_flag, csv_list, defaults
from server.gateway.config import GatewayConfig, ImagePolicy
from server.sdxl.config import WorkerConfig


def _parser(**kwargs) -> argparse.ArgumentParser:  # type: ignore[no-untyped-def]
    parser = argparse.ArgumentParser(prog="t")
    add_flag(parser, "--port", env="T_PORT", type=int, default=8000, **kwargs)
    return parser


def test_env_beats_default_and_flag_beats_env(monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.delenv("T_PORT", raising=False)
    assert _parser().parse_args([]).port == 8000
    monkeypatch.setenv("T_PORT", "9001")
    assert _parser().parse_args([]).port == 9001
    assert _parser().parse_args(["--port", "9002"]).port == 9002
    monkeypatch.setenv("T_PORT", "")  # empty = unset
    assert _parser().parse_args([]).port == 8000


@pytest.mark.parametrize(("kwargs", "value", "expected"), [
    ({"type": int}, "abc", "argument --x: invalid int value in $T_X: 'abc'"),
    ({"choices": ("a", "b")}, "c", "argument --x: invalid choice in $T_X: 'c' (choose from a, b)"),
    ({"action": "store_true", "default": False}, "maybe", "argument --x: invalid boolean value in $T_X: 'maybe'"),
    ({"action": "append", "type": int}, "1,x", "argument --x: invalid int value in $T_X: '1,x'"),
    ({"action": "append", "choices": ("a", "b")}, "a,c", "invalid choice in $T_X: 'a,c'"),
])
def test_bad_env_value_is_an_argparse_error_naming_the_variable(monkeypatch, capsys, kwargs, value, expected):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("T_X", value)
    parser = argparse.ArgumentParser(prog="t")
    add_flag(parser, "--x", env="T_X", **kwargs)
    with pytest.raises(SystemExit) as exc:
        parser.parse_args([])
    assert exc.value.code == 2 and expected in capsys.readouterr().err


def test_bad_env_value_is_no_error_when_the_flag_is_given(monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("T_PORT", "abc")
    assert _parser().parse_args(["--port", "1"]).port == 1


def test_command_line_values_keep_argparse_messages(capsys):  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit):
        _parser().parse_args(["--port", "abc"])
    assert "argument --port: invalid int value: 'abc'" in capsys.readouterr().err


def test_first_set_variable_wins(monkeypatch):  # type: ignore[no-untyped-def]
    parser = argparse.ArgumentParser()
    monkeypatch.delenv("T_A", raising=False)
    monkeypatch.setenv("T_B", "6")
    add_flag(parser, "--gib", env=("T_A", "T_B"), type=float, default=2.0)
    assert parser.parse_args([]).gib == 6.0
    monkeypatch.setenv("T_A", "3.5")
    parser = argparse.ArgumentParser()
    add_flag(parser, "--gib", env=("T_A", "T_B"), type=float, default=2.0)
    assert parser.parse_args([]).gib == 3.5


def test_append_takes_a_list_from_env_and_flags_replace_it(monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("T_URLS", "http://a, http://b,,")
    parser = argparse.ArgumentParser()
    add_flag(parser, "--url", env="T_URLS", action="append", default=())
    assert parser.parse_args([]).url == ["http://a", "http://b"]
    assert parser.parse_args(["--url", "http://c", "--url", "http://d"]).url == ["http://c", "http://d"]
    monkeypatch.delenv("T_URLS")
    parser = argparse.ArgumentParser()
    add_flag(parser, "--url", env="T_URLS", action="append", default=())
    assert parser.parse_args([]).url == () and parser.parse_args(["--url", "x"]).url == ["x"]


def test_store_true_from_env(monkeypatch):  # type: ignore[no-untyped-def]
    for value, expected in (("1", True), ("TRUE", True), ("yes", True), ("0", False), ("off", False)):
        monkeypatch.setenv("T_ON", value)
        parser = argparse.ArgumentParser()
        add_flag(parser, "--on", env="T_ON", action="store_true", default=False)
        assert parser.parse_args([]).on is expected, value
        assert parser.parse_args(["--on"]).on is True


def test_required_unless_the_variable_is_set(monkeypatch, capsys):  # type: ignore[no-untyped-def]
    monkeypatch.delenv("T_MODEL", raising=False)
    parser = argparse.ArgumentParser()
    add_flag(parser, "--model", env="T_MODEL", type=Path, required=True)
    with pytest.raises(SystemExit):
        parser.parse_args([])
    assert "--model" in capsys.readouterr().err
    monkeypatch.setenv("T_MODEL", "/m")
    parser = argparse.ArgumentParser()
    add_flag(parser, "--model", env="T_MODEL", type=Path, required=True)
    assert parser.parse_args([]).model == Path("/m")


def test_help_names_the_variable_and_the_default(monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("T_PORT", "9999")  # the value itself is never shown (it may be a secret)
    parser = _parser(help="listen here")
    add_flag(parser, "--keys", env="T_KEYS", action="append", shown_default="none")
    add_flag(parser, "--ttl", env="T_TTL", type=float, default=3600.0, help="100%% sure")  # help is a %-format string, as in argparse
    text = " ".join(parser.format_help().split())
    assert "listen here (default: $T_PORT or 8000)" in text and "9999" not in text
    assert "--keys KEYS default: comma-separated $T_KEYS or none" in text and "100% sure (default: $T_TTL or 3600)" in text


def test_subcommands_only_check_their_own_variables(monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MGM_SDXL_PORT", "abc")  # sdxl-worker's; the gateway ignores it
    assert build_parser().parse_args(["gateway", "--engine", "http://e:1"]).port == 8000
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sdxl-worker", "--model", "/m"])


def test_csv_list_and_defaults():  # type: ignore[no-untyped-def]
    assert csv_list(" a, b,,c ") == ["a", "b", "c"] and csv_list("") == []

    @dataclass
    class Config:
        required: int
        plain: int = 3
        made: list[int] = field(default_factory=lambda: [1])

    d = defaults(Config)
    assert (d.plain, d.made) == (3, [1]) and not hasattr(d, "required")


def test_gateway_flag_defaults_are_the_config_defaults(monkeypatch):  # type: ignore[no-untyped-def]
    for name in ("MGM_SDXL_MAX_IN_FLIGHT", "MGM_SDXL_GATEWAY_QUEUE", "MGM_CHAT_MAX_QUEUE", "MGM_MAX_IMAGE_BYTES",
                 "MGM_DRAIN_TIMEOUT", "MGM_ALLOWED_IMAGE_DOMAINS", "MGM_IMAGE_MODEL_NAME", "MGM_API_KEYS",
                 "MGM_IMAGE_STORE", "MGM_IMAGE_STORE_TIMEOUT", "MGM_RESPONSE_TTL"):
        monkeypatch.delenv(name, raising=False)
    args = build_parser().parse_args(["gateway", "--engine", "http://e:1"])
    gw, img = GatewayConfig(engines=("http://e:1",)), ImagePolicy()
    assert (args.sdxl_max_in_flight, args.sdxl_max_queue, args.chat_max_queue, args.drain_timeout,
            args.image_url_ttl, args.image_model_name, tuple(args.api_key)) == (
        gw.sdxl_max_in_flight, gw.sdxl_max_queue, gw.chat_max_queue, gw.drain_timeout_s, gw.image_store_ttl_s,
        gw.image_model_name, gw.api_keys)
    assert (args.image_store, args.image_store_timeout, args.response_ttl) == (
        gw.image_store, gw.image_store_timeout_s, gw.response_ttl_s)
    assert (args.max_image_bytes, args.max_image_pixels, args.image_fetch_timeout, tuple(args.allowed_image_domains)) \
        == (img.max_bytes, img.max_pixels, img.timeout_s, img.allowed_domains)
    monkeypatch.setenv("MGM_ALLOWED_IMAGE_DOMAINS", "a.com, b.org")
    assert build_parser().parse_args(["gateway"]).allowed_image_domains == ["a.com", "b.org"]


def test_sdxl_worker_flag_defaults_are_the_config_defaults(monkeypatch):  # type: ignore[no-untyped-def]
    for name in ("MGM_SDXL_MAX_BATCH", "MGM_SDXL_MAX_QUEUE", "MGM_SDXL_BATCH_WAIT_MS", "MGM_SDXL_JOB_TIMEOUT",
                 "MGM_SDXL_WARMUP_STEPS", "MGM_SDXL_MAX_SIDE", "MGM_SDXL_MAX_STEPS", "MGM_SDXL_THREADS",
                 "MGM_SDXL_OOM_COOLDOWN"):
        monkeypatch.delenv(name, raising=False)
    args = build_parser().parse_args(["sdxl-worker", "--model", "/m"])
    wc = WorkerConfig(model=Path("/m"))
    assert (args.max_batch, args.max_queue, args.batch_wait_ms / 1000, args.job_timeout, args.warmup_steps,
            args.max_side, args.max_steps, args.threads, args.vae_slicing) == (
        wc.max_batch, wc.max_queue, wc.batch_wait_s, wc.job_timeout_s, wc.warmup_steps, wc.max_side, wc.max_steps,
        wc.threads, wc.vae_slicing)
    assert args.oom_cooldown == wc.oom_cooldown_s


@pytest.mark.parametrize("url,word", [("s3://bucket/x", "unknown scheme"), ("file://relative", "absolute path")])
def test_gateway_refuses_a_bad_image_store_naming_it(monkeypatch, capsys, url, word):  # type: ignore[no-untyped-def]
    from server.cli import main

    monkeypatch.setenv("MGM_IMAGE_STORE", url)
    assert main(["gateway", "--engine", "http://127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert "image_store" in err and word in err
