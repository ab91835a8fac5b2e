"""The engine pool: least-in-flight routing, marking engines down on connection failures, background re-probes, and
(with ``discover_interval_s > 0``) DNS discovery of the engines behind a name (:mod:`server.gateway.discovery`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from server.gateway.discovery import BackendDiscovery, Resolve, reconcile

logger = logging.getLogger("mgm.gateway.routing")


@dataclass(eq=False)
class Engine:
    url: str
    up: bool = False
    in_flight: int = 0
    models: tuple[str, ...] = ()
    probe_task: asyncio.Task[None] | None = field(default=None, repr=False)


class EnginePool:
    """Engines behind the gateway. ``pick`` chooses the up engine with the fewest requests in flight (ties: the
    first listed); ``mark_down`` takes an engine out of rotation and re-probes it every ``probe_interval_s`` until
    it answers ``/health`` again.

    With ``discover_interval_s > 0`` the URLs are re-resolved that often (``resolve``: the gateway's resolver):
    engines whose address appears are added and probed, engines whose address is gone leave the rotation (requests
    already on them finish). ``probe_all`` does the first resolution."""

    def __init__(self, urls: tuple[str, ...], client: httpx.AsyncClient, *, probe_interval_s: float = 2.0,
                 probe_timeout_s: float = 2.0, on_change: Callable[[Engine], None] | None = None,
                 discover_interval_s: float = 0.0, resolve: Resolve | None = None,
                 on_remove: Callable[[Engine], None] | None = None) -> None:
        self.engines = [Engine(u.rstrip("/")) for u in urls]
        self.client = client
        self.probe_interval_s = probe_interval_s
        self.probe_timeout_s = probe_timeout_s
        self.on_change = on_change or (lambda _e: None)
        self.on_remove = on_remove or (lambda _e: None)
        self._closed = False
        self.discover_interval_s = discover_interval_s
        self._discovery: BackendDiscovery | None = None
        self._discover_task: asyncio.Task[None] | None = None
        if discover_interval_s > 0:
            if resolve is None:
                from server.gateway.images import system_resolver as resolve
            self._discovery = BackendDiscovery(urls, resolve)
            self.engines = []  # filled by the first refresh()

    # --- probing ---------------------------------------------------------------------------------------------------

    async def probe(self, engine: Engine) -> bool:
        """One health check; on success also learns the engine's model ids. Updates ``engine.up``."""
        try:
            r = await self.client.get(engine.url + "/health", timeout=self.probe_timeout_s)
            ok = r.status_code == 200
            if ok and not engine.models:
                m = await self.client.get(engine.url + "/v1/models", timeout=self.probe_timeout_s)
                if m.status_code == 200:
                    engine.models = tuple(str(d["id"]) for d in m.json().get("data", []) if "id" in d)
        except (httpx.HTTPError, ValueError, KeyError):
            ok = False
        self._set(engine, ok)
        return ok

    async def probe_all(self) -> None:
        if self._discovery is not None:
            await self.refresh()  # probes what it finds
            if self._discover_task is None and not self._closed:
                self._discover_task = asyncio.get_running_loop().create_task(self._discover_loop())
            return
        await self._probe_new(self.engines)

    async def _probe_new(self, engines: list[Engine]) -> None:
        await asyncio.gather(*(self.probe(e) for e in engines))
        for engine in engines:
            if not engine.up:
                self._start_reprobe(engine)

    # --- discovery -------------------------------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Re-resolve the configured names; add (and probe) new engines, drop vanished ones."""
        assert self._discovery is not None
        urls = await self._discovery.resolve()
        if self._closed:
            return
        self.engines, added, removed = reconcile(self.engines, urls, Engine)
        for engine in removed:
            logger.info("engine removed (no longer in DNS)", extra={"fields": {"engine": engine.url}})
            if engine.probe_task is not None:
                engine.probe_task.cancel()
            engine.up = False
            self.on_remove(engine)
        for engine in added:
            logger.info("engine discovered", extra={"fields": {"engine": engine.url}})
        await self._probe_new(added)

    async def _discover_loop(self) -> None:
        while not self._closed:  # ends when the pool closes
            await asyncio.sleep(self.discover_interval_s)
            try:
                await self.refresh()
            except Exception:  # a bug here must not stop discovery for good
                logger.exception("engine discovery failed")

    def _set(self, engine: Engine, up: bool) -> None:
        if engine.up != up:
            logger.log(logging.INFO if up else logging.WARNING, "engine %s", "up" if up else "down",
                       extra={"fields": {"engine": engine.url}})
        engine.up = up
        if engine in self.engines:  # an engine removed by discovery reports nothing more
            self.on_change(engine)

    def mark_down(self, engine: Engine, reason: str) -> None:
        if engine.up:
            logger.warning("marking engine down", extra={"fields": {"engine": engine.url, "reason": reason}})
        self._set(engine, False)
        self._start_reprobe(engine)

    def _start_reprobe(self, engine: Engine) -> None:
        if self._closed or (engine.probe_task is not None and not engine.probe_task.done()):
            return
        if engine not in self.engines:  # removed by discovery while a request on it failed: nothing to wait for
            return
        engine.probe_task = asyncio.get_running_loop().create_task(self._reprobe(engine))

    async def _reprobe(self, engine: Engine) -> None:
        while not self._closed and not engine.up:  # ends when the engine is back or the pool closes
            await asyncio.sleep(self.probe_interval_s)
            if not self._closed:
                await self.probe(engine)

    async def close(self) -> None:
        self._closed = True
        tasks = [e.probe_task for e in self.engines if e.probe_task is not None]
        if self._discover_task is not None:
            tasks.append(self._discover_task)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # --- routing ---------------------------------------------------------------------------------------------------

    def pick(self, exclude: set[Engine] | frozenset[Engine] = frozenset()) -> Engine | None:
        candidates = [e for e in self.engines if e.up and e not in exclude]
        return min(candidates, key=lambda e: e.in_flight) if candidates else None

    def models(self) -> list[str]:
        seen: dict[str, None] = {}
        for engine in self.engines:
            for m in engine.models:
                seen[m] = None
        return list(seen)

    @property
    def any_up(self) -> bool:
        return any(e.up for e in self.engines)
