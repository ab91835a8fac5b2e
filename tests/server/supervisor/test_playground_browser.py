"""The playground page (``/``) in real headless Chromium — Debian's ``/usr/bin/chromium`` driven by Playwright, no
browser download — against conftest.py's shared live ``mgm serve`` (tiny MGM engine + tiny SDXL worker + gateway,
API keys on) on loopback. Screenshots go to ``.cache/test-artifacts/playground/``
(``$MGM_TEST_ARTIFACTS/playground`` if set).

The random-weight model rarely writes ``<h>…</h>`` by itself, so the generation test does what a power user would:
it types vLLM's ``structured_outputs`` constraint into the page's "Extra JSON body" field (merged into the request
body); nothing is injected behind the page's back."""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import re
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image
from support.live import http_server
from support.serve_live import ALIAS, API_KEY, REPO
from support.stub_engine import StubEngine

from loadtests import stack as harness
from server.procs import free_port

CHROMIUM = os.environ.get("MGM_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("MGM_TEST_ARTIFACTS") or REPO / ".cache" / "test-artifacts") / "playground"
#: Chromium flags for a closed network: no background traffic (it would flood it), no sandbox (root in CI).
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--no-proxy-server",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
#: A caption-shaped answer: the page's "Extra JSON body" asks the engine for it (see the module docstring).
GEN_REGEX = r"Sure\. <h>[a-z]{3,8}( [a-z]{3,8}){1,3}</h>"
TIMEOUT_MS = 120_000

playwright_sync = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")


@pytest.fixture(scope="module")
def browser(serve_stack):  # type: ignore[no-untyped-def]
    if not os.access(CHROMIUM, os.X_OK):  # `make test` installs it and sets MGM_REQUIRE_BROWSER: never skipped there
        message = f"{CHROMIUM} is missing: `make browser` installs Debian's chromium"
        if os.environ.get("MGM_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    with playwright_sync.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            yield chromium
        finally:
            chromium.close()


class Visit:
    """A fresh page on the playground that records uncaught page errors and requests to any other origin."""

    def __init__(self, browser, base: str, width: int = 1280, height: int = 860) -> None:  # type: ignore[no-untyped-def]
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.context.set_default_timeout(TIMEOUT_MS)
        self.page = self.context.new_page()
        self.base = base
        self.page_errors: list[str] = []
        self.foreign: list[str] = []
        self.chat_bodies: list[dict] = []
        self.responses_bodies: list[dict] = []
        self.page.on("pageerror", lambda exc: self.page_errors.append(str(exc)))
        self.page.on("request", self._request)
        self.page.goto(base + "/")

    def _request(self, request) -> None:  # type: ignore[no-untyped-def]
        url = request.url
        if not url.startswith((self.base + "/", "data:", "blob:")):
            self.foreign.append(url)
        if url.endswith("/v1/chat/completions"):
            self.chat_bodies.append(json.loads(request.post_data))
        if url.endswith("/v1/responses"):
            self.responses_bodies.append(json.loads(request.post_data))

    def login(self, key: str = API_KEY) -> None:
        self.page.fill("#api-key", key)
        self.page.press("#api-key", "Tab")  # "change" → the model list is loaded with the key

    def wait_model(self) -> None:
        # function-form predicates: the page's CSP forbids eval, which string expressions would need
        self.page.wait_for_function(f"() => document.getElementById('model').value === {json.dumps(ALIAS)}")

    def shot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / name), full_page=True)

    def close(self) -> None:
        self.context.close()
        assert self.page_errors == [], self.page_errors
        assert self.foreign == [], f"the page reached outside the gateway: {self.foreign}"


def _png(color: tuple[int, int, int], size: tuple[int, int] = (48, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _drop_or_paste(page, how: str, png: bytes, name: str, target: str = "prompt") -> None:  # type: ignore[no-untyped-def]
    """A real DataTransfer holding a PNG file, dispatched as a drop on (or a paste into) the element ``target``."""
    page.evaluate("""([how, bytes, name, id]) => {
        const dt = new DataTransfer();
        dt.items.add(new File([new Uint8Array(bytes)], name, {type: "image/png"}));
        const target = document.getElementById(id);
        const event = how === "drop"
            ? new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true})
            : new ClipboardEvent("paste", {clipboardData: dt, bubbles: true, cancelable: true});
        target.dispatchEvent(event);
    }""", [how, list(png), name, target])


def _watch_text(page) -> None:  # type: ignore[no-untyped-def]
    """Record every length the newest assistant answer's text takes while it streams."""
    page.evaluate("""() => {
        window.__lengths = [];
        new MutationObserver(() => {
            const texts = document.querySelectorAll(".msg.assistant .text");
            if (texts.length) window.__lengths.push(texts[texts.length - 1].textContent.length);
        }).observe(document.getElementById("log"), {childList: true, subtree: true, characterData: true});
    }""")


def _answer_done(page, count: int) -> None:  # type: ignore[no-untyped-def]
    page.wait_for_function(f"""() => {{
        const answers = document.querySelectorAll(".msg.assistant");
        return answers.length === {count} && answers[{count} - 1].getAttribute("aria-busy") === "false";
    }}""", timeout=TIMEOUT_MS)


def _chat_page(browser, base: str) -> Visit:  # type: ignore[no-untyped-def]
    """A logged-in chat page, greedy, short answers, tall enough for two turns (the README's screenshot)."""
    visit = Visit(browser, base, height=1000)
    visit.login()
    visit.wait_model()
    visit.page.fill("#temperature", "0")
    visit.page.fill("#max-tokens", "24")
    return visit


def _pick_file(page, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    picked = tmp_path / "blue.png"
    picked.write_bytes(_png((30, 60, 200)))
    page.set_input_files("#file", str(picked))
    page.wait_for_selector("#attachments li")


def _turn_on_generation(page) -> None:  # type: ignore[no-untyped-def]
    """Generate images at 64x64, 2 steps, seed 3, the caption-shaped answer asked for in the extra body."""
    page.check("#gen")
    page.fill("#gen-size", "64x64")
    page.fill("#gen-steps", "2")
    page.fill("#gen-seed", "3")
    page.click("summary:has-text('Advanced')")
    page.fill("#extra", json.dumps({"structured_outputs": {"regex": GEN_REGEX}}))


def test_page_is_static_public_cached_and_small(stack):  # type: ignore[no-untyped-def]
    base = stack.base
    with httpx.Client(base_url=base, timeout=30) as http:
        page = http.get("/", headers={"accept-encoding": "identity"})  # no API key: the page itself is public
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert page.headers["cache-control"] == "no-cache" and page.headers["etag"]
        assert "script-src 'self'" in page.headers["content-security-policy"]
        again = http.get("/", headers={"accept-encoding": "identity", "if-none-match": page.headers["etag"]})
        assert again.status_code == 304 and again.content == b""
        assets = re.findall(r'(?:href|src)="(playground\.(?:css|js)\?v=[0-9a-f]+)"', page.text)
        assert len(assets) == 2 and not [u for u in re.findall(r'(?:href|src)="([^"]*)"', page.text) if "//" in u]
        sizes = {}
        for path in ("", *assets):
            raw = http.get("/" + path, headers={"accept-encoding": "identity"}).content
            packed = _gz(http, path)
            assert gzip.decompress(packed) == raw
            sizes["/" + path.split("?")[0]] = (len(raw), len(packed))
        for asset in assets:  # versioned URLs are immutable; any other version is revalidated
            assert http.get("/" + asset).headers["cache-control"] == "public, max-age=31536000, immutable"
            assert http.get("/" + asset.split("?")[0] + "?v=old").headers["cache-control"] == "no-cache"
        total, total_gz = sum(s[0] for s in sizes.values()), sum(s[1] for s in sizes.values())
        print(f"playground size: {sizes}; total {total} B, gzip {total_gz} B")
        assert total < 64_000 and total_gz < 20_000
        metrics = http.get("/metrics").text
        assert re.search(r'mgm_gateway_requests_total\{route="/",status="200"\}', metrics), metrics[:2000]


def _gz(http: httpx.Client, path: str) -> bytes:
    """The gzip-encoded body as sent (httpx would decode it)."""
    with http.stream("GET", "/" + path, headers={"accept-encoding": "gzip"}) as r:
        assert r.headers["content-encoding"] == "gzip"
        return b"".join(r.iter_raw())


def test_page_loads_offline_accessible_and_responsive(stack, browser):  # type: ignore[no-untyped-def]
    visit = Visit(browser, stack.base)
    page = visit.page
    page.wait_for_selector("#conn-status.bad")
    assert "needs an API key" in page.text_content("#conn-status")
    visit.login()
    visit.wait_model()
    assert "Connected" in page.text_content("#conn-status")
    # every form control has an accessible name from a <label> (or aria-label)
    unlabelled = page.evaluate("""() => [...document.querySelectorAll("input, textarea, select, button")]
        .filter((c) => !(c.labels && c.labels.length) && !c.getAttribute("aria-label") && !c.textContent.trim())
        .map((c) => c.id || c.outerHTML)""")
    assert unlabelled == []
    # tabs by keyboard (WAI-ARIA pattern): arrow keys move between Chat and Images
    page.focus("#tab-chat")
    page.keyboard.press("ArrowRight")
    assert page.is_visible("#panel-images") and not page.is_visible("#panel-chat")
    assert page.evaluate("document.activeElement.id") == "tab-images"
    page.keyboard.press("ArrowLeft")
    assert page.is_visible("#panel-chat")
    # Tab from the message box reaches the file picker (a visually hidden input behind its label)
    page.focus("#prompt")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "file"
    visit.shot("page-desktop.png")
    page.set_viewport_size({"width": 390, "height": 844})  # a phone: one column, no sideways scrolling
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    assert page.evaluate("getComputedStyle(document.querySelector('.chat')).gridTemplateColumns.split(' ').length") == 1
    visit.shot("page-phone.png")
    timing = page.evaluate("JSON.stringify(performance.getEntriesByType('navigation')[0].toJSON())")
    print("navigation timing (ms):", {k: round(v, 1) for k, v in json.loads(timing).items()
                                       if k in ("domContentLoadedEventEnd", "loadEventEnd")})
    visit.close()


def test_chat_image_streaming_then_generated_image(stack, browser, tmp_path):  # type: ignore[no-untyped-def]
    visit = _chat_page(browser, stack.base)
    page = visit.page

    # three ways to attach an image: the file picker, drag and drop, paste
    _pick_file(page, tmp_path)
    _drop_or_paste(page, "drop", _png((30, 160, 60)), "green.png")
    page.wait_for_function("() => document.querySelectorAll('#attachments li').length === 2")
    page.click("#attachments li:nth-child(1) button")
    page.click("#attachments li:nth-child(1) button")
    assert page.locator("#attachments li").count() == 0
    _drop_or_paste(page, "paste", _png((200, 40, 40)), "red.png")
    page.wait_for_selector("#attachments li img[alt*='red.png']")

    _watch_text(page)
    page.fill("#prompt", "What is in this picture?")
    page.press("#prompt", "Enter")
    _answer_done(page, 1)
    answer = page.text_content(".msg.assistant .text")
    lengths = page.evaluate("window.__lengths")
    assert answer and lengths[-1] == len(answer)
    grown = [n for i, n in enumerate(lengths) if n > 0 and (i == 0 or n != lengths[i - 1])]
    # the text only grows; how many pieces the page paints depends on the machine's load (vLLM's CPU server can send
    # a short answer in one burst), so progressive painting is checked against a steady stream in the Stop test
    assert grown and grown == sorted(grown), lengths
    assert re.search(r"\d+ tokens · [\d.]+ s · finish: (length|stop)", page.text_content(".msg.assistant .meta"))
    assert page.is_visible("#send") and page.is_enabled("#send") and not page.is_visible("#stop")
    assert page.locator(".msg.user img.thumb").count() == 1 and page.locator("#attachments li").count() == 0
    first = visit.chat_bodies[-1]
    assert first["stream"] is True and first["model"] == ALIAS and "modalities" not in first
    parts = first["messages"][-1]["content"]
    assert parts[0]["image_url"]["url"].startswith("data:image/png;base64,") and parts[1]["text"] == "What is in this picture?"
    visit.shot("chat-image.png")

    # "Generate images": any-to-any mode; the image shows inline under the answer with its <h> caption
    _turn_on_generation(page)
    page.fill("#prompt", "Draw a red fox in the snow")
    page.press("#prompt", "Enter")
    _answer_done(page, 2)
    last = page.locator(".msg.assistant").nth(1)
    assert last.locator(".error").count() == 0, last.text_content()
    caption = last.locator(".h-span").text_content()
    assert re.fullmatch(r"<h>[a-z ]+</h>", caption)
    img = last.locator("figure img")
    img.wait_for()
    page.wait_for_function("(i) => i.complete && i.naturalWidth === 64 && i.naturalHeight === 64",
                           arg=img.element_handle())
    assert img.get_attribute("src").startswith("data:image/png;base64,")
    assert last.locator("figcaption").text_content() == "<h> " + caption[3:-4].strip()
    assert "1 image" in last.locator(".meta").text_content()
    second = visit.chat_bodies[-1]
    assert second["modalities"] == ["text", "image"]
    assert second["image_options"] == {"size": "64x64", "num_inference_steps": 2, "seed": 3}
    assert second["structured_outputs"] == {"regex": GEN_REGEX}
    # multi-turn: the first exchange (with its image) is part of the second request
    assert [m["role"] for m in second["messages"]] == ["user", "assistant", "user"]
    assert second["messages"][0] == first["messages"][-1] and second["messages"][1]["content"] == answer
    visit.shot("chat-generation.png")
    visit.close()


def test_multi_turn_through_the_responses_api_with_the_image_tool(stack, browser, tmp_path):  # type: ignore[no-untyped-def]
    """The "Responses" API setting: the first turn sends its image as an input_image, the next only its own
    message and the stored response's id; with "Generate images" the image_generation tool draws inline."""
    visit = _chat_page(browser, stack.base)
    page = visit.page
    page.select_option("#api", "responses")
    _pick_file(page, tmp_path)
    page.fill("#prompt", "What is in this picture?")
    page.press("#prompt", "Enter")
    _answer_done(page, 1)
    first_answer = page.text_content(".msg.assistant .text")
    assert page.locator(".msg.assistant .error").count() == 0, page.text_content(".msg.assistant")
    assert re.search(r"\d+ tokens · [\d.]+ s · finish: (length|stop)", page.text_content(".msg.assistant .meta"))
    first = visit.responses_bodies[-1]
    assert first["stream"] is True and first["max_output_tokens"] == 24 and "previous_response_id" not in first
    (item,) = first["input"]
    assert item["role"] == "user" and item["content"][0]["type"] == "input_image"
    assert item["content"][0]["image_url"].startswith("data:image/png;base64,")
    assert item["content"][1] == {"type": "input_text", "text": "What is in this picture?"}

    _turn_on_generation(page)
    page.fill("#max-tokens", "64")  # room for the whole caption
    page.fill("#prompt", "Draw a red fox in the snow")
    page.press("#prompt", "Enter")
    _answer_done(page, 2)
    last = page.locator(".msg.assistant").nth(1)
    assert last.locator(".error").count() == 0 and last.locator(".h-span").count() == 1, last.text_content()
    caption = last.locator(".h-span").text_content()
    img = last.locator("figure:not(.preview) img")
    img.wait_for()
    page.wait_for_function("(i) => i.complete && i.naturalWidth === 64 && i.naturalHeight === 64",
                           arg=img.element_handle())
    assert last.locator("figcaption").text_content() == "<h> " + caption[3:-4].strip()  # revised_prompt
    assert last.locator("figure.preview").count() == 0 and "1 image" in last.locator(".meta").text_content()
    second = visit.responses_bodies[-1]
    assert second["previous_response_id"].startswith("resp_")
    assert [i["content"] for i in second["input"]] == [[{"type": "input_text", "text": "Draw a red fox in the snow"}]]
    assert second["tools"] == [{"type": "image_generation", "partial_images": 1, "size": "64x64",
                                "num_inference_steps": 2, "seed": 3}]
    # the server holds the conversation: the stored first turn is the one the page answered
    with httpx.Client(base_url=stack.base, headers={"authorization": f"Bearer {API_KEY}"}, timeout=30) as http:
        stored = http.get(f"/v1/responses/{second['previous_response_id']}")
        assert stored.status_code == 200, stored.text
        assert stored.json()["output"][0]["content"][0]["text"] == first_answer
    visit.shot("chat-responses.png")
    visit.close()


def test_images_tab(stack, browser):  # type: ignore[no-untyped-def]
    visit = Visit(browser, stack.base)
    page = visit.page
    visit.login()
    page.click("#tab-images")
    page.fill("#img-prompt", "a lighthouse at dusk")
    page.fill("#img-size", "64x64")
    page.fill("#img-steps", "2")
    page.fill("#img-seed", "7")
    with page.expect_response(lambda r: r.url.endswith("/v1/images/generations"), timeout=TIMEOUT_MS) as answer:
        page.click("#img-go")
    assert answer.value.status == 200
    payload = answer.value.json()
    page.wait_for_function("() => { const i = document.querySelector('#img-results figure img');"
                           " return i && i.complete && i.naturalWidth === 64; }")
    revised = payload["data"][0]["revised_prompt"]
    assert revised and page.text_content("#img-results .revised") == revised
    how = {"enhanced": "rewritten by Mini-Gemini", "no_caption": "wrote no <h> caption"}[payload["prompt_enhancement"]]
    assert how in page.text_content("#img-results figcaption")
    assert re.fullmatch(r"1 image\(s\), 64x64, [\d.]+ s\.", page.text_content("#img-status"))
    visit.shot("images-tab.png")
    visit.close()


def test_api_errors_are_readable(stack, browser):  # type: ignore[no-untyped-def]
    visit = Visit(browser, stack.base)
    page = visit.page
    visit.login("sk-wrong")
    page.wait_for_function("() => document.getElementById('conn-status').textContent.includes('Incorrect API key')")
    page.fill("#model", ALIAS)
    page.fill("#prompt", "hello")
    page.press("#prompt", "Enter")
    alert = page.locator(".msg.assistant [role=alert]")
    alert.wait_for()
    text = alert.text_content()
    assert "Error 401 · authentication_error · invalid_api_key" in text and "Incorrect API key provided." in text
    assert page.input_value("#prompt") == "hello"  # the unanswered message is given back
    assert "Not sent" in page.text_content(".msg.user.failed")

    visit.login()  # a bad field in the page itself: explained before anything is sent
    page.click("summary:has-text('Advanced')")
    page.fill("#extra", "{top_k: 4}")
    page.press("#prompt", "Enter")
    page.wait_for_selector("#composer-error:not([hidden])")
    assert "Extra JSON body is not valid JSON" in page.text_content("#composer-error")

    page.click("#tab-images")  # the images API refuses a size: its message and parameter are shown
    page.fill("#img-prompt", "a lighthouse")
    page.fill("#img-size", "65x65")
    page.click("#img-go")
    page.wait_for_selector("#img-error:not([hidden])")
    text = page.text_content("#img-error")
    assert "Error 400 · invalid_request_error · invalid_value" in text
    assert "Invalid value for 'size'" in text and "(parameter: size)" in text
    visit.shot("errors.png")
    visit.close()


def _record_edit_forms(page) -> None:  # type: ignore[no-untyped-def]
    """Keep the FormData of each edit request the page sends in ``window.__editForms`` (files as base64):
    Playwright does not expose multipart bodies with files."""
    page.evaluate("""() => {
        const send = window.fetch;
        window.__editForms = [];
        window.fetch = async (url, options) => {
            if (String(url).endsWith("v1/images/edits")) {
                const form = {};
                for (const [k, v] of options.body.entries()) {
                    form[k] = v instanceof Blob ? btoa(String.fromCharCode(...new Uint8Array(await v.arrayBuffer()))) : v;
                }
                window.__editForms.push(form);
            }
            return send(url, options);
        };
    }""")


def test_edit_tab_paints_a_mask_and_streams_previews(stack, browser, tmp_path):  # type: ignore[no-untyped-def]
    visit = Visit(browser, stack.base)
    page = visit.page
    visit.login()
    page.click("#tab-edit")
    source = tmp_path / "source.png"
    source.write_bytes(_png((30, 60, 200), (96, 64)))
    page.set_input_files("#edit-file", str(source))
    page.wait_for_function("() => !document.getElementById('edit-canvas').classList.contains('blank')")
    assert "whole image" in page.text_content("#edit-mask-status")
    # paint a stroke down the left side of the picture (real pointer events)
    box = page.locator("#edit-canvas").bounding_box()
    page.fill("#edit-brush", "16")
    page.mouse.move(box["x"] + box["width"] * 0.1, box["y"] + box["height"] * 0.1)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.1, box["y"] + box["height"] * 0.9, steps=8)
    page.mouse.up()
    assert "only the red part" in page.text_content("#edit-mask-status")
    page.evaluate("""() => { window.__previews = 0; new MutationObserver(() => {
        if (document.querySelector('#edit-results figure.preview')) window.__previews += 1;
    }).observe(document.getElementById('edit-results'), {childList: true, subtree: true}); }""")
    page.fill("#edit-prompt", "make it snowy")
    page.fill("#edit-steps", "4")
    page.fill("#edit-previews", "2")
    page.fill("#edit-seed", "5")
    _record_edit_forms(page)
    page.click("#edit-go")
    page.wait_for_function("() => document.getElementById('edit-status').textContent.startsWith('Done')",
                           timeout=TIMEOUT_MS)
    assert page.locator("#edit-error").is_hidden()
    assert page.get_attribute("#edit-results", "data-previews") == "2" and page.evaluate("window.__previews") >= 1
    img = page.locator("#edit-results figure img")
    page.wait_for_function("(i) => i.complete && i.naturalWidth === 96 && i.naturalHeight === 64",
                           arg=img.element_handle())
    assert page.text_content("#edit-results .revised")  # MGM's caption, or the instruction itself
    assert not page.locator("#edit-results figure.preview").count()  # the final image replaced the previews
    (form,) = page.evaluate("window.__editForms")
    assert {k: form.get(k) for k in ("prompt", "stream", "partial_images", "num_inference_steps", "strength")} == {
        "prompt": "make it snowy", "stream": "true", "partial_images": "2", "num_inference_steps": "4",
        "strength": None}
    with Image.open(io.BytesIO(base64.b64decode(form["image"]))) as sent_image:
        assert sent_image.size == (96, 64)
    with Image.open(io.BytesIO(base64.b64decode(form["mask"]))) as mask:
        assert mask.mode == "RGBA" and mask.size == (96, 64)
        assert mask.getpixel((9, 32))[3] == 0 and mask.getpixel((80, 32))[3] == 255  # painted → transparent
    visit.shot("edit-tab.png")
    # an uploaded mask replaces the painting (its transparent part shows as paint)
    page.click("#edit-clear-mask")
    assert "whole image" in page.text_content("#edit-mask-status")
    hole = Image.new("RGBA", (96, 64), (0, 0, 0, 255))
    hole.paste((0, 0, 0, 0), (48, 0, 96, 64))
    mask_file = tmp_path / "mask.png"
    hole.save(mask_file)
    page.set_input_files("#edit-mask-file", str(mask_file))
    page.wait_for_function("() => document.getElementById('edit-mask-status').textContent.includes('red part')")
    # a dropped image, then a pasted one, replace the picture (and its mask)
    for event, size in (("drop", (40, 30)), ("paste", (50, 20))):
        _drop_or_paste(page, event, _png((200, 40, 40), size), "given.png", target="edit-drop")
        page.wait_for_function("(w) => document.getElementById('edit-canvas').width === w", arg=size[0])
        assert page.evaluate("document.getElementById('edit-canvas').height") == size[1], event
        assert "whole image" in page.text_content("#edit-mask-status"), event
    visit.close()


class _EndlessStory(StubEngine):
    """An engine that streams one word every 50 ms for up to a minute (so Stop always meets a live stream, whatever
    the machine's load) and records when its client went away."""

    dropped: list[float] = []

    def do_POST(self) -> None:
        self.read_body()
        self.start_stream()
        for i in range(1200):
            chunk = {"id": "chatcmpl-endless", "object": "chat.completion.chunk", "created": 0, "model": self.model,
                     "choices": [{"index": 0, "delta": {"content": f"word{i} "}, "finish_reason": None}]}
            try:
                self.write_chunk(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                self.wfile.flush()
            except OSError:
                type(self).dropped.append(time.monotonic())
                return
            time.sleep(0.05)


@pytest.fixture
def endless_gateway(tmp_path):  # type: ignore[no-untyped-def]
    """A real `mgm gateway` (its playground included) in front of :class:`_EndlessStory`."""
    handler = type("Endless", (_EndlessStory,), {"dropped": []})
    with http_server(handler) as engine, harness.running(
            [harness.gateway(free_port(), [engine], [], tmp_path, name="endless-gateway")], timeout=60) as (gateway,):
        yield harness.base_url(gateway), handler


def test_stop_button_ends_a_streaming_answer(endless_gateway, browser):  # type: ignore[no-untyped-def]
    """The answer renders as it streams (several lengths seen), Stop ends it in the page ("finish: stopped", no
    error, Send enabled again), and the gateway drops the engine's stream (the engine sees its client leave)."""
    base, engine = endless_gateway
    visit = Visit(browser, base)
    page = visit.page
    page.wait_for_function("() => document.getElementById('model').value === 'stub'")
    _watch_text(page)
    page.fill("#prompt", "Tell me a long story.")
    page.press("#prompt", "Enter")
    page.wait_for_function("() => new Set((window.__lengths || []).filter((n) => n > 0)).size >= 3")
    # the streaming log scrolls the page every frame, so pointer "stability" never settles: fire the click itself
    page.locator("#stop").dispatch_event("click")
    _answer_done(page, 1)
    meta = page.text_content(".msg.assistant .meta")
    assert "finish: stopped" in meta and page.locator(".msg.assistant [role=alert]").count() == 0, meta
    assert page.is_enabled("#send") and not page.is_visible("#stop")
    stopped = time.monotonic()
    while not engine.dropped:  # bounded: the engine's stream ends within a minute anyway
        assert time.monotonic() < stopped + 10, "the gateway kept reading the engine after Stop"
        time.sleep(0.05)
    visit.close()
