"""Image options of ``mgm gateway`` (``--max-edit-images``) and what ``mgm serve`` hands its gateway child of them
(``--image-store``, ``--image-url-ttl``, ``--max-edit-images``), without starting anything."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from server.cli import build_parser, main
from server.gateway.config import GatewayConfig
from server.supervisor import gateway_env, plan_children, serve_config

VARIABLES = ("MGM_MAX_EDIT_IMAGES", "MGM_IMAGE_URL_TTL", "MGM_IMAGE_STORE", "MGM_API_KEYS")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):  # type: ignore[no-untyped-def]
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)


def _gateway(argv: list[str]):  # type: ignore[no-untyped-def]
    return build_parser().parse_args(["gateway", "--engine", "http://e:1", *argv])


def test_max_edit_images_default_env_and_flag(monkeypatch, capsys):  # type: ignore[no-untyped-def]
    assert _gateway([]).max_edit_images == GatewayConfig(engines=("http://e:1",)).max_edit_images == 4
    monkeypatch.setenv("MGM_MAX_EDIT_IMAGES", "2")
    assert _gateway([]).max_edit_images == 2
    assert _gateway(["--max-edit-images", "3"]).max_edit_images == 3  # the flag wins
    monkeypatch.setenv("MGM_MAX_EDIT_IMAGES", "many")
    with pytest.raises(SystemExit) as exc:
        _gateway([])
    assert exc.value.code == 2 and "$MGM_MAX_EDIT_IMAGES" in capsys.readouterr().err


def test_max_edit_images_reaches_the_gateway_config(monkeypatch):  # type: ignore[no-untyped-def]
    import uvicorn

    import server.gateway.app as app_module

    seen: list[GatewayConfig] = []
    monkeypatch.setattr(app_module, "create_app", lambda config: seen.append(config) or object())
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: None)
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    assert main(["gateway", "--engine", "http://127.0.0.1:1", "--max-edit-images", "2"]) == 0
    assert seen[0].max_edit_images == 2
    assert main(["gateway", "--engine", "http://127.0.0.1:1", "--max-edit-images", "0"]) == 2  # config refuses it
    assert len(seen) == 1


def _serve(argv: list[str]):  # type: ignore[no-untyped-def]
    args, passthrough = build_parser().parse_known_args(["serve", *argv])
    args.passthrough = passthrough
    return serve_config(args)


def _gateway_child(config, monkeypatch):  # type: ignore[no-untyped-def]
    """The gateway child's arguments as `mgm gateway` parses them, under the environment serve gives it."""
    gateway = plan_children(config, Path("/ckpt"), Path("/sdxl"), [], Path("/logs"))[-1]
    assert gateway.name == "gateway"
    for name, value in gateway_env(config).items():
        monkeypatch.setenv(name, value)
    argv = gateway.argv[gateway.argv.index("-m") + 2:]  # after `python -m server`
    return build_parser().parse_args(argv)


def test_serve_hands_the_image_store_ttl_and_edit_cap_to_the_gateway(monkeypatch):  # type: ignore[no-untyped-def]
    store = "redis://:secret@store:6379/0"
    config = _serve(["--image-store", store, "--image-url-ttl", "120.5", "--max-edit-images", "2"])
    gateway = plan_children(config, Path("/ckpt"), Path("/sdxl"), [], Path("/logs"))[-1]
    assert store not in " ".join(gateway.argv)  # a store URL may hold a password: environment only
    assert gateway_env(config) == {"MGM_IMAGE_STORE": store}
    args = _gateway_child(config, monkeypatch)
    assert (args.image_store, args.image_url_ttl, args.max_edit_images) == (store, 120.5, 2)


def test_serve_without_the_options_leaves_the_gateway_defaults(monkeypatch):  # type: ignore[no-untyped-def]
    config = _serve([])
    assert (config.image_store, config.image_url_ttl_s, config.max_edit_images) == (None, None, None)
    gw = GatewayConfig(engines=("http://e:1",))
    args = _gateway_child(config, monkeypatch)
    assert (args.image_store, args.image_url_ttl, args.max_edit_images) == (
        gw.image_store, gw.image_store_ttl_s, gw.max_edit_images)
    monkeypatch.setenv("MGM_IMAGE_URL_TTL", "60")  # serve reads the gateway's variable too
    assert _serve([]).image_url_ttl_s == 60.0
