"""server.gateway.routing (pure logic): the ring moves few keys when engines come and go, the load bound holds,
choices are deterministic; the keys a conversation's turns get; the pool's affinity and least-loaded policies."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from server.gateway.engine_pool import EnginePool
from server.gateway.metrics import GatewayMetrics
from server.gateway.routing import HashRing, bounded_choice, routing_key, tag_images

KEYS = [f"img:{i:05d}" for i in range(4000)]


def owners(members: list[str]) -> dict[str, str]:
    ring = HashRing()
    ring.sync(members)
    return {k: next(ring.walk(k)) for k in KEYS}


def test_deterministic_and_balanced():
    members = [f"http://e{i}" for i in range(4)]
    first = owners(members)
    assert first == owners(list(reversed(members)))  # the order engines are listed in does not matter
    shares = Counter(first.values())
    assert set(shares) == set(members) and min(shares.values()) > len(KEYS) / 4 * 0.7, shares


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_join_and_leave_move_few_keys(n):
    members = [f"http://10.0.0.{i}:8000" for i in range(n)]
    before = owners(members)
    joined = owners(members + ["http://10.0.0.99:8000"])
    moved = sum(before[k] != joined[k] for k in KEYS)
    assert moved <= 2 * len(KEYS) / (n + 1), moved
    assert all(joined[k] == "http://10.0.0.99:8000" for k in KEYS if before[k] != joined[k])  # only to the newcomer
    left = owners(members[1:])
    moved = sum(before[k] != left[k] for k in KEYS)
    assert moved <= 2 * len(KEYS) / n and all(before[k] == members[0] for k in KEYS if before[k] != left[k])


@pytest.mark.parametrize("epsilon", [0.0, 0.25, 1.0])
def test_the_load_bound_holds_under_skewed_keys(epsilon):
    """One hot conversation and a few cold ones, requests arriving and finishing at random: no engine ever goes
    above ceil((1+ε) × mean) when it takes a request."""
    rng = random.Random(7)
    ring = HashRing()
    members = [f"http://e{i}" for i in range(4)]
    ring.sync(members)
    load = dict.fromkeys(members, 0)
    spills = 0
    for _ in range(3000):
        if rng.random() < 0.45 and sum(load.values()):
            busy = [m for m in members if load[m]]
            load[rng.choice(busy)] -= 1
            continue
        key = "img:hot" if rng.random() < 0.7 else f"img:{rng.randrange(5)}"
        cap = math.ceil((1 + epsilon) * (sum(load.values()) + 1) / len(load))
        chosen, hit = bounded_choice(ring, key, load, epsilon)
        assert load[chosen] + 1 <= cap
        spills += not hit
        load[chosen] += 1
    assert spills  # the hot key did overflow its engine


def test_the_default_bound_binds_on_two_engines():
    """A hot conversation does not take an engine whole: at the default ε, two engines, the key's engine refuses once
    it holds 3 of 3 in flight (ε = 1 would never refuse there: ceil(2 × (m+1)/2) = m+1)."""
    from server.gateway.config import GatewayConfig

    ring = HashRing()
    ring.sync(["http://a", "http://b"])
    home, _ = bounded_choice(ring, "img:hot", {"http://a": 0, "http://b": 0}, GatewayConfig.routing_epsilon)
    other = "http://b" if home == "http://a" else "http://a"
    assert bounded_choice(ring, "img:hot", {home: 2, other: 0}, GatewayConfig.routing_epsilon) == (home, True)
    assert bounded_choice(ring, "img:hot", {home: 3, other: 0}, GatewayConfig.routing_epsilon) == (other, False)
    assert bounded_choice(ring, "img:hot", {home: 50, other: 0}, 1.0) == (home, True)  # why not ε = 1


def test_turns_of_a_conversation_share_a_key():
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    turn1 = {"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": [image, {"type": "text", "text": "What is it?"}]}]}
    turn2 = {"messages": [*turn1["messages"], {"role": "assistant", "content": "A cat."},
                          {"role": "user", "content": "Which colour?"}]}
    key = routing_key(turn1)
    assert key and key.startswith("img:") and routing_key(turn2) == key
    other = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,BBBB"}}, {"type": "text", "text": "What is it?"}]}]}
    assert routing_key(other) != key
    text1 = {"messages": [{"role": "user", "content": "Tell me about Rome."}]}
    text2 = {"messages": [*text1["messages"], {"role": "assistant", "content": "Rome is…"},
                          {"role": "user", "content": "And Paris?"}]}
    assert routing_key(text1) == routing_key(text2) != routing_key({"messages": [{"role": "user", "content": "Hi"}]})
    assert routing_key({"prompt": "Once upon a time"}) == routing_key({"prompt": "Once upon a time"})
    assert routing_key({"messages": [{"role": "system", "content": "only"}]}) is None and routing_key({}) is None


def test_images_carry_their_content_key_not_the_clients():
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}, "uuid": "someone-elses"}
    body = {"messages": [{"role": "user", "content": [part, {"type": "text", "text": "x"}]}]}
    tag_images(body)
    assert part["uuid"] != "someone-elses" and routing_key(body) == "img:" + part["uuid"]


def _pool(routing: str) -> tuple[EnginePool, GatewayMetrics]:
    metrics = GatewayMetrics()
    pool = EnginePool(("http://a", "http://b", "http://c"), client=None, metrics=metrics,  # type: ignore[arg-type]
                      routing=routing, routing_epsilon=0.25)
    for engine in pool.engines:
        engine.up = True
    return pool, metrics


def _outcomes(metrics: GatewayMetrics) -> Counter:  # type: ignore[type-arg]
    counts: Counter = Counter()  # type: ignore[type-arg]
    for sample in metrics.routing.collect()[0].samples:
        if sample.name.endswith("_total"):
            counts[sample.labels["outcome"]] += int(sample.value)
    return counts


def test_pool_affinity_sticks_spills_over_the_bound_and_fails_over():
    pool, metrics = _pool("affinity")
    home = pool.pick(key="img:conversation-1")
    assert home is not None and all(pool.pick(key="img:conversation-1") is home for _ in range(5))
    home.in_flight = 5  # far above the mean: the next engine on the ring takes it
    spilled = pool.pick(key="img:conversation-1")
    assert spilled is not None and spilled is not home
    home.in_flight = 0
    assert pool.pick(exclude={home}, key="img:conversation-1") is not home  # failover still works
    assert pool.pick() is not None  # unkeyed: least loaded
    assert _outcomes(metrics) == Counter({"hit": 7, "spill": 1, "unkeyed": 1})


def test_pool_least_loaded_ignores_keys():
    pool, metrics = _pool("least-loaded")
    a, b, c = pool.engines
    a.in_flight, b.in_flight, c.in_flight = 2, 0, 1
    assert {pool.pick(key=f"img:{i}") for i in range(10)} == {b}
    assert _outcomes(metrics) == Counter({"unkeyed": 10})
