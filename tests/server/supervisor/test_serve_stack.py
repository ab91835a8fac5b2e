"""`mgm serve` end to end: tiny MGM engine + tiny SDXL worker + gateway as real child processes on loopback, driven
by the official openai SDK (the stack is conftest.py's, shared with the playground tests); then SIGTERM stops every
child and serve exits 0."""

from __future__ import annotations

import re
import signal
import time

import httpx
import openai
import pytest
from support.serve_live import ALIAS, API_KEY, Serve, leftovers

from server.procs import png_data_url
from server.supervisor import READY_PREFIX

@pytest.fixture(scope="module")
def client(serve_stack: Serve) -> openai.OpenAI:
    base = serve_stack.base  # type: ignore[attr-defined]
    return openai.OpenAI(base_url=base + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def test_ready_line_logs_and_children(stack: Serve, tiny_models):  # type: ignore[no-untyped-def]
    out = stack.stdout()
    assert f"{READY_PREFIX}{stack.base}/v1" in out  # type: ignore[attr-defined]
    assert set(stack.children()) == {"engine-0", "sdxl-worker-0", "gateway"}
    logs = stack.tmp / "cache" / "logs"  # type: ignore[attr-defined]
    for name in ("engine-0", "sdxl-worker-0", "gateway"):
        assert (logs / f"{name}.log").stat().st_size > 0, name
    assert str(logs) in out
    assert f"Playground (in a browser): {stack.base}/" in out  # type: ignore[attr-defined]
    page = httpx.get(f"{stack.base}/", timeout=10)  # type: ignore[attr-defined]
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")  # public: no key needed
    # the extra vLLM arguments after -- reached the engine
    assert "--max-model-len 4096" in (logs / "engine-0.log").read_text(errors="replace")


def test_models_list(client: openai.OpenAI, tiny_models):  # type: ignore[no-untyped-def]
    ids = [m.id for m in client.models.list()]
    assert ids == [ALIAS, tiny_models[0].name, "sdxl"]  # the checkpoint directory's name, never its path


def test_chat_text_and_image(client: openai.OpenAI):
    text = client.chat.completions.create(model=ALIAS, messages=[{"role": "user", "content": "Hello!"}],
                                          max_tokens=4, temperature=0)
    assert text.choices[0].message.content and text.usage.completion_tokens <= 4  # type: ignore[union-attr]
    content = [{"type": "image_url", "image_url": {"url": png_data_url()}},
               {"type": "text", "text": "What is in this picture?"}]
    reply = client.chat.completions.create(model=ALIAS, messages=[{"role": "user", "content": content}],
                                           max_tokens=4, temperature=0)
    assert reply.choices[0].message.content
    assert reply.usage.prompt_tokens > text.usage.prompt_tokens  # type: ignore[union-attr]  # the image's tokens


def test_auth_is_on(stack: Serve):
    bad = openai.OpenAI(base_url=stack.base + "/v1", api_key="wrong", max_retries=0, timeout=30)  # type: ignore[attr-defined]
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_printed_curl_example_works(stack: Serve):
    curl = next(line for line in stack.stdout().splitlines() if line.startswith("curl "))
    assert "$MGM_API_KEY" in curl and API_KEY not in stack.stdout()  # the key itself is never printed
    url = re.search(r"curl -s (\S+)", curl)[1]  # type: ignore[index]
    body = re.search(r"-d '(.*)'$", curl)[1]  # type: ignore[index]
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
    r = httpx.post(url, content=body, headers=headers, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]


@pytest.mark.stops_stack
def test_sigterm_stops_every_child(stack: Serve):
    """Runs after every other user of the shared stack (the ``stops_stack`` mark, see conftest.py): SIGTERM → every
    child's process group empty, exit 0, within a bound."""
    children = stack.children()
    assert all(leftovers([pid]) for pid in children.values())  # all alive before
    start = time.monotonic()
    stack.proc.send_signal(signal.SIGTERM)
    assert stack.wait_exit(60) == 0, stack.logs()
    assert time.monotonic() - start < 60
    assert leftovers(children.values()) == [], stack.logs()
    err = stack.stderr()
    assert "stopping signal=SIGTERM" in err
    # in order: the gateway (which drains) first, then the engines and workers it drains to
    assert err.index("stopped children children=gateway") < err.index("stopping children children=engine-0"), err
