"""Cache-aware routing (docs/api.md §7.1): keep a conversation on the engine that already holds its image.

vLLM keeps a prompt prefix's KV blocks — image tokens included, keyed by the image's hash — and its encoder outputs,
but only on the engine that computed them; routing by least in-flight sends a follow-up turn to a cold engine with
probability about (N-1)/N, which then runs MGM's vision towers again. So a request gets a key
(:func:`routing_key`): the content hash of the conversation's first image, or for text-only chats a hash of the text
up to the first user turn, which every later turn of the conversation repeats. Keyed requests go to the key's engine
on a consistent-hash ring (:class:`HashRing`; engines that join or leave move only about 1/N of the keys) unless that
engine is over the load bound — its in-flight count would exceed ceil((1+ε) × the mean) — in which case the next
engine on the ring takes it (bounded-load consistent hashing, Mirrokni, Thorup and Zadimoghaddam 2018, as in
HAProxy's ``hash-balance-factor``). Unkeyed requests go to the least loaded engine.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

#: ``--routing`` values.
ROUTING_POLICIES = ("affinity", "least-loaded")
#: ``mgm_gateway_routing_total`` outcomes: the key's own engine, the next one under the load bound, least loaded.
ROUTING_OUTCOMES = ("hit", "spill", "unkeyed")
#: Points per engine on the ring: enough that N engines share the keys within a few percent.
VNODES = 160


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def image_key(url: str) -> str:
    """The content key of one image (a data URL after the gateway has inlined it): equal bytes, equal key."""
    return hashlib.sha256(url.encode()).hexdigest()[:32]


def tag_images(body: Mapping[str, Any]) -> None:
    """Give every image part of a chat ``body`` its content key as vLLM's multimodal ``uuid`` (in place), so the
    engine keys its caches by it without hashing the pixels again. A client's own ``uuid`` is replaced: one it
    chose could make its image stand in for another request's in the engine's caches."""
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else ():
            if isinstance(part, dict) and part.get("type") == "image_url":
                url = (part.get("image_url") or {}).get("url")
                if isinstance(url, str) and url:
                    part["uuid"] = image_key(url)
                else:
                    part.pop("uuid", None)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def routing_key(body: Mapping[str, Any]) -> str | None:
    """``img:`` + the first image's key (its ``uuid`` once :func:`tag_images` has run: the gateway hashes each
    image once), else ``txt:`` + a hash of the turns up to the first user turn (a legacy
    completion: of its prompt's start); None when there is nothing to key on."""
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            for part in content if isinstance(content, list) else ():
                if isinstance(part, dict) and part.get("type") == "image_url":
                    if isinstance(part.get("uuid"), str):  # tag_images ran: the key is already computed
                        return "img:" + part["uuid"]
                    url = (part.get("image_url") or {}).get("url")
                    if isinstance(url, str) and url:
                        return "img:" + image_key(url)
        opening: list[str] = []
        for message in messages:
            if not isinstance(message, dict):
                continue
            opening.append(f"{message.get('role')}\x00{_text(message.get('content'))}")
            if message.get("role") == "user":
                return "txt:" + hashlib.sha256("\x01".join(opening).encode()).hexdigest()[:32]
        return None
    prompt = body.get("prompt")
    if isinstance(prompt, str) and prompt:
        return "txt:" + hashlib.sha256(prompt[:2048].encode()).hexdigest()[:32]
    return None


class HashRing:
    """Engines (by URL) on a ring of :data:`VNODES` points each; :meth:`walk` lists them in a key's ring order."""

    def __init__(self, vnodes: int = VNODES) -> None:
        self.vnodes = vnodes
        self._members: frozenset[str] = frozenset()
        self._points: list[int] = []
        self._owners: list[str] = []

    def sync(self, members: Iterable[str]) -> None:
        """Make the ring hold exactly ``members`` (cheap when nothing changed)."""
        wanted = frozenset(members)
        if wanted == self._members:
            return
        ring = sorted((_hash64(f"{m}#{i}"), m) for m in wanted for i in range(self.vnodes))
        self._members, self._points, self._owners = wanted, [p for p, _ in ring], [m for _, m in ring]

    def walk(self, key: str) -> Iterator[str]:
        """Every member once, starting at the key's point and going round the ring."""
        if not self._points:
            return
        start, seen = bisect.bisect(self._points, _hash64(key)), set()
        for i in range(len(self._points)):
            owner = self._owners[(start + i) % len(self._points)]
            if owner not in seen:
                seen.add(owner)
                yield owner
                if len(seen) == len(self._members):
                    return


def bounded_choice(ring: HashRing, key: str, load: Mapping[str, int], epsilon: float) -> tuple[str, bool]:
    """The engine for ``key`` among ``load`` (URL → in flight, the candidates), and whether it is the key's own
    first choice (a hit) rather than a spill to a later engine on the ring. No candidate takes a request that would
    lift it above ceil((1+ε) × (total+1)/n); some candidate is always below that bound."""
    if not load:
        raise ValueError("no candidates")
    cap = math.ceil((1 + epsilon) * (sum(load.values()) + 1) / len(load))
    first = True
    for member in ring.walk(key):
        if member not in load:
            continue
        if load[member] + 1 <= cap:
            return member, first
        first = False
    return min(load, key=lambda m: load[m]), False  # only when the ring lacks a candidate (not synced)
