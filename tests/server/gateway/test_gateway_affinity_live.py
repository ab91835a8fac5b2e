"""Affinity routing live: two real engines behind the gateway, conversations that resend their history (image
first, then a few KV blocks of text) in shuffled rounds, two requests in flight. With ``--routing affinity`` every
follow-up turn finds the earlier turn's blocks in its engine's prefix cache; with ``least-loaded`` a follow-up lands
on the other engine about half the time and misses. Asserted on vLLM's own ``vllm:prefix_cache_hits`` counters."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator

import httpx
import pytest

from loadtests import stack
from loadtests.scenarios import png_data_url
from server.gateway.config import GatewayConfig
from server.procs import free_port

BLOCK = 128  # vLLM's KV block on CPU, in tokens
CONVERSATIONS, TURNS, IN_FLIGHT = 8, 3, 2
#: a few hundred tokens of text after the image: every prompt spans several full blocks, and no block is shared
#: between conversations (the image sits in the first one; the template's default system text is shorter)
BRIEF = "Describe it for a catalogue. " + " ".join(f"rule{i}" for i in range(60))


@pytest.fixture(scope="module")
def two_engines(engine, engine_checkpoint, tmp_path_factory) -> Iterator[tuple[list[str], str]]:  # type: ignore[no-untyped-def]
    """The session's engine and a second one on the same checkpoint: (base URLs, model id)."""
    second = stack.engine(engine_checkpoint, free_port(), tmp_path_factory.mktemp("affinity"), name="engine-b")
    with stack.running([second], timeout=240):
        yield [engine[0], stack.base_url(second)], engine[1]


def prefix_hits(engines: list[str]) -> float:
    total = 0.0
    for base in engines:
        for line in httpx.get(base + "/metrics", timeout=10).text.splitlines():
            if line.startswith("vllm:prefix_cache_hits_total"):
                total += float(line.rsplit(" ", 1)[1])
    return total


async def conversations(base: str, model: str, seed: int) -> list[int]:
    """Every conversation sends its next turn each round, in shuffled order, IN_FLIGHT at a time; each follow-up's
    ideal hit (whole blocks of the previous prompt, less the block where the answer joins) is returned."""
    rng = random.Random(seed)
    history = {c: [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_data_url(seed * 1000 + c, 64)}},
        {"type": "text", "text": f"What is in picture {c}? {BRIEF}"}]}] for c in range(CONVERSATIONS)}
    prompt_tokens: dict[int, int] = {}
    ideal: list[int] = []
    gate = asyncio.Semaphore(IN_FLIGHT)
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        async def turn(c: int, k: int) -> None:
            async with gate:
                r = await client.post("/v1/chat/completions", json={
                    "model": model, "messages": history[c], "max_tokens": 6, "temperature": 0})
            assert r.status_code == 200, r.text
            reply = r.json()
            if k:
                ideal.append(max(0, prompt_tokens[c] // BLOCK - 1) * BLOCK)
            prompt_tokens[c] = reply["usage"]["prompt_tokens"]
            history[c] += [{"role": "assistant", "content": reply["choices"][0]["message"]["content"] or "ok"},
                           {"role": "user", "content": f"And detail number {k + 1}?"}]

        for k in range(TURNS):
            order = list(range(CONVERSATIONS))
            rng.shuffle(order)
            await asyncio.gather(*(turn(c, k) for c in order))
    assert min(prompt_tokens.values()) > 2 * BLOCK  # within the engines' 512-token context
    return ideal


def test_affinity_keeps_conversations_on_their_cached_engine(two_engines, gateway_server):
    engines, model = two_engines
    gained = {}
    for seed, routing in ((11, "affinity"), (12, "least-loaded")):  # fresh images per policy: no shared cache
        config = GatewayConfig(engines=tuple(engines), probe_interval_s=0.2, routing=routing)
        with gateway_server(config) as base:
            for _ in range(100):  # both engines probed up
                if all(e.up for e in gateway_server.apps[base].state.gateway.pool.engines):
                    break
                asyncio.run(asyncio.sleep(0.1))
            before = prefix_hits(engines)
            ideal = asyncio.run(conversations(base, model, seed))
            gained[routing] = prefix_hits(engines) - before
            if routing == "affinity":
                metrics = httpx.get(base + "/metrics", timeout=10).text
                spills = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                             if line.startswith("mgm_gateway_routing_total") and 'outcome="spill"' in line)
                assert spills == 0  # two in flight on two engines never exceed the load bound
                assert gained[routing] >= sum(ideal), (gained, sum(ideal))  # every follow-up hit its earlier blocks
    print(f"prefix-cache hit tokens: {gained}")
    assert gained["least-loaded"] < gained["affinity"], gained
