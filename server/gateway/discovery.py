"""DNS discovery of backends (engines, SDXL workers) behind one name, e.g. a Kubernetes headless Service.

A configured URL whose host is a DNS name (``http://mgm-engine.ns.svc:8000``) stands for every address the name
resolves to: it is expanded into one backend URL per address (``http://10.1.2.3:8000``, …), re-resolved every
``interval_s`` seconds, so pods that appear or disappear join or leave the pool without a gateway restart. URLs
with an IP literal, and ``https`` URLs (whose certificate names the host, not the pod address), are used as given.

A name that does not exist (NXDOMAIN, no address: a headless Service with no ready pod) means no backend; any other
resolver failure (timeout, SERVFAIL) keeps the addresses last seen, so a DNS hiccup never empties a pool.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

logger = logging.getLogger("mgm.gateway.discovery")

#: ``(host, port) -> addresses`` (the signature of :func:`server.gateway.images.system_resolver`).
Resolve = Callable[[str, int], Awaitable[list[str]]]

#: getaddrinfo errors that mean "this name has no address" rather than "DNS did not answer".
_NOT_FOUND = {getattr(socket, n) for n in ("EAI_NONAME", "EAI_NODATA") if hasattr(socket, n)}


def host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if not parts.hostname:
        raise ValueError(f"URL has no host: {url!r}")
    return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


def discoverable(url: str) -> bool:
    """True for ``http`` URLs whose host is a DNS name (not an IP literal)."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        return False
    try:
        ipaddress.ip_address(parts.hostname)
    except ValueError:
        return True
    return False


def with_address(url: str, address: str) -> str:
    """``url`` with its host replaced by ``address`` (IPv6 in brackets), port, path and query kept."""
    parts = urlsplit(url)
    host = f"[{address}]" if ":" in address else address
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class BackendDiscovery:
    """Turns the configured URLs into the current list of backend URLs (see the module docstring)."""

    def __init__(self, urls: Sequence[str], resolve: Resolve) -> None:
        self.urls = tuple(u.rstrip("/") for u in urls)
        self._resolve = resolve
        self._last: dict[str, list[str]] = {}  # configured URL -> addresses last resolved

    async def _addresses(self, url: str) -> list[str]:
        host, port = host_port(url)
        try:
            found = await self._resolve(host, port)
        except socket.gaierror as exc:
            if exc.errno in _NOT_FOUND:
                found = []
            else:
                return self._kept(url, exc)
        except OSError as exc:
            return self._kept(url, exc)
        addresses = sorted(set(found), key=_address_key)
        if addresses != self._last.get(url):
            logger.info("backends resolved", extra={"fields": {"url": url, "addresses": ",".join(addresses)}})
        self._last[url] = addresses
        return addresses

    def _kept(self, url: str, exc: OSError) -> list[str]:
        kept = self._last.get(url, [])
        logger.warning("DNS lookup failed; keeping the addresses last seen", extra={"fields": {
            "url": url, "error": str(exc), "kept": ",".join(kept)}})
        return kept

    async def resolve(self) -> list[str]:
        """Backend URLs now, in configuration order (addresses sorted), without duplicates."""
        out: dict[str, None] = {}
        for url in self.urls:
            if discoverable(url):
                for address in await self._addresses(url):
                    out[with_address(url, address)] = None
            else:
                out[url] = None
        return list(out)


def _address_key(address: str) -> tuple[int, int]:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return (2, 0)
    return (ip.version, int(ip))


class HasURL(Protocol):
    url: str


B = TypeVar("B", bound=HasURL)


def reconcile(current: Sequence[B], urls: Sequence[str], make: Callable[[str], B]) -> tuple[list[B], list[B], list[B]]:
    """The new backend list for ``urls`` (existing objects kept, so their state and in-flight counts survive),
    the backends added and the backends removed."""
    by_url = {b.url: b for b in current}
    wanted = [by_url.get(u) or make(u) for u in urls]
    kept = {id(b) for b in wanted}
    added = [b for b in wanted if b.url not in by_url]
    removed = [b for b in current if id(b) not in kept]
    return wanted, added, removed
