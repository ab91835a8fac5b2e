"""The engine pool: least-in-flight routing, marking engines down on connection failures, background re-probes, and
(with ``discover_interval_s > 0``) DNS discovery of the engines behind a name (:mod:`server.gateway.discovery`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from server.gateway.backends import Backend, BackendPool
from server.gateway.discovery import Resolve

logger = logging.getLogger("mgm.gateway.routing")


@dataclass(eq=False)
class Engine(Backend):
    models: tuple[str, ...] = ()  # model ids from its /v1/models, learnt on the first successful probe


class EnginePool(BackendPool[Engine]):
    """Engines behind the gateway. ``pick`` chooses the up engine with the fewest requests in flight (ties: the
    first listed); ``mark_down`` takes an engine out of rotation and re-probes it every ``probe_interval_s`` until
    it answers ``/health`` again.

    With ``discover_interval_s > 0`` the URLs are re-resolved that often (``resolve``: the gateway's resolver):
    engines whose address appears are added and probed, engines whose address is gone leave the rotation (requests
    already on them finish). ``probe_all`` does the first resolution.

    ``on_change`` hears every probe result and mark-down of an engine still in the pool; ``on_remove`` hears each
    engine discovery drops."""

    noun = "engine"
    log_field = "engine"

    def __init__(self, urls: tuple[str, ...], client: httpx.AsyncClient, *, probe_interval_s: float = 2.0,
                 probe_timeout_s: float = 2.0, on_change: Callable[[Engine], None] | None = None,
                 discover_interval_s: float = 0.0, resolve: Resolve | None = None,
                 on_remove: Callable[[Engine], None] | None = None) -> None:
        super().__init__(urls, Engine, logger, probe_interval_s=probe_interval_s,
                         discover_interval_s=discover_interval_s, resolve=resolve)
        self.client = client
        self.probe_timeout_s = probe_timeout_s
        self.on_change = on_change or (lambda _e: None)
        self.on_remove = on_remove or (lambda _e: None)

    @property
    def engines(self) -> list[Engine]:
        return self.backends

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

    def _set(self, engine: Engine, up: bool) -> None:
        if self._record(engine, up):  # an engine removed by discovery reports nothing more
            self.on_change(engine)

    def mark_down(self, engine: Engine, reason: str) -> None:
        self._log_mark_down(engine, reason)
        self._set(engine, False)
        self._start_reprobe(engine)

    async def _on_removed(self, removed: list[Engine]) -> None:
        for engine in removed:
            self.on_remove(engine)

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
