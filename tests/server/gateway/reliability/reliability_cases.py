"""The bad-input cases of RELIABILITY.md, as data: each is one HTTP request to a live gateway and the answer it must
get (status, OpenAI error ``code`` and ``param``). ``test_reliability_bad_input.py`` sends every case (then checks
that the gateway still serves a good request); ``reliability_table.py`` renders the table of RELIABILITY.md from
this list. Stdlib + Pillow only, so the table renders without a server.

Placeholders in bodies and paths, filled by the test: ``{model}`` (the engine's model id), ``{files}`` (base URL of
the test file server: /img.png, /slow.png, /huge.png, /huge-chunked.png, /gzip-bomb.png, /text, /missing,
/redirect?to=, /redirect-host?name=, /loop).

Gateways (``gateway`` field): ``strict`` has the production image policy (no loopback targets); ``loopback`` lets
image URLs reach the test file server on 127.0.0.1 (the test-only switch) with a 1 s fetch timeout and a 1 MiB cap.
Both have one API key, a 1 MiB body cap, a resolver that maps ``*.reliability.test`` names to fixed addresses, and
one (unreachable) SDXL worker so the images API validates requests.
"""

from __future__ import annotations

import asyncio
import base64
import io
import socket
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

KEY = "sk-reliability"
BODY_CAP = 1024 * 1024
#: Test DNS: names the gateways' resolver knows (anything else does not resolve).
DNS = {"metadata.reliability.test": ["169.254.169.254"], "private6.reliability.test": ["fd00::1"],
       "mixed.reliability.test": ["93.184.216.34", "10.1.2.3"], "localhost": ["127.0.0.1", "::1"],
       # nothing listens on 127.0.0.2: the first address refuses the connection, the second is the file server
       "two-addresses.reliability.test": ["127.0.0.2", "127.0.0.1"]}
SLOW_DNS = "slow-dns.reliability.test"  # answers after 10 s (the gateways' DNS timeout is 2 s)


async def dns_resolver(host: str, _port: int) -> list[str]:
    """The gateways' resolver in these tests (the gateway's ``Resolver`` signature): the DNS table, else only what
    libc parses as a numeric address without any lookup (``2130706433``, ``0x7f000001``, ``127.1``)."""
    if host == SLOW_DNS:
        await asyncio.sleep(10)
        return ["93.184.216.34"]
    if host in DNS:
        return DNS[host]
    infos = socket.getaddrinfo(host, _port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)  # OSError if not
    return [str(info[4][0]) for info in infos]


@dataclass(frozen=True)
class Case:
    group: str
    name: str
    status: int
    code: str | None
    param: str | None = None
    body: Any = None  # JSON body (ignored when raw is set)
    raw: bytes | None = None  # raw body bytes
    chunked: bool = False  # send raw without Content-Length
    method: str = "POST"
    path: str = "/v1/chat/completions"
    headers: dict[str, str] = field(default_factory=dict)
    auth: str | None = KEY  # Bearer key sent (None: no Authorization header)
    gateway: str = "strict"
    #: multipart/form-data instead of JSON (what the SDKs send to /v1/images/edits): file parts as
    #: (field, filename, bytes, content type), and plain fields.
    files: tuple[tuple[str, str, bytes, str], ...] = ()
    form: dict[str, str] | None = None


# --- images as bytes ---------------------------------------------------------------------------------------------


def _save(mode: str, fmt: str, size: tuple[int, int] = (24, 16), **kwargs: Any) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(side: int = 100_000) -> bytes:
    """A valid-looking PNG header declaring side x side pixels (10^10) with a tiny compressed body."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 1024))
            + _png_chunk(b"IEND", b""))


def jpeg_bomb(side: int = 65_000) -> bytes:
    """A small JPEG whose frame header (SOF0) declares side x side pixels."""
    data = bytearray(_save("RGB", "JPEG"))
    at = data.index(b"\xff\xc0")  # SOF0: marker, length(2), precision(1), height(2), width(2)
    data[at + 5:at + 9] = struct.pack(">HH", side, side)
    return bytes(data)


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _noisy(fmt: str) -> bytes:
    """A 128x128 picture with detail, so a cut through its file really loses pixels."""
    from PIL import Image

    buf = io.BytesIO()
    Image.effect_mandelbrot((128, 128), (-2.0, -1.5, 1.0, 1.5), 100).convert("RGB").save(buf, format=fmt)
    return buf.getvalue()


PNG = _save("RGB", "PNG")
NOISY_PNG, NOISY_JPEG = _noisy("PNG"), _noisy("JPEG")


def _image(url: str, text: str = "Describe it.") -> dict[str, Any]:
    return {"model": "{model}", "max_tokens": 1,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": text}]}]}


def _chat(**fields: Any) -> dict[str, Any]:
    return {"model": "{model}", "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}], **fields}


def _images(**fields: Any) -> dict[str, Any]:
    return {"prompt": "a red fox", "size": "64x64", "enhance_prompt": False, **fields}


URL = "messages[0].content[0].image_url.url"
IMAGES = "/v1/images/generations"
EDITS = "/v1/images/edits"
RESPONSES = "/v1/responses"


def _resp(**fields: Any) -> dict[str, Any]:
    return {"model": "{model}", "input": "Hi", "max_output_tokens": 1, **fields}


def _resp_image(url: str) -> dict[str, Any]:
    return _resp(input=[{"role": "user", "content": [{"type": "input_image", "image_url": url},
                                                     {"type": "input_text", "text": "Describe it."}]}])
RGBA_MASK = _save("RGBA", "PNG")  # 24x16 with alpha, like PNG


def _edit(*files: tuple[str, str, bytes, str], **fields: str) -> dict[str, Any]:
    """A multipart edit (Case fields): the image PNG unless ``files`` are given, a prompt unless overridden."""
    form = {"prompt": "make it snowy", "enhance_prompt": "false", **fields}
    return {"path": EDITS, "files": files or (("image", "a.png", PNG, "image/png"),),
            "form": {k: v for k, v in form.items() if v is not None}}


def _cases() -> list[Case]:
    c: list[Case] = []
    add = c.append
    # --- authentication -----------------------------------------------------------------------------------------
    add(Case("auth", "no API key", 401, "missing_api_key", body=_chat(), auth=None))
    add(Case("auth", "wrong API key", 401, "invalid_api_key", body=_chat(), auth="sk-wrong"))
    add(Case("auth", "Basic instead of Bearer", 401, "missing_api_key", body=_chat(), auth=None,
             headers={"Authorization": f"Basic {KEY}"}))
    add(Case("auth", "models list without a key", 401, "missing_api_key", method="GET", path="/v1/models",
             auth=None))
    add(Case("auth", "images API without a key", 401, "missing_api_key", path=IMAGES, body=_images(), auth=None))
    # --- the body itself ----------------------------------------------------------------------------------------
    add(Case("body", "malformed JSON", 400, "invalid_json", raw=b'{"model": "m", "messages": [}'))
    add(Case("body", "empty body", 400, "invalid_json", raw=b""))
    add(Case("body", "JSON array instead of an object", 400, "invalid_body", body=[1, 2]))
    add(Case("body", "JSON nested 5000 deep", 400, "invalid_json", raw=b"[" * 5000 + b"]" * 5000))
    add(Case("body", "250001 JSON values in 500 KB (cap 200000)", 413, "request_too_large",
             raw=b"[" + b"0," * 250_000 + b"0]"))
    add(Case("body", "body over the cap (Content-Length)", 413, "request_too_large", raw=b"x" * (BODY_CAP + 1)))
    add(Case("body", "body over the cap (chunked, no Content-Length)", 413, "request_too_large",
             raw=b"x" * (BODY_CAP + 1), chunked=True))
    # --- chat fields --------------------------------------------------------------------------------------------
    add(Case("chat", "missing `model`", 400, "missing_required_parameter", "model",
             body={"messages": [{"role": "user", "content": "Hi"}]}))
    add(Case("chat", "missing `messages`", 400, "missing_required_parameter", "messages", body={"model": "{model}"}))
    add(Case("chat", "`model` is a number", 400, "invalid_type", "model", body=_chat(model=7)))
    add(Case("chat", "`messages` is a string", 400, "invalid_type", "messages", body=_chat(messages="Hi")))
    add(Case("chat", "unknown model", 404, "model_not_found", "model", body=_chat(model="gpt-nope")))
    add(Case("chat", "the image model on the chat route", 400, "invalid_model", "model",
             body=_chat(model="sdxl-reliability")))
    add(Case("chat", "empty `messages`", 400, "invalid_value", "messages", body=_chat(messages=[])))
    add(Case("chat", "invalid role", 400, "invalid_value", "messages[0].role",
             body=_chat(messages=[{"role": "wizard", "content": "Hi"}])))
    add(Case("chat", "message content is a number", 400, "invalid_type", "messages[0].content",
             body=_chat(messages=[{"role": "user", "content": 5}])))
    add(Case("chat", "content part of an unsupported type (video_url)", 400, "invalid_type",
             "messages[0].content[0]", body=_chat(messages=[{"role": "user", "content": [
                 {"type": "video_url", "video_url": {"url": "http://example.com/v.mp4"}}]}])))
    add(Case("chat", "text over the context length (engine)", 400, "context_length_exceeded", "messages",
             body=_chat(messages=[{"role": "user", "content": "hello " * 1500}])))
    add(Case("chat", "900000 characters of text (refused before the engine: context × 16)", 400,
             "context_length_exceeded", "messages", body=_chat(messages=[{"role": "user", "content": "word " * 180_000}])))
    add(Case("chat", "`max_tokens` = 0", 400, "invalid_value", "max_tokens", body=_chat(max_tokens=0)))
    add(Case("chat", "`max_tokens` < 0", 400, "invalid_value", "max_tokens", body=_chat(max_tokens=-5)))
    add(Case("chat", "`max_tokens` huge (engine)", 400, "invalid_value", "max_tokens",
             body=_chat(max_tokens=10**9)))
    add(Case("chat", "`max_tokens` is a string", 400, "invalid_type", "max_tokens", body=_chat(max_tokens="many")))
    add(Case("chat", "`n` over the limit (17)", 400, "invalid_value", "n", body=_chat(n=17)))
    add(Case("chat", "`n` = 0", 400, "invalid_value", "n", body=_chat(n=0)))
    add(Case("chat", "5 stop strings", 400, "invalid_value", "stop", body=_chat(stop=["a", "b", "c", "d", "e"])))
    add(Case("chat", "`temperature` > 2", 400, "invalid_value", "temperature", body=_chat(temperature=5)))
    add(Case("chat", "`temperature` < 0", 400, "invalid_value", "temperature", body=_chat(temperature=-1)))
    add(Case("chat", "`temperature` is a word", 400, "invalid_type", "temperature", body=_chat(temperature="hot")))
    add(Case("chat", "`top_p` > 1", 400, "invalid_value", "top_p", body=_chat(top_p=1.5)))
    add(Case("chat", "`top_p` < 0", 400, "invalid_value", "top_p", body=_chat(top_p=-0.1)))
    add(Case("chat", "`stream_options` without `stream`", 400, "invalid_value",
             body=_chat(stream_options={"include_usage": True})))
    add(Case("chat", "invalid `modalities`", 400, "invalid_value", "modalities",
             body=_chat(modalities=["text", "audio"])))
    add(Case("chat", "generation mode without a user message", 400, "invalid_value", "messages",
             body=_chat(modalities=["text", "image"], messages=[{"role": "system", "content": "Be brief."}])))
    fn = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    add(Case("chat", "`tools` with tool_choice auto (MGM cannot decide; name one)", 400, "unsupported_tool_choice",
             "tool_choice", body=_chat(tools=[fn])))
    add(Case("chat", "a `web_search` tool", 400, "unsupported_tool", "tools[0].type",
             body=_chat(tools=[{"type": "web_search"}], tool_choice="required")))
    add(Case("chat", "tool_choice names a function not in `tools`", 400, "invalid_value", "tool_choice",
             body=_chat(tools=[fn], tool_choice={"type": "function", "function": {"name": "g"}})))
    # --- inline images (data URLs) ------------------------------------------------------------------------------
    nine = _chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(PNG)}}] * 9 + [{"type": "text", "text": "x"}]}])
    add(Case("images in chat", "9 images (gateway cap 8)", 400, "too_many_images", "messages", body=nine))
    two = _chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(PNG)}}] * 2 + [{"type": "text", "text": "x"}]}])
    add(Case("images in chat", "2 images (the engine allows 1 per prompt)", 400, "invalid_value", "image", body=two))
    add(Case("images in chat", "invalid base64", 400, "invalid_image", URL,
             body=_image("data:image/png;base64,!!not*base64!!")))
    add(Case("images in chat", "data URL that is not an image (text/plain)", 400, "invalid_image", URL,
             body=_image("data:text/plain;base64," + base64.b64encode(b"hello").decode())))
    add(Case("images in chat", "image/png data URL holding text", 400, "invalid_image", URL,
             body=_image(data_url(b"hello, not a picture"))))
    add(Case("images in chat", "truncated PNG (header intact; the engine refuses it)", 400, None,
             body=_image(data_url(NOISY_PNG[:len(NOISY_PNG) // 2]))))
    add(Case("images in chat", "corrupt PNG (garbage after the signature)", 400, "invalid_image", URL,
             body=_image(data_url(PNG[:8] + b"\0" * 80))))
    add(Case("images in chat", "truncated JPEG (the engine refuses it)", 400, None,
             body=_image(data_url(NOISY_JPEG[:len(NOISY_JPEG) // 2], "image/jpeg"))))
    add(Case("images in chat", "PNG bomb: 100000x100000 declared", 413, "image_too_large", URL,
             body=_image(data_url(png_bomb()))))
    add(Case("images in chat", "JPEG bomb: 65000x65000 declared", 413, "image_too_large", URL,
             body=_image(data_url(jpeg_bomb(), "image/jpeg"))))
    add(Case("images in chat", "GIF (accepted)", 200, None, body=_image(data_url(_save("P", "GIF"), "image/gif"))))
    add(Case("images in chat", "WebP (accepted)", 200, None,
             body=_image(data_url(_save("RGB", "WEBP"), "image/webp"))))
    add(Case("images in chat", "CMYK JPEG (accepted)", 200, None,
             body=_image(data_url(_save("CMYK", "JPEG"), "image/jpeg"))))
    add(Case("images in chat", "16-bit grey PNG (accepted)", 200, None, body=_image(data_url(_save("I;16", "PNG")))))
    add(Case("images in chat", "TIFF (refused: not an allowed format)", 400, "invalid_image", URL,
             body=_image(data_url(_save("RGB", "TIFF"), "image/tiff"))))
    # --- image URLs: schemes and addresses (SSRF) -----------------------------------------------------------------
    refused = "image_url_not_allowed"
    for name, url in [("not a URL", "just some words"), ("`file:` scheme", "file:///etc/passwd"),
                      ("`ftp:` scheme", "ftp://example.com/a.png"), ("`gopher:` scheme", "gopher://example.com/_x"),
                      ("credentials in the URL", "http://user:pw@example.com/a.png"),
                      ("loopback 127.0.0.1", "http://127.0.0.1/a.png"), ("`localhost`", "http://localhost/a.png"),
                      ("loopback as a decimal integer", "http://2130706433/a.png"),
                      ("private 10.0.0.1", "http://10.0.0.1/a.png"), ("private 192.168.1.1", "http://192.168.1.1/"),
                      ("metadata 169.254.169.254", "http://169.254.169.254/latest/meta-data/"),
                      ("unspecified 0.0.0.0", "http://0.0.0.0/a.png"), ("IPv6 loopback [::1]", "http://[::1]/a.png"),
                      ("IPv6 unique-local [fd00::1]", "http://[fd00::1]/a.png"),
                      ("IPv6 link-local [fe80::1]", "http://[fe80::1]/a.png"),
                      ("IPv6 site-local (deprecated) [fec0::1]", "http://[fec0::1]/a.png"),
                      ("IPv4-mapped metadata [::ffff:169.254.169.254]", "http://[::ffff:169.254.169.254]/"),
                      ("DNS name resolving to 169.254.169.254", "http://metadata.reliability.test/a.png"),
                      ("DNS name resolving to fd00::1", "http://private6.reliability.test/a.png"),
                      ("DNS name with one public and one private address", "http://mixed.reliability.test/a.png"),
                      ("public address on port 8080 (only 80/443)", "http://93.184.216.34:8080/a.png"),
                      ("control character in the URL", "http://example.com/a\x01.png")]:
        add(Case("image URLs", name, 400, refused, URL, body=_image(url)))
    add(Case("image URLs", "DNS name that does not resolve", 400, "image_fetch_failed", URL,
             body=_image("http://nowhere.reliability.test/a.png")))
    add(Case("image URLs", "DNS answer slower than the DNS timeout (2 s)", 400, "image_fetch_failed", URL,
             body=_image(f"http://{SLOW_DNS}/a.png")))
    # --- image URLs: fetching (the loopback gateway reaches the test file server) --------------------------------
    for name, target in [("redirect to 10.0.0.1", "http://10.0.0.1/a.png"),
                         ("redirect to 169.254.169.254", "http://169.254.169.254/latest/meta-data/"),
                         ("redirect to a DNS name resolving to metadata", "http://metadata.reliability.test/"),
                         ("redirect to `file:`", "file:///etc/passwd")]:
        add(Case("image URLs", name, 400, refused, URL, body=_image("{files}/redirect?to=" + target),
                 gateway="loopback"))
    add(Case("image URLs", "redirect chain: allowed hop, then 169.254.169.254", 400, refused, URL,
             body=_image("{files}/redirect?to={files}/redirect?to=http://169.254.169.254/"), gateway="loopback"))
    add(Case("image URLs", "redirect loop", 400, "image_fetch_failed", URL, body=_image("{files}/loop"),
             gateway="loopback"))
    add(Case("image URLs", "slow server (3 s; fetch timeout 1 s)", 400, "image_fetch_failed", URL,
             body=_image("{files}/slow.png"), gateway="loopback"))
    add(Case("image URLs", "huge file, Content-Length 50 MB (cap 1 MiB)", 413, "image_too_large", URL,
             body=_image("{files}/huge.png"), gateway="loopback"))
    add(Case("image URLs", "huge file, chunked without a length (cap 1 MiB)", 413, "image_too_large", URL,
             body=_image("{files}/huge-chunked.png"), gateway="loopback"))
    add(Case("image URLs", "gzip bomb: `Content-Encoding: gzip, gzip`, ~250 B for 50 MB", 400, "image_fetch_failed",
             URL, body=_image("{files}/gzip-bomb.png"), gateway="loopback"))
    add(Case("image URLs", "not an image content type", 400, "invalid_image", URL, body=_image("{files}/text"),
             gateway="loopback"))
    add(Case("image URLs", "HTTP 404", 400, "image_fetch_failed", URL, body=_image("{files}/missing"),
             gateway="loopback"))
    add(Case("image URLs", "allowed URL (control)", 200, None, body=_image("{files}/img.png"), gateway="loopback"))
    add(Case("image URLs", "DNS name whose first address refuses the connection (the next one serves)", 200, None,
             body=_image("{files}/redirect-host?name=two-addresses.reliability.test"), gateway="loopback"))
    # --- images API -----------------------------------------------------------------------------------------------
    for name, fields, param in [("size not WxH", {"size": "big"}, "size"),
                                ("size not a multiple of 8", {"size": "100x100"}, "size"),
                                ("size over the maximum", {"size": "4096x4096"}, "size"),
                                ("`n` = 0", {"n": 0}, "n"), ("`n` = 11", {"n": 11}, "n"),
                                ("`response_format` png", {"response_format": "png"}, "response_format"),
                                ("`quality` ultra", {"quality": "ultra"}, "quality"),
                                ("`num_inference_steps` = 0", {"num_inference_steps": 0}, "num_inference_steps"),
                                ("prompt over 4000 characters", {"prompt": "x" * 4001}, "prompt"),
                                ("`guidance_scale` true (a boolean is not a number)", {"guidance_scale": True},
                                 "guidance_scale")]:
        add(Case("images API", name, 400, "invalid_value", param, path=IMAGES, body=_images(**fields)))
    add(Case("images API", "missing `prompt`", 400, "missing_required_parameter", "prompt", path=IMAGES,
             body={"size": "64x64"}))
    add(Case("images API", "unknown image model", 404, "model_not_found", "model", path=IMAGES,
             body=_images(model="imagen-4")))
    add(Case("images API", "the chat model on the images route", 400, "invalid_model", "model", path=IMAGES,
             body=_images(model="{model}")))
    # --- image edits (multipart, as the SDKs send them; one JSON body) ------------------------------------------
    image = ("image", "a.png", PNG, "image/png")
    for name, extra, fields, status, code, param in [
        ("mask of another size", [("mask", "m.png", _save("RGBA", "PNG", (32, 32)), "image/png")], {}, 400,
         "invalid_value", "mask"),
        ("mask without an alpha channel", [("mask", "m.png", PNG, "image/png")], {}, 400, "invalid_image", "mask"),
        ("mask as a JPEG", [("mask", "m.jpg", _save("RGB", "JPEG"), "image/jpeg")], {}, 400, "invalid_image", "mask"),
        ("5 images (cap 4)", [image] * 4, {}, 400, "too_many_images", "image"),
        ("6 images (more file parts than the parser takes)", [image] * 5, {}, 400, "too_many_images", "image"),
        ("5 images + mask", [image] * 4 + [("mask", "m.png", RGBA_MASK, "image/png")], {}, 400, "too_many_images",
         "image"),
        ("`strength` 1.5", [], {"strength": "1.5"}, 400, "invalid_value", "strength"),
        ("`strength` 0", [], {"strength": "0"}, 400, "invalid_value", "strength"),
        ("`partial_images` 4", [], {"stream": "true", "partial_images": "4"}, 400, "invalid_value", "partial_images"),
        ("`background` transparent (SDXL has no alpha)", [], {"background": "transparent"}, 400, "invalid_value",
         "background"),
        ("`output_format` gif", [], {"output_format": "gif"}, 400, "invalid_value", "output_format"),
        ("`output_compression` 101", [], {"output_compression": "101"}, 400, "invalid_value", "output_compression"),
        ("missing `prompt`", [], {"prompt": None}, 400, "missing_required_parameter", "prompt"),
        ("unknown image model", [], {"model": "imagen-4"}, 404, "model_not_found", "model")]:
        add(Case("image edits", name, status, code, param, **_edit(image, *extra, **fields)))
    add(Case("image edits", "missing `image`", 400, "missing_required_parameter", "image",
             **_edit(("mask", "m.png", RGBA_MASK, "image/png"))))
    add(Case("image edits", "non-image upload (text)", 400, "invalid_image", "image",
             **_edit(("image", "a.png", b"hello, not a picture", "image/png"))))
    add(Case("image edits", "GIF upload (edits take PNG, JPEG, WebP)", 400, "invalid_image", "image",
             **_edit(("image", "a.gif", _save("P", "GIF"), "image/gif"))))
    add(Case("image edits", "oversized image: PNG bomb, 100000x100000 declared", 413, "image_too_large", "image",
             **_edit(("image", "a.png", png_bomb(), "image/png"))))
    add(Case("image edits", "second image not readable", 400, "invalid_image", "image[1]",
             **_edit(image, ("image[]", "b.png", b"garbage", "image/png"))))
    add(Case("image edits", "image URL to 169.254.169.254 (JSON body)", 400, "image_url_not_allowed", "image",
             path=EDITS, body={"prompt": "x", "image": "http://169.254.169.254/latest/meta-data/"}))
    add(Case("image edits", "image over the 1 MiB image cap (URL, JSON body)", 413, "image_too_large", "image",
             path=EDITS, body={"prompt": "x", "image": "{files}/huge.png"}, gateway="loopback"))
    add(Case("image edits", "`images[0].file_id` (OpenAI's JSON reference; no Files API here)", 400,
             "unsupported_parameter", "images[0].file_id", path=EDITS,
             body={"prompt": "x", "images": [{"file_id": "file-abc"}]}))
    add(Case("image edits", "`images[0]` with neither `image_url` nor `file_id`", 400, "missing_required_parameter",
             "images[0]", path=EDITS, body={"prompt": "x", "images": [{}]}))
    add(Case("image edits", "without a key", 401, "missing_api_key", auth=None, **_edit()))
    # --- Responses API --------------------------------------------------------------------------------------------
    for name, body, status, code, param in [
        ("unknown `previous_response_id`", _resp(previous_response_id="resp_unknown"), 404, "not_found",
         "previous_response_id"),
        ("`function` tool (only image_generation runs)", _resp(tools=[{"type": "function", "name": "f"}]), 400,
         "unsupported_tool", "tools[0].type"),
        ("`web_search` tool", _resp(tools=[{"type": "web_search"}]), 400, "unsupported_tool", "tools[0].type"),
        ("image tool with a transparent background", _resp(tools=[{"type": "image_generation",
                                                                   "background": "transparent"}]), 400,
         "invalid_value", "tools[0].background"),
        ("`tool_choice` names a tool not listed", _resp(tool_choice={"type": "image_generation"}), 400,
         "invalid_value", "tool_choice"),
        ("`max_output_tokens` = 0", _resp(max_output_tokens=0), 400, "invalid_value", "max_output_tokens"),
        ("`background: true`", _resp(background=True), 400, "unsupported_parameter", "background"),
        ("missing `input`", {"model": "{model}"}, 400, "missing_required_parameter", "input"),
        ("empty `input` list", _resp(input=[]), 400, "invalid_value", "input"),
        ("input item with an unknown role", _resp(input=[{"role": "wizard", "content": "x"}]), 400,
         "invalid_value", "input[0].role"),
        ("input part of an unknown type", _resp(input=[{"role": "user", "content": [{"type": "input_audio"}]}]), 400,
         "invalid_type", "input[0].content[0]"),
        ("input_image with a file_id (no Files API)", _resp(input=[{"role": "user", "content": [
            {"type": "input_image", "file_id": "file-1"}]}]), 400, "invalid_value", "input[0].content[0].image_url"),
        ("input_image URL to 169.254.169.254", _resp_image("http://169.254.169.254/latest/meta-data/"), 400,
         "image_url_not_allowed", "input"),
        ("input_image that is not an image", _resp_image(data_url(b"hello, not a picture")), 400, "invalid_image",
         "input"),
        ("9 input images (gateway cap 8)", _resp(input=[{"role": "user", "content": [
            {"type": "input_image", "image_url": data_url(PNG)}] * 9}]), 400, "too_many_images", "input"),
        ("unknown model", _resp(model="gpt-nope"), 404, "model_not_found", "model"),
        ("retrieve an unknown id", None, 404, "not_found", "response_id")]:
        if body is None:
            add(Case("Responses API", name, status, code, param, method="GET", path=RESPONSES + "/resp_unknown"))
        else:
            add(Case("Responses API", name, status, code, param, path=RESPONSES, body=body))
    add(Case("Responses API", "without a key", 401, "missing_api_key", path=RESPONSES, body=_resp(), auth=None))
    # --- routes -------------------------------------------------------------------------------------------------
    add(Case("routes", "unknown route", 404, "not_found", method="GET", path="/v1/nothing"))
    add(Case("routes", "unknown model id", 404, "model_not_found", "model", method="GET", path="/v1/models/gpt-nope"))
    add(Case("routes", "embeddings (no embedding model here)", 404, "model_not_found", "model",
             path="/v1/embeddings", body={"model": "text-embedding-3-small", "input": "hi"}))
    add(Case("routes", "GET on a POST route", 405, "method_not_allowed", method="GET"))
    return c


CASES = _cases()
