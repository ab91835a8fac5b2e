"""The engine pool: affinity or least-in-flight routing through leases (server.gateway.routing), marking engines down on connection failures, background
re-probes, and (with ``discover_interval_s > 0``) DNS discovery of the engines behind a name
(:mod:`server.gateway.discovery`). The pool owns each engine's in-flight count and its gauges
(``mgm_gateway_engine_up``, ``mgm_gateway_engine_in_flight``), as the SDXL pool does for its workers.

**Error back-off.** An engine that answers fast with 5xx stays up (its ``/health`` is fine) and, being the least
loaded, would get the most traffic. So the pool counts each engine's consecutive 5xx answers (:meth:`answered`; any
other answer resets the count): after ``error_threshold`` in a row (``--engine-error-threshold``) the engine cools
down for ``cooldown_s`` seconds (``--engine-cooldown``), during which ``pick`` skips it while another up engine is left (if every candidate is
cooling down, the least loaded of them is used: a possibly failing answer beats none). Each cool-down counts in
``mgm_gateway_engine_backoffs``."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import httpx

from server.gateway.backends import Backend, BackendPool
from server.gateway.discovery import Resolve
from server.gateway.metrics import GatewayMetrics
from server.gateway.routing import ROUTING_OUTCOMES, HashRing, bounded_choice

logger = logging.getLogger("mgm.gateway.routing")

#: Defaults: consecutive 5xx answers after which an engine cools down, and for how long (seconds).
ERROR_THRESHOLD = 3
COOLDOWN_S = 5.0


@dataclass(eq=False)
class Engine(Backend):
    models: tuple[str, ...] = ()  # model ids from its /v1/models, learnt on the first successful probe
    max_model_len: int | None = None  # its context in tokens (vLLM's model card field), learnt with the ids
    errors: int = 0  # consecutive 5xx answers
    cooldown_until: float = 0.0  # time.monotonic() until which pick() prefers other engines


class EnginePool(BackendPool[Engine]):
    """Engines behind the gateway. ``pick`` chooses the up engine with the fewest requests in flight (ties: the
    first listed); ``mark_down`` takes an engine out of rotation and re-probes it every ``probe_interval_s`` until
    it answers ``/health`` again.

    With ``discover_interval_s > 0`` the URLs are re-resolved that often (``resolve``: the gateway's resolver):
    engines whose address appears are added and probed, engines whose address is gone leave the rotation (requests
    already on them finish). ``probe_all`` does the first resolution.

    A request holds an :class:`EngineLease` while it uses an engine: the lease counts it in flight and releases it
    exactly once. Without ``metrics`` (unit tests of routing) no gauges are kept."""

    noun = "engine"
    log_field = "engine"

    def __init__(self, urls: tuple[str, ...], client: httpx.AsyncClient, metrics: GatewayMetrics | None = None, *,
                 probe_interval_s: float = 2.0, probe_timeout_s: float = 2.0, discover_interval_s: float = 0.0,
                 resolve: Resolve | None = None, health_interval_s: float | None = None,
                 error_threshold: int = ERROR_THRESHOLD, cooldown_s: float = COOLDOWN_S, routing: str = "affinity",
                 routing_epsilon: float = 0.5) -> None:
        super().__init__(urls, Engine, logger, probe_interval_s=probe_interval_s,
                         discover_interval_s=discover_interval_s, resolve=resolve,
                         health_interval_s=health_interval_s)
        self.client = client
        self.metrics = metrics
        self.probe_timeout_s = probe_timeout_s
        self.error_threshold, self.cooldown_s = error_threshold, cooldown_s
        self.routing, self.routing_epsilon, self.ring = routing, routing_epsilon, HashRing()

    @property
    def engines(self) -> list[Engine]:
        return self.backends

    async def check(self, engine: Engine) -> bool:
        """One health check; on success also learns the engine's model ids. Records nothing."""
        try:
            r = await self.client.get(engine.url + "/health", timeout=self.probe_timeout_s)
            ok = r.status_code == 200
            if ok and not engine.models:
                m = await self.client.get(engine.url + "/v1/models", timeout=self.probe_timeout_s)
                if m.status_code == 200:
                    cards = [d for d in m.json().get("data", []) if isinstance(d, dict) and "id" in d]
                    engine.models = tuple(str(d["id"]) for d in cards)
                    lengths = [d["max_model_len"] for d in cards if isinstance(d.get("max_model_len"), int)]
                    engine.max_model_len = min(lengths) if lengths else None
        except (httpx.HTTPError, ValueError, KeyError):
            ok = False
        return ok

    async def probe(self, engine: Engine) -> bool:
        """:meth:`check`, recorded in ``engine.up`` (and the gauges)."""
        ok = await self.check(engine)
        self._set(engine, ok)
        return ok

    async def _health_failed(self, engine: Engine) -> None:
        self.mark_down(engine, "health probe failed")

    def _set(self, engine: Engine, up: bool) -> None:
        if self._record(engine, up):  # an engine removed by discovery reports nothing more
            self._gauges(engine)

    def _gauges(self, engine: Engine) -> None:
        if self.metrics is not None and engine in self.engines:  # no series for a pod discovery already dropped
            self.metrics.engine_up.labels(engine.url).set(1 if engine.up else 0)
            self.metrics.engine_in_flight.labels(engine.url).set(engine.in_flight)

    def mark_down(self, engine: Engine, reason: str) -> None:
        self._log_mark_down(engine, reason)
        self._set(engine, False)
        self._start_reprobe(engine)

    async def _on_removed(self, removed: list[Engine]) -> None:
        if self.metrics is None:
            return
        for engine in removed:  # discovery dropped it: no stale per-engine series
            for gauge in (self.metrics.engine_up, self.metrics.engine_in_flight):
                with contextlib.suppress(KeyError):
                    gauge.remove(engine.url)
            for outcome in ROUTING_OUTCOMES:
                with contextlib.suppress(KeyError):
                    self.metrics.routing.remove(engine.url, outcome)

    # --- routing ---------------------------------------------------------------------------------------------------

    def pick(self, exclude: set[Engine] | frozenset[Engine] = frozenset(), key: str | None = None) -> Engine | None:
        """The engine for a request: by ``key`` on the ring under affinity routing (server.gateway.routing), else
        the least loaded; engines cooling down only when nothing else is up."""
        candidates = [e for e in self.engines if e.up and e not in exclude]
        now = time.monotonic()
        candidates = [e for e in candidates if e.cooldown_until <= now] or candidates  # module docstring: back-off
        if not candidates:
            return None
        if key is None or self.routing != "affinity":
            engine, outcome = min(candidates, key=lambda e: e.in_flight), "unkeyed"
        else:
            self.ring.sync(e.url for e in self.engines)  # every known engine: a mark-down moves no other key
            by_url = {e.url: e for e in candidates}
            url, hit = bounded_choice(self.ring, key, {u: e.in_flight for u, e in by_url.items()}, self.routing_epsilon)
            engine, outcome = by_url[url], "hit" if hit else "spill"
            logger.debug("routed", extra={"fields": {"key": key[:16], "engine": engine.url, "outcome": outcome}})
        if self.metrics is not None:
            self.metrics.routing.labels(engine.url, outcome).inc()
        return engine

    def answered(self, engine: Engine, status: int) -> None:
        """Record an engine's answer status for the error back-off (module docstring)."""
        if status < 500:
            engine.errors = 0
            return
        engine.errors += 1
        if engine.errors >= self.error_threshold:
            engine.errors = 0
            engine.cooldown_until = time.monotonic() + self.cooldown_s
            logger.warning("engine cooling down after repeated errors", extra={"fields": {
                "engine": engine.url, "status": status, "cooldown_s": self.cooldown_s}})
            if self.metrics is not None:
                self.metrics.engine_backoffs.inc()

    def lease(self, exclude: set[Engine] | frozenset[Engine] = frozenset(),
              key: str | None = None) -> EngineLease | None:
        """The engine :meth:`pick` chooses, counted in flight until the lease is released."""
        engine = self.pick(exclude, key)
        if engine is None:
            return None
        engine.in_flight += 1
        self._gauges(engine)
        return EngineLease(self, engine)

    def max_model_len(self) -> int | None:
        """The smallest context (tokens) any known engine serves; None while no engine has said."""
        return min((e.max_model_len for e in self.engines if e.max_model_len), default=None)

    def models(self) -> list[str]:
        seen: dict[str, None] = {}
        for engine in self.engines:
            for m in engine.models:
                seen[m] = None
        return list(seen)


class EngineLease:
    """One request's hold on an engine; :meth:`release` is idempotent, so every exit path may call it."""

    def __init__(self, pool: EnginePool, engine: Engine) -> None:
        self.pool, self.engine, self.released = pool, engine, False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.engine.in_flight -= 1
            self.pool._gauges(self.engine)
