"""Fixtures for the ``mgm serve`` tests: tiny checkpoints built once into a tmp dir (never .cache/), and ONE live
``mgm serve`` stack shared by every test that needs it (it takes about a minute to start on 2 cores).

The SIGTERM test stops that stack, so it is marked ``stops_stack`` and :func:`pytest_collection_modifyitems` moves
it after every other user of the stack whatever the file order or selection; the function-scoped ``stack`` fixture
fails loudly if the stack is found stopped anyway, rather than letting a test time out against a dead port."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
from support.redis_live import start_redis
from support.serve_live import ALIAS, API_KEY, VLLM_ARGS, Serve, start_serve

from loadtests import stack as harness
from server.procs import free_port
from server.supervisor import READY_PREFIX

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(tiny MGM checkpoint, tiny SDXL pipeline), built in-process into a tmp dir (never .cache/)."""
    from engine.tiny import build_tiny
    from server.sdxl.tiny import build_tiny_sdxl

    root = tmp_path_factory.mktemp("serve-models")
    return Path(build_tiny(root / "tiny-mgm", backbone="llama", hd=False, seed=0)), build_tiny_sdxl(
        root / "tiny-sdxl", seed=0)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "stops_stack: stops the shared `mgm serve` stack; runs after its other users")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Move ``stops_stack`` tests right after the last test that uses the shared stack (a no-op in file order),
    so the stack is stopped as soon as nothing needs it; everything else keeps its order."""
    stoppers = [item for item in items if item.get_closest_marker("stops_stack")]
    rest = [item for item in items if not item.get_closest_marker("stops_stack")]
    users = [n for n, item in enumerate(rest) if "serve_stack" in getattr(item, "fixturenames", ())]
    if stoppers and users:
        items[:] = rest[:users[-1] + 1] + stoppers + rest[users[-1] + 1:]


@pytest.fixture(scope="session")
def serve_stack(tiny_models, tmp_path_factory):  # type: ignore[no-untyped-def]
    """``mgm serve`` (tiny MGM engine + tiny SDXL worker + gateway, API key on) with ``base`` (its URL) and ``tmp``
    (its directory: cache, logs) attached."""
    model, image_model = tiny_models
    tmp = tmp_path_factory.mktemp("serve-stack")
    port = free_port()
    serve = start_serve(tmp, "--model", str(model), "--image-model", str(image_model), "--port", str(port),
                        "--model-name", ALIAS, "--stop-timeout", "20", *VLLM_ARGS, env={"MGM_API_KEYS": API_KEY})
    serve.tmp = tmp  # type: ignore[attr-defined]
    serve.base = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    try:
        serve.wait_for(lambda: READY_PREFIX in serve.stdout(), 150, "ready line")
        yield serve
    finally:
        if serve.proc.poll() is None:
            serve.stop()


@pytest.fixture
def stack(serve_stack: Serve) -> Serve:
    """The shared stack, checked to be still running."""
    if serve_stack.proc.poll() is not None:
        pytest.fail(f"the shared mgm serve stack has exited ({serve_stack.proc.returncode}); only a test marked "
                    f"stops_stack may stop it, and those run last\n{serve_stack.logs()}")
    return serve_stack


# --- gateway replicas sharing one Redis --------------------------------------------------------------------------

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _backends(stack: Serve) -> tuple[str, str]:
    ready = httpx.get(stack.base + "/ready", headers=AUTH, timeout=10).json()  # type: ignore[attr-defined]
    return ready["engines"][0]["url"], ready["workers"][0]["url"]


@pytest.fixture(scope="session")
def replicas(serve_stack: Serve, tmp_path_factory):  # type: ignore[no-untyped-def]
    """Two more `mgm gateway` processes in front of the shared stack's engine and SDXL worker, sharing one real
    redis-server as their image and response store: (the Redis, [gateway URL, gateway URL])."""
    tmp = tmp_path_factory.mktemp("replicas")
    redis = start_redis(tmp)
    engine, worker = _backends(serve_stack)
    gateways = [harness.gateway(free_port(), [engine], [worker], tmp, name=f"replica-{i}",
                              extra=["--image-store-timeout", "1", "--model-name", ALIAS]) for i in range(2)]
    try:
        with harness.running(gateways, timeout=60, env={"MGM_API_KEYS": API_KEY, "MGM_IMAGE_STORE": redis.url}):
            yield redis, [harness.base_url(g) for g in gateways]
    finally:
        redis.stop()
