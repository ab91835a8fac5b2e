"""What the engine pool and the SDXL worker pool share: a list of backends, each probed until it is up, re-probed in
the background while it is down, and (with ``discover_interval_s > 0``) kept in step with DNS
(:mod:`server.gateway.discovery`). Each pool adds its own probe, routing and bookkeeping on top.

**Health of up backends.** Every ``health_interval_s`` (:data:`HEALTH_INTERVAL_S`) a background task probes each up
backend; one that fails :data:`HEALTH_FAILURES` probes in a row is marked down (and re-probed until it is back). This
is the state ``/ready`` reports: the route never probes, so a flood of ``/ready`` calls costs the backends nothing and
cannot mark them down."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from server.gateway.discovery import BackendDiscovery, Resolve, reconcile

#: How often up backends are health-probed in the background by default (``GatewayConfig.health_interval_s``).
HEALTH_INTERVAL_S = 5.0
#: Failed background probes in a row that take an up backend out of rotation (one slow answer is not enough).
HEALTH_FAILURES = 2


@dataclass(eq=False)
class Backend:
    """One backend URL and its state; ``eq=False`` so backends hash by identity (sets of tried backends)."""

    url: str
    up: bool = False
    in_flight: int = 0
    health_failures: int = 0  # failed background health probes in a row (reset by any successful probe)
    probe_task: asyncio.Task[None] | None = field(default=None, repr=False)


B = TypeVar("B", bound=Backend)


class BackendPool(Generic[B]):
    """The backends behind one kind of upstream. Subclasses implement :meth:`check` (one health check, nothing
    recorded), :meth:`probe` (a check whose result is recorded with :meth:`_record`) and :meth:`_health_failed` (take
    an up backend out of rotation), and may override :meth:`_on_removed`; ``noun`` and ``log_field`` name a backend
    in logs."""

    noun = "backend"  # in log messages: "<noun> up", "<noun> discovered", …
    log_field = "backend"  # the log field that carries a backend's URL

    def __init__(self, urls: tuple[str, ...], make: Callable[[str], B], logger: logging.Logger, *,
                 probe_interval_s: float, discover_interval_s: float, resolve: Resolve | None,
                 health_interval_s: float | None = None) -> None:
        self.backends: list[B] = [make(u.rstrip("/")) for u in urls]
        self.probe_interval_s = probe_interval_s
        self.health_interval_s = HEALTH_INTERVAL_S if health_interval_s is None else health_interval_s
        self._health_task: asyncio.Task[None] | None = None
        self.discover_interval_s = discover_interval_s
        self._make = make
        self._log = logger
        self._closed = False
        self._discovery: BackendDiscovery | None = None
        self._discover_task: asyncio.Task[None] | None = None
        if discover_interval_s > 0:
            if resolve is None:
                from server.gateway.image_fetch import system_resolver as resolve
            self._discovery = BackendDiscovery(urls, resolve)
            self.backends = []  # filled by the first refresh()

    async def check(self, backend: B) -> bool:
        """One health check (may refresh what the backend reports about itself); records nothing."""
        raise NotImplementedError

    async def probe(self, backend: B) -> bool:
        """One health check; records the result (:meth:`_record`) and returns it."""
        raise NotImplementedError

    async def _health_failed(self, backend: B) -> None:
        """An up backend failed :data:`HEALTH_FAILURES` background probes in a row: mark it down."""
        raise NotImplementedError

    @property
    def any_up(self) -> bool:
        return any(b.up for b in self.backends)

    # --- probing ---------------------------------------------------------------------------------------------------

    async def probe_all(self) -> None:
        """Probe every backend at startup (with discovery: resolve first, then keep re-resolving in the background);
        those that are down get re-probed until they answer, those that are up get health-probed in the background."""
        if self._health_task is None and not self._closed and self.health_interval_s > 0:
            self._health_task = asyncio.get_running_loop().create_task(self._health_loop())
        if self._discovery is None:
            await self._probe_new(self.backends)
            return
        await self.refresh()  # probes what it finds
        if self._discover_task is None and not self._closed:
            self._discover_task = asyncio.get_running_loop().create_task(self._discover_loop())

    async def _probe_new(self, backends: list[B]) -> None:
        await asyncio.gather(*(self.probe(b) for b in backends))
        for backend in backends:
            if not backend.up:
                self._start_reprobe(backend)

    def _record(self, backend: B, up: bool) -> bool:
        """Set ``backend.up`` (logging a change); False when discovery already dropped it, so the caller reports
        nothing more about it."""
        if backend.up != up:
            self._log.log(logging.INFO if up else logging.WARNING, "%s %s", self.noun, "up" if up else "down",
                          extra={"fields": {self.log_field: backend.url}})
        backend.up = up
        if up:
            backend.health_failures = 0
        return backend in self.backends

    def _log_mark_down(self, backend: B, reason: str) -> None:
        if backend.up:
            self._log.warning("marking %s down", self.noun,
                              extra={"fields": {self.log_field: backend.url, "reason": reason}})

    def _start_reprobe(self, backend: B) -> None:
        if self._closed or (backend.probe_task is not None and not backend.probe_task.done()):
            return
        if backend not in self.backends:  # removed by discovery while a request on it failed: nothing to wait for
            return
        backend.probe_task = asyncio.get_running_loop().create_task(self._reprobe(backend))

    async def _reprobe(self, backend: B) -> None:
        while not self._closed and not backend.up:  # ends when the backend is back or the pool closes
            await asyncio.sleep(self.probe_interval_s)
            if not self._closed:
                await self.probe(backend)

    async def _health_loop(self) -> None:
        while not self._closed:  # ends when the pool closes
            await asyncio.sleep(self.health_interval_s)
            try:
                await asyncio.gather(*(self._health_check(b) for b in list(self.backends) if b.up))
            except Exception:  # a bug here must not stop health probing for good
                self._log.exception("%s health probe failed", self.noun)

    async def _health_check(self, backend: B) -> None:
        if await self.check(backend):
            backend.health_failures = 0
            return
        backend.health_failures += 1
        if backend.health_failures >= HEALTH_FAILURES and backend.up and backend in self.backends and not self._closed:
            await self._health_failed(backend)

    # --- discovery -------------------------------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Re-resolve the configured names; add (and probe) new backends, drop vanished ones."""
        assert self._discovery is not None
        urls = await self._discovery.resolve()
        if self._closed:
            return
        self.backends, added, removed = reconcile(self.backends, urls, self._make)
        for backend in removed:
            self._log.info("%s removed (no longer in DNS)", self.noun,
                           extra={"fields": {self.log_field: backend.url}})
            if backend.probe_task is not None:
                backend.probe_task.cancel()
            backend.up = False
        for backend in added:
            self._log.info("%s discovered", self.noun, extra={"fields": {self.log_field: backend.url}})
        if removed:
            await self._on_removed(removed)
        await self._probe_new(added)

    async def _on_removed(self, removed: list[B]) -> None:
        """Called after discovery dropped ``removed`` (already out of the pool and marked down)."""

    async def _discover_loop(self) -> None:
        while not self._closed:  # ends when the pool closes
            await asyncio.sleep(self.discover_interval_s)
            try:
                await self.refresh()
            except Exception:  # a bug here must not stop discovery for good
                self._log.exception("%s discovery failed", self.noun)

    async def close(self) -> None:
        self._closed = True
        tasks = [b.probe_task for b in self.backends if b.probe_task is not None]
        if self._discover_task is not None:
            tasks.append(self._discover_task)
        if self._health_task is not None:
            tasks.append(self._health_task)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
