"""``mgm serve``: the whole stack in one command — MGM engine(s), SDXL worker(s) and the gateway as child processes.

    mgm serve                                  # tiny RANDOM-weight checkpoints under .cache/ (built when missing)
    mgm serve --model DIR --image-model DIR    # real checkpoints
    mgm serve --engines 2 --sdxl-workers 0 -- --max-model-len 4096   # after --: extra vLLM arguments

Engines and workers listen on free loopback ports, the gateway on ``--host``/``--port``. Each child runs in its own
process group with its output in ``<logs-dir>/<name>.log`` (:mod:`server.procs`); one instance per logs directory (a
lock file, ``serve.lock``, held while it runs: a second one is refused with a message naming ``--logs-dir``). The
supervisor waits until every child answers its readiness route *and* the gateway's ``/ready`` lists every engine and
worker up (so "ready" means every backend is in the gateway's pool), prints the URL and a ready-to-paste ``curl``,
then supervises: Ctrl-C, SIGTERM or SIGHUP stops the children in order — the gateway first (it drains its in-flight
requests while the engines still answer), then the engines and workers (SIGTERM, bounded wait, SIGKILL) — and exits
0; a child that dies on its own is logged and everything is stopped, exit 1. If the supervisor itself is killed
(``kill -9``, the OOM killer) its children still go: a parent-death signal and a watchdog process
(:class:`server.procs.Watchdog`).

Engine and worker ports are chosen free just before the children start, but a child binds its port seconds later
(after its imports), and another process may take it meanwhile. That race is not hidden: a child that dies during
start-up with "address already in use" makes the supervisor stop the children it started, choose new ports and start
them again (a few attempts). Registered by :mod:`server.cli`; nothing heavy is imported at module level.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from server.flags import SubParsers, add_flag, defaults
from server.gateway import cli as gateway_cli
from server.gateway.config import GatewayConfig
from server.procs import Child, Watchdog, chat_curl, free_ports, kill_children, stop_children, stop_in_order
from server.gateway.routing import ROUTING_POLICIES

logger = logging.getLogger("mgm.serve")

#: Printed on stdout once every child is ready (tests and scripts wait for it).
READY_PREFIX = "mgm serve: ready at "
#: Logged (stderr) once the gateway's /ready lists every engine and worker up, just before the ready line.
POOL_COMPLETE = "every backend is in the gateway's pool"
#: Start attempts when a child loses its port to another process before binding it.
PORT_ATTEMPTS = 3
#: Held (flock) in the logs directory while an instance runs.
LOCK_NAME = "serve.lock"
#: vLLM arguments used with the default tiny checkpoint when none are given.
TINY_VLLM_ARGS = ["--max-model-len", "2048", "--limit-mm-per-prompt", '{"image": 4}']


@dataclass(frozen=True)
class ServeConfig:
    """What ``mgm serve`` runs. No ``model``/``image_model``: the tiny random checkpoints under ``cache_dir``."""

    model: Path | None = None
    image_model: Path | None = None
    host: str = gateway_cli.DEFAULT_HOST  # the gateway's address
    port: int = gateway_cli.DEFAULT_PORT
    engines: int = 1
    sdxl_workers: int = 1  # 0 = no image generation
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # handed to the gateway in its environment only
    model_name: str | None = None  # the gateway's chat model alias
    routing: str = "affinity"  # the gateway's --routing (server.gateway.routing)
    #: The gateway's image store URL (it may hold a password: handed over in the gateway's environment only).
    image_store: str | None = field(default=None, repr=False)
    image_url_ttl_s: float | None = None  # the gateway's --image-url-ttl (None: its default)
    max_edit_images: int | None = None  # the gateway's --max-edit-images (None: its default)
    cache_dir: Path = Path(".cache")  # tiny checkpoints, and logs unless logs_dir is given
    logs_dir: Path | None = None
    ready_timeout_s: float = 900.0
    stop_timeout_s: float = 30.0
    log_level: str = "INFO"  # every child logs like the supervisor
    log_format: str = "text"
    vllm_args: tuple[str, ...] = ()  # passed to every engine's vLLM server

    @property
    def logs(self) -> Path:
        return self.logs_dir or self.cache_dir / "logs"


def register(sub: SubParsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "serve", parents=[common], allow_abbrev=False,  # never let an abbreviation swallow a vLLM flag
        help="run the whole stack: engine(s), SDXL worker(s) and the gateway (arguments after -- go to vLLM)",
        description="Start MGM engine(s), SDXL worker(s) and the OpenAI-compatible gateway as child processes, wait "
        "until they are ready, print the URL and a curl example, and stop them all on Ctrl-C/SIGTERM/SIGHUP. Without "
        "--model/--image-model it serves tiny RANDOM-weight checkpoints under the cache directory (built when "
        "missing). Arguments after -- (or unknown ones) are passed to every engine's vLLM server.",
    )
    d = defaults(ServeConfig)
    add_flag(p, "--model", env="MGM_MODEL", type=Path, default=d.model,
             shown_default="the tiny random one, <cache-dir>/tiny-mgm", help="MGM checkpoint directory")
    add_flag(p, "--image-model", env="MGM_IMAGE_MODEL", type=Path, default=d.image_model,
             shown_default="the tiny random one, <cache-dir>/tiny-sdxl", help="diffusers SDXL directory")
    add_flag(p, "--host", env="MGM_HOST", default=d.host, help="gateway address")
    add_flag(p, "--port", env="MGM_PORT", type=int, default=d.port, help="gateway port")
    add_flag(p, "--engines", env="MGM_NUM_ENGINES", type=int, default=d.engines, help="number of MGM engines")
    add_flag(p, "--sdxl-workers", env="MGM_NUM_SDXL_WORKERS", type=int, default=d.sdxl_workers,
             help="number of SDXL workers, 0 = no image generation")
    add_flag(p, "--api-key", env="MGM_API_KEYS", action="append", default=d.api_keys, metavar="KEY",
             shown_default="none = no auth", help="accepted Bearer key, repeatable; the variable keeps keys out "
             "of the process list")
    add_flag(p, "--model-name", env="MGM_MODEL_NAME", default=d.model_name,
             help="extra id clients may use for the chat model")
    add_flag(p, "--routing", env="MGM_ROUTING", choices=ROUTING_POLICIES, default=d.routing,
             help="the gateway's engine choice: affinity (a conversation stays on the engine holding its image) or "
             "least-loaded")
    add_flag(p, "--image-store", env="MGM_IMAGE_STORE", default=d.image_store, shown_default="memory://",
             help="where response_format=url images live: memory://, file:///path or redis://host:port/db")
    gw = defaults(GatewayConfig)
    add_flag(p, "--image-url-ttl", env="MGM_IMAGE_URL_TTL", type=float, default=d.image_url_ttl_s,
             shown_default=f"{gw.image_store_ttl_s:g}", help="seconds a response_format=url image stays downloadable")
    add_flag(p, "--max-edit-images", env="MGM_MAX_EDIT_IMAGES", type=int, default=d.max_edit_images,
             shown_default=str(gw.max_edit_images), help="input images one /v1/images/edits request may carry "
             "(the tiny engine takes 4 images a prompt)")
    add_flag(p, "--cache-dir", env="MGM_CACHE_DIR", type=Path, default=d.cache_dir,
             help="tiny checkpoints and logs live here")
    add_flag(p, "--logs-dir", env="MGM_LOGS_DIR", type=Path, default=d.logs_dir, shown_default="<cache-dir>/logs",
             help="children's log files")
    add_flag(p, "--ready-timeout", env="MGM_READY_TIMEOUT", type=float, default=d.ready_timeout_s,
             help="seconds to wait for every child to be ready")
    add_flag(p, "--stop-timeout", env="MGM_STOP_TIMEOUT", type=float, default=d.stop_timeout_s,
             help="seconds children get to stop after SIGTERM before SIGKILL, per stage (the gateway, then the "
             "engines and workers)")
    p.set_defaults(handler=run_serve, accepts_passthrough=True)


def serve_config(args: argparse.Namespace) -> ServeConfig:
    return ServeConfig(
        model=args.model, image_model=args.image_model, host=args.host, port=args.port, engines=args.engines,
        sdxl_workers=args.sdxl_workers, api_keys=tuple(args.api_key), model_name=args.model_name,
        routing=args.routing,
        image_store=args.image_store, image_url_ttl_s=args.image_url_ttl, max_edit_images=args.max_edit_images,
        cache_dir=args.cache_dir, logs_dir=args.logs_dir, ready_timeout_s=args.ready_timeout,
        stop_timeout_s=args.stop_timeout, log_level=args.log_level, log_format=args.log_format,
        vllm_args=tuple(vllm_args(args.passthrough)))


# --- plan -----------------------------------------------------------------------------------------------------------


def _module_argv(config: ServeConfig, *rest: str) -> list[str]:
    return [sys.executable, "-m", "server", "--log-level", config.log_level, "--log-format", config.log_format, *rest]


def vllm_args(passthrough: Sequence[str]) -> list[str]:
    """Extra vLLM arguments: everything unknown to serve, with the first ``--`` separator dropped."""
    extra = list(passthrough)
    if "--" in extra:
        extra.remove("--")
    return extra


def plan_children(config: ServeConfig, model: Path, image_model: Path | None, extra_vllm: Sequence[str],
                  logs: Path) -> list[Child]:
    """Engines, then workers, then the gateway, each on its own port (engines and workers on free loopback ports)."""
    children = []
    n_workers = config.sdxl_workers if image_model is not None else 0
    ports = iter(free_ports(config.engines + n_workers, exclude=[config.port]))
    for i in range(config.engines):
        port = next(ports)
        children.append(Child(f"engine-{i}", _module_argv(
            config, "engine", "--model", str(model), "--host", "127.0.0.1", "--port", str(port), *extra_vllm),
            logs / f"engine-{i}.log", ready_url=f"http://127.0.0.1:{port}/health"))
    for i in range(n_workers):
        port = next(ports)
        children.append(Child(f"sdxl-worker-{i}", _module_argv(
            config, "sdxl-worker", "--model", str(image_model), "--host", "127.0.0.1", "--port", str(port)),
            logs / f"sdxl-worker-{i}.log", ready_url=f"http://127.0.0.1:{port}/ready"))
    gateway = _module_argv(config, "gateway", "--host", config.host, "--port", str(config.port))
    for child in children:
        flag = "--engine" if child.name.startswith("engine") else "--sdxl-worker"
        gateway += [flag, child.ready_url.rsplit("/", 1)[0]]  # type: ignore[union-attr]
    if config.image_url_ttl_s is not None:
        gateway += ["--image-url-ttl", repr(config.image_url_ttl_s)]
    if config.max_edit_images is not None:
        gateway += ["--max-edit-images", str(config.max_edit_images)]
    if config.model_name:
        gateway += ["--model-name", config.model_name]
    gateway += ["--routing", config.routing]
    children.append(Child("gateway", gateway, logs / "gateway.log", ready_url=f"{_base(config)}/ready"))
    return children


def gateway_env(config: ServeConfig) -> dict[str, str]:
    """Settings that go to the gateway in its environment, never on its command line (they may hold secrets)."""
    env = {"MGM_API_KEYS": ",".join(config.api_keys)} if config.api_keys else {}
    if config.image_store:
        env["MGM_IMAGE_STORE"] = config.image_store
    return env


def _base(config: ServeConfig) -> str:
    host = config.host if config.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    return f"http://{'[' + host + ']' if ':' in host else host}:{config.port}"


# --- run ------------------------------------------------------------------------------------------------------------


def stop_stages(children: Sequence[Child]) -> list[list[Child]]:
    """The order children stop in: the gateway first (its drain needs the engines), then everything else."""
    return [[c for c in children if c.name == "gateway"], [c for c in children if c.name != "gateway"]]


def pool_complete(ready: object, engines: Sequence[str], workers: Sequence[str]) -> bool:
    """True when a gateway ``/ready`` body lists every engine URL in ``engines`` and every worker URL in ``workers``
    as up. Entries without a ``url`` (a gateway that hides addresses) are counted instead."""
    if not isinstance(ready, dict) or ready.get("status") != "ready":
        return False

    def complete(entries: object, urls: Sequence[str]) -> bool:
        if not urls:
            return True
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            return False
        up = [e for e in entries if e.get("up") is True]
        if all("url" in e for e in entries):
            return set(urls) <= {str(e["url"]).rstrip("/") for e in up}
        return len(up) >= len(urls)

    return complete(ready.get("engines"), engines) and complete(ready.get("workers"), workers)


def gateway_pool_check(gateway: Child, engines: Sequence[str], workers: Sequence[str],
                       key: str | None) -> Callable[[], bool]:
    """A ``ready_check`` for the gateway: ``GET /ready`` (with the key, should the gateway want one) answers 200 and
    lists every backend up."""
    import json
    import urllib.error
    import urllib.request

    def check() -> bool:
        assert gateway.ready_url is not None
        request = urllib.request.Request(gateway.ready_url, headers={"Authorization": f"Bearer {key}"} if key else {})
        try:
            with urllib.request.urlopen(request, timeout=2) as r:
                body = json.loads(r.read()) if r.status == 200 else None
        except (urllib.error.URLError, OSError, ValueError):
            return False
        return pool_complete(body, engines, workers)

    return check


class _Stop:
    """SIGINT/SIGTERM/SIGHUP → ``event``; a second signal SIGKILLs every child group at once."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.children: list[Child] = []
        self.signum: int | None = None
        self.watchdog = Watchdog()

    def __call__(self, signum: int, _frame: object) -> None:
        if self.event.is_set():
            logger.warning("second signal: killing every child now")
            kill_children(self.children)
            return
        self.signum = signum
        self.event.set()


def _build(kind: str, out: Path, config: ServeConfig, stop: _Stop) -> bool:
    """Build a tiny checkpoint into a scratch directory next to ``out`` and rename it into place (an interrupted
    build leaves no half checkpoint behind)."""
    scratch = out.with_name(f"{out.name}.partial-{os.getpid()}")
    child = Child(f"{kind}-build", _module_argv(config, kind, str(scratch), "--force"), config.logs / f"{kind}.log")
    logger.info("building the tiny checkpoint", extra={"fields": {"out": str(out), "log": str(child.log)}})
    stop.children[:] = [child]
    child.start(env={**os.environ, "PYTHONUNBUFFERED": "1"})
    stop.watchdog.watch(child)
    while child.poll() is None:  # a build takes seconds; a signal stops it
        if stop.event.wait(0.2):
            stop_children([child], timeout=5, kill_timeout=5)
            return False
    if child.poll() != 0:
        logger.error("building the tiny checkpoint failed", extra={"fields": {
            "out": str(out), "exit": child.poll(), "log": str(child.log), "tail": child.log_tail(5)}})
        return False
    scratch.rename(out)
    return True


def _tiny(kind: str, out: Path, marker: str, config: ServeConfig, stop: _Stop) -> Path | None:
    if not (out / marker).is_file() and not _build(kind, out, config, stop):
        return None
    return out


def _checkpoint(given: Path | None, kind: str, tiny: Path, marker: str, what: str, config: ServeConfig,
                stop: _Stop, random_weights: list[str]) -> tuple[Path | None, int]:
    """The directory to serve: ``given`` when it holds ``marker``, else the tiny one (built when missing, noted in
    ``random_weights``). (None, exit status) when there is nothing to serve."""
    if given is None:
        built = _tiny(kind, tiny, marker, config, stop)
        if built is None:
            return None, 0 if stop.event.is_set() else 1
        random_weights.append(str(built))
        return built, 0
    if not (given / marker).is_file():
        logger.error(f"not a {what} directory (no {marker})", extra={"fields": {"path": str(given)}})
        return None, 2
    return given, 0


def _port_problem(host: str, port: int) -> str | None:
    """Why the gateway could not bind ``host:port`` (None when it can), checked before anything starts."""
    import socket

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            s.bind(addr)
    except OSError as exc:
        return str(exc)
    return None


def run_serve(args: argparse.Namespace) -> int:
    config = serve_config(args)
    if config.engines < 1 or config.sdxl_workers < 0:
        logger.error("need --engines >= 1 and --sdxl-workers >= 0",
                     extra={"fields": {"engines": config.engines, "sdxl_workers": config.sdxl_workers}})
        return 2
    if not 0 < config.port < 65536:
        logger.error("invalid --port", extra={"fields": {"port": config.port}})
        return 2
    problem = _port_problem(config.host, config.port)
    if problem:
        logger.error("the gateway cannot listen there", extra={"fields": {
            "host": config.host, "port": config.port, "error": problem}})
        return 2
    config.logs.mkdir(parents=True, exist_ok=True)
    lock = _lock_logs(config)
    if lock is None:
        return 2
    stop = _Stop()
    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    stop.watchdog.grace_s = min(config.stop_timeout_s, 5.0)
    stop.watchdog.start()
    try:
        return _serve(config, stop)
    finally:
        if stop.children:
            clean = stop_in_order(stop_stages(stop.children), timeout=config.stop_timeout_s)
            logger.info("every child stopped", extra={"fields": {"clean": clean, "exits": ",".join(
                f"{c.name}={c.poll()}" for c in stop.children if c.proc is not None)}})
        stop.watchdog.release()
        for s, handler in previous.items():
            signal.signal(s, handler)
        lock.close()


def _lock_logs(config: ServeConfig):  # type: ignore[no-untyped-def]
    """Hold ``<logs>/serve.lock`` (flock: released by the kernel however this process ends) so that two instances
    never write the same log files; None (after a clear message) when another instance holds it."""
    import fcntl

    path = config.logs / LOCK_NAME
    fh = open(path, "a+")  # noqa: SIM115  # held open for the instance's life; not truncated before it is ours
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        holder = fh.read().strip() or "unknown"
        fh.close()
        logger.error("another mgm serve is running with these log files; stop it, or give this one its own "
                     "--logs-dir (or --cache-dir)", extra={"fields": {"logs": str(config.logs), "holder": holder}})
        return None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid={os.getpid()} port={config.port}\n")
    fh.flush()
    return fh


def _serve(config: ServeConfig, stop: _Stop) -> int:
    random_weights: list[str] = []
    cache, logs = config.cache_dir, config.logs
    model, status = _checkpoint(config.model, "build-tiny", cache / "tiny-mgm", "config.json", "checkpoint",
                                config, stop, random_weights)
    if model is None:
        return status
    image_model = None
    if config.sdxl_workers > 0:
        image_model, status = _checkpoint(config.image_model, "build-tiny-sdxl", cache / "tiny-sdxl",
                                          "model_index.json", "diffusers pipeline", config, stop, random_weights)
        if image_model is None:
            return status
    if random_weights:
        logger.warning("serving tiny checkpoints with RANDOM weights: chat answers are gibberish and images are "
                       "noise, by design; pass --model / --image-model for real ones",
                       extra={"fields": {"checkpoints": ",".join(random_weights)}})
    extra = list(config.vllm_args)
    if config.model is None:  # the tiny defaults, unless the same flag was given
        for flag, value in zip(TINY_VLLM_ARGS[::2], TINY_VLLM_ARGS[1::2]):
            if not any(a == flag or a.startswith(flag + "=") for a in extra):
                extra += [flag, value]

    keys = config.api_keys
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for name in ("MGM_API_KEYS", "MGM_IMAGE_STORE"):  # the gateway gets what serve resolved, nothing else
        env.pop(name, None)
    for attempt in range(1, PORT_ATTEMPTS + 1):
        children = plan_children(config, model, image_model, extra, logs)
        gateway = children[-1]
        backends = [c.ready_url.rsplit("/", 1)[0] for c in children[:-1]]  # type: ignore[union-attr]
        gateway.ready_check = gateway_pool_check(
            gateway, [u for u, c in zip(backends, children) if c.name.startswith("engine")],
            [u for u, c in zip(backends, children) if not c.name.startswith("engine")], keys[0] if keys else None)
        stop.children[:] = children
        for child in children:
            child_env = env if child.name != "gateway" else {**env, **gateway_env(config)}
            child.start(env=child_env)
            stop.watchdog.watch(child)
            logger.info("started", extra={"fields": {"child": child.name, "pid": child.pid, "log": str(child.log)}})
        logger.info("children's logs", extra={"fields": {"dir": str(logs)}})

        ready = _wait_ready(children, stop, config.ready_timeout_s, retry_port=attempt < PORT_ATTEMPTS)
        if ready == _RETRY:
            stop_in_order(stop_stages(children), timeout=config.stop_timeout_s)
            continue
        if ready is not None:
            return ready
        break
    logger.info(POOL_COMPLETE, extra={"fields": {"engines": config.engines, "workers": len(children) - 1 - config.engines}})
    base = _base(config)
    chat_model = _chat_model(base, keys[0] if keys else None) or str(model)
    # the gateway's default, from the same variable
    image_name = os.environ.get("MGM_IMAGE_MODEL_NAME") or defaults(GatewayConfig).image_model_name
    image_note = f", image model '{image_name}' ({config.sdxl_workers} SDXL worker(s))" if image_model is not None \
        else ", no image generation"
    print(f"\n{READY_PREFIX}{base}/v1 — OpenAI-compatible; chat model '{chat_model}' ({config.engines} engine(s))"
          f"{image_note}; logs in {logs}/", flush=True)
    if keys:
        print("Authentication is on: set MGM_API_KEY to one of the keys for the example.", flush=True)
    print(f"\n{chat_curl(base, chat_model, auth_env='MGM_API_KEY' if keys else None)}\n", flush=True)
    print(f"Playground (in a browser): {base}/\n", flush=True)
    return _supervise(children, stop)


def _chat_model(base: str, key: str | None) -> str | None:
    """The first model id the gateway lists: the chat alias when one is set, else the engine's id (the image model
    comes last)."""
    import json
    import urllib.request

    request = urllib.request.Request(f"{base}/v1/models", headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            ids = [m["id"] for m in json.loads(r.read())["data"]]
    except (OSError, ValueError, KeyError):
        return None
    return ids[0] if ids else None


def _dead(children: Sequence[Child]) -> Child | None:
    return next((c for c in children if c.poll() is not None), None)


def _report_death(child: Child) -> int:
    logger.error("a child exited unexpectedly; stopping everything", extra={"fields": {
        "child": child.name, "exit": child.poll(), "log": str(child.log)}})
    tail = child.log_tail(15)
    if tail:
        print(f"--- last lines of {child.log} ---\n{tail}", file=sys.stderr, flush=True)
    return 1


#: :func:`_wait_ready`'s answer when a child lost its port: start again on new ports.
_RETRY = -1


def _wait_ready(children: Sequence[Child], stop: _Stop, timeout: float, retry_port: bool = False) -> int | None:
    """Poll every child's readiness route until all answer (the gateway: until its pool holds every backend); None
    when ready, :data:`_RETRY` when an engine or worker lost its port (``retry_port``), else the exit status."""
    from rich.console import Console

    console = Console(stderr=True)
    start = time.monotonic()

    def line() -> str:
        parts = [f"{c.name} {'[green]ready[/] ' + format(c.ready_after_s, '.0f') + ' s' if c.ready else '…'}"
                 for c in children]
        return f"waiting for the stack ({time.monotonic() - start:.0f} s): " + " · ".join(parts)

    status = console.status(line()) if console.is_terminal else None
    if status is not None:
        status.start()
    try:
        while True:  # bounded by the timeout and the signal
            if stop.event.is_set():
                logger.info("stopping before the stack was ready")
                return 0
            dead = _dead(children)
            if dead is not None and retry_port and dead.name != "gateway" and dead.address_in_use():
                logger.warning("a child lost its port to another process before binding it: starting again on new "
                               "ports", extra={"fields": {"child": dead.name, "log": str(dead.log)}})
                return _RETRY
            if dead is not None:
                return _report_death(dead)
            for child in children:
                if not child.ready and child.check_ready():
                    msg = f"{child.name} ready after {child.ready_after_s:.1f} s"
                    if status is not None:
                        console.print(f"[green]✓[/] {msg}", highlight=False)
                    else:
                        logger.info(msg)
            if all(c.ready for c in children):
                return None
            if time.monotonic() - start > timeout:
                logger.error("the stack was not ready in time", extra={"fields": {
                    "timeout_s": timeout, "waiting_for": ",".join(c.name for c in children if not c.ready)}})
                return 1
            if status is not None:
                status.update(line())
            stop.event.wait(0.5)
    finally:
        if status is not None:
            status.stop()


def _supervise(children: Sequence[Child], stop: _Stop) -> int:
    while not stop.event.wait(0.5):  # until a signal
        dead = _dead(children)
        if dead is not None:
            return _report_death(dead)
    logger.info("stopping", extra={"fields": {"signal": signal.Signals(stop.signum or signal.SIGTERM).name}})
    return 0
