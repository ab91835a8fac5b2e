"""SSRF policy of the gateway's remote image fetching: IP classification, URL parsing, DNS vetting, and real fetches
from a local HTTP server (redirect hops re-checked, caps, content type, connect-to-vetted-IP)."""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import socket
import struct
import threading
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler

import pytest
from PIL import Image
from support.live import http_server

from server.gateway.config import ImagePolicy
from server.errors import APIError
from server.gateway.image_fetch import ImageURLRefused, check_data_url, fetch_image, ip_refusal, parse_url, vet

REFUSED = [
    "127.0.0.1", "127.1.2.3", "10.0.0.1", "10.255.255.255", "172.16.0.1", "172.31.255.1", "192.168.1.1",
    "169.254.169.254", "169.254.0.1", "100.64.0.1", "0.0.0.0", "224.0.0.1", "255.255.255.255",
    "::1", "::", "fc00::1", "fd00:ec2::254", "fe80::1", "fe80::1%eth0", "ff02::1",
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254", "::ffff:192.168.0.1",
    "2002:7f00:1::1",  # 6to4 wrapping 127.0.0.1
    "64:ff9b::a00:1",  # NAT64 wrapping 10.0.0.1
    "2001::1",  # Teredo
    "::7f00:1",  # deprecated IPv4-compatible
    "fec0::1", "feff:ffff::1",  # deprecated site-local fec0::/10
]
PUBLIC = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]


@pytest.mark.parametrize("ip", REFUSED)
def test_non_public_ips_are_refused(ip):
    assert ip_refusal(ip) is not None


@pytest.mark.parametrize("ip", PUBLIC)
def test_public_ips_pass(ip):
    assert ip_refusal(ip) is None


def test_loopback_test_setting_allows_only_loopback():
    for ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1"):
        assert ip_refusal(ip, allow_loopback=True) is None
    for ip in ("10.0.0.1", "169.254.169.254", "192.168.1.1", "fc00::1", "fe80::1", "0.0.0.0"):
        assert ip_refusal(ip, allow_loopback=True) is not None


@pytest.mark.parametrize("url", [
    "file:///etc/passwd", "ftp://example.com/a.png", "gopher://example.com/_x", "javascript:alert(1)",
    "dict://example.com:11211/", "example.com/a.png", "http://user:pw@example.com/a.png", "http:///a.png",
    "http://[::1/a.png",
])
def test_bad_urls_are_refused(url):
    with pytest.raises(ImageURLRefused):
        parse_url(url, ImagePolicy())


def test_parse_and_allow_list():
    t = parse_url("https://Images.Example.com/a/b.png?x=1", ImagePolicy())
    assert (t.scheme, t.host, t.port, t.path, t.host_header) == ("https", "images.example.com", 443, "/a/b.png?x=1",
                                                                 "images.example.com")
    assert parse_url("http://[2606:4700::1]:8080", ImagePolicy()).url_for("2606:4700::1") == \
        "http://[2606:4700::1]:8080/"
    policy = ImagePolicy(allowed_domains=("example.com",))
    assert parse_url("http://cdn.example.com/x.png", policy).host == "cdn.example.com"
    for url in ("http://example.org/x.png", "http://badexample.com/x.png", "http://8.8.8.8/x.png"):
        with pytest.raises(ImageURLRefused, match="allowed domains"):
            parse_url(url, policy)


def _resolver(table: dict[str, list[str]], calls: list[str] | None = None):  # type: ignore[no-untyped-def]
    async def resolve(host: str, _port: int) -> list[str]:
        if calls is not None:
            calls.append(host)
        if host not in table:
            raise OSError("NXDOMAIN")
        return table[host]

    return resolve


def test_dns_names_resolving_to_private_addresses_are_refused():
    table = {"meta.evil.test": ["169.254.169.254"], "mixed.evil.test": ["93.184.216.34", "10.0.0.7"],
             "v6.evil.test": ["::ffff:127.0.0.1"], "ok.test": ["93.184.216.34", "93.184.216.35"]}
    policy = ImagePolicy()
    for host in ("meta.evil.test", "mixed.evil.test", "v6.evil.test"):
        with pytest.raises(ImageURLRefused, match="resolves to"):
            asyncio.run(vet(f"http://{host}/a.png", policy, _resolver(table)))
    target, ips = asyncio.run(vet("http://ok.test/a.png", policy, _resolver(table)))
    assert (target.host, ips) == ("ok.test", ["93.184.216.34", "93.184.216.35"])
    with pytest.raises(APIError, match="Could not resolve"):
        asyncio.run(vet("http://nowhere.test/a.png", policy, _resolver(table)))


def test_data_url_checks(png):
    check_data_url("data:image/png;base64," + base64.b64encode(png).decode(), ImagePolicy())
    for bad in ("data:text/plain;base64,AAAA", "data:image/png,raw", "data:image/png;base64",
                "data:image/png;base64,AAAA", "data:image/png;base64,!!!!"):
        with pytest.raises(APIError) as info:
            check_data_url(bad, ImagePolicy())
        assert info.value.status == 400
    with pytest.raises(APIError) as info:
        check_data_url("data:image/png;base64," + "A" * 400, ImagePolicy(max_bytes=100))
    assert info.value.status == 413


# --- real fetches from a local HTTP server on 127.0.0.1 ---------------------------------------------------------------

LOOPBACK = ImagePolicy(allow_loopback=True, timeout_s=5)


def _fetch(url: str, policy: ImagePolicy = LOOPBACK, **kwargs) -> str:  # type: ignore[no-untyped-def]
    return asyncio.run(fetch_image(url, policy, **kwargs))


def test_fetch_image_as_data_url(image_server, png):
    out = _fetch(image_server.base + "/img.png")
    assert out == "data:image/png;base64," + base64.b64encode(png).decode()


def test_loopback_refused_without_the_test_setting(image_server):
    port = image_server.base.rsplit(":", 1)[1]
    for url in (image_server.base + "/img.png", f"http://localhost:{port}/img.png", f"http://[::1]:{port}/img.png",
                f"http://2130706433:{port}/img.png", f"http://0x7f000001:{port}/img.png", f"http://127.1:{port}/img.png",
                f"http://[::ffff:127.0.0.1]:{port}/img.png"):
        with pytest.raises(ImageURLRefused):
            _fetch(url, ImagePolicy())


def test_every_redirect_hop_is_checked(image_server):
    for target in ("http://10.0.0.1/a.png", "http://169.254.169.254/latest/meta-data/", "http://[fd00::1]/a.png",
                   "file:///etc/passwd", "http://metadata.evil.test/a.png"):
        with pytest.raises(ImageURLRefused):
            _fetch(f"{image_server.base}/redirect?to={target}",
                   resolver=_resolver({"127.0.0.1": ["127.0.0.1"], "metadata.evil.test": ["169.254.169.254"]}))
    # a redirect to an allowed place is followed
    assert _fetch(f"{image_server.base}/redirect?to=/img.png").startswith("data:image/png;base64,")
    with pytest.raises(APIError, match="redirected more than"):
        _fetch(image_server.base + "/loop")


def test_connects_to_the_vetted_ip_with_the_original_host(image_server):
    """The name is resolved once by the policy; the connection goes to that IP (the name does not exist in real
    DNS), the Host header keeps the name."""
    port = image_server.base.rsplit(":", 1)[1]
    calls: list[str] = []
    out = _fetch(f"http://images.gateway.test:{port}/img.png",
                 resolver=_resolver({"images.gateway.test": ["127.0.0.1"]}, calls))
    assert out.startswith("data:image/png;base64,") and calls == ["images.gateway.test"]
    assert image_server.hosts[-1] == f"images.gateway.test:{port}"


@pytest.mark.parametrize(("path", "policy", "status", "code"), [
    ("/notimage", LOOPBACK, 400, "invalid_image"),
    ("/fake.png", LOOPBACK, 400, "invalid_image"),
    ("/missing", LOOPBACK, 400, "image_fetch_failed"),
    ("/img.png", ImagePolicy(allow_loopback=True, max_bytes=50), 413, "image_too_large"),
    ("/img.png", ImagePolicy(allow_loopback=True, max_pixels=40 * 70 - 1), 413, "image_too_large"),
    ("/img.png", ImagePolicy(allow_loopback=True, content_types=("image/jpeg",)), 400, "invalid_image"),
    ("/slow.png", ImagePolicy(allow_loopback=True, timeout_s=0.5), 400, "image_fetch_failed"),
])
def test_fetch_limits(image_server, path, policy, status, code):
    with pytest.raises(APIError) as info:
        _fetch(image_server.base + path, policy)
    assert (info.value.status, info.value.code) == (status, code)


# --- hardening: encoded bodies, DNS, ports, every address, control characters, crafted headers -------------------------


class _EncodedHandler(BaseHTTPRequestHandler):
    """/bomb.png: a PNG content type whose body is 50 MB of zeros gzipped twice (a few hundred bytes on the wire),
    sent with ``Content-Encoding: gzip, gzip``; /gzip.png: the test PNG gzipped once. Records Accept-Encoding."""

    png = b""
    bomb = b""
    accept: list[str] = []

    def log_message(self, *args) -> None:  # type: ignore[no-untyped-def]
        pass

    def do_GET(self) -> None:
        type(self).accept.append(self.headers.get("Accept-Encoding", ""))
        if self.path == "/bomb.png":
            body, coding = self.bomb, "gzip, gzip"
        else:
            body, coding = gzip.compress(self.png), "gzip"
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Encoding", coding)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:  # the client hangs up after the headers
            pass


@pytest.fixture(scope="module")
def encoded_server(png):  # type: ignore[no-untyped-def]
    bomb = gzip.compress(gzip.compress(b"\0" * (50 * 1024 * 1024), 9), 9)  # made here: tracemalloc sees all threads
    handler = type("Encoded", (_EncodedHandler,), {"png": png, "bomb": bomb, "accept": []})
    with http_server(handler) as base:
        yield base, handler.accept


@pytest.mark.parametrize("path", ["/bomb.png", "/gzip.png"])
def test_content_encodings_are_refused_not_decoded(encoded_server, path):
    """A stacked-gzip bomb (~250 B -> 50 MB in one read when decoded) is refused on its header: the gateway asks for
    identity, reads raw bytes only, and never runs a decoder (peak allocation stays far below the decoded size)."""
    base, accept = encoded_server
    tracemalloc.start()
    try:
        with pytest.raises(APIError) as info:
            _fetch(base + path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (info.value.status, info.value.code) == (400, "image_fetch_failed")
    assert "Content-Encoding" in info.value.message and accept[-1] == "identity"
    assert peak < 5 * 1024 * 1024, peak


def test_dns_timeout_names_the_host():
    async def slow(host: str, _port: int) -> list[str]:
        await asyncio.sleep(5)
        return ["93.184.216.34"]

    t0 = time.monotonic()
    with pytest.raises(APIError) as info:
        asyncio.run(vet("http://slow.dns.test/a.png", ImagePolicy(dns_timeout_s=0.2), slow))
    assert time.monotonic() - t0 < 2
    assert (info.value.status, info.value.code) == (400, "image_fetch_failed")
    assert "slow.dns.test" in info.value.message and "longer than 0.2 s" in info.value.message


def test_system_resolver_has_its_own_bounded_pool(monkeypatch):
    """getaddrinfo runs in the DNS pool, never the default executor; a hanging lookup is cut by dns_timeout_s and
    the default executor stays free meanwhile."""
    release = threading.Event()
    threads: list[str] = []

    def fake_getaddrinfo(host, port, *args, **kwargs):  # type: ignore[no-untyped-def]
        threads.append(threading.current_thread().name)
        if host == "hang.test":
            release.wait(10)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port))]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(max_workers=1))
        policy = ImagePolicy(dns_timeout_s=0.3)
        hung = [asyncio.create_task(vet(f"http://hang.test/{i}.png", policy)) for i in range(20)]
        await asyncio.sleep(0.05)
        # the default executor (one thread here) is not taken by the hanging lookups
        assert await asyncio.wait_for(loop.run_in_executor(None, lambda: 42), 1) == 42
        for result in await asyncio.gather(*hung, return_exceptions=True):
            assert isinstance(result, APIError) and result.code == "image_fetch_failed", result
        release.set()
        _, ips = await vet("http://ok.test/a.png", policy)
        assert ips == ["93.184.216.34"]

    asyncio.run(main())
    assert threads and all(name.startswith("mgm-dns") for name in threads), threads
    assert len(threads) <= 8 + 1  # queued lookups whose caller gave up never ran


def test_ports_other_than_80_and_443_are_refused():
    calls: list[str] = []
    resolve = _resolver({"ok.test": ["93.184.216.34"], "lo.test": ["127.0.0.1"]}, calls)
    for url in ("http://ok.test:8080/a.png", "https://ok.test:8443/a.png", "http://93.184.216.34:22/",
                "http://ok.test:6379/a.png"):
        with pytest.raises(ImageURLRefused, match="port"):
            asyncio.run(vet(url, ImagePolicy(), resolve))
    assert calls == []  # refused before any DNS work
    for url in ("http://ok.test/a.png", "http://ok.test:443/a.png", "https://ok.test:80/a.png"):
        asyncio.run(vet(url, ImagePolicy(), resolve))
    asyncio.run(vet("http://ok.test:8080/a.png", ImagePolicy(allowed_ports=(80, 8080)), resolve))
    # the test-only loopback switch allows any port for loopback targets only
    asyncio.run(vet("http://lo.test:8080/a.png", ImagePolicy(allow_loopback=True), resolve))
    with pytest.raises(ImageURLRefused, match="port 8080"):
        asyncio.run(vet("http://ok.test:8080/a.png", ImagePolicy(allow_loopback=True), resolve))


def test_redirect_to_a_refused_port_is_refused(image_server):
    with pytest.raises(ImageURLRefused, match="port"):
        _fetch(f"{image_server.base}/redirect?to=http://93.184.216.34:8080/a.png")


def test_every_resolved_address_is_tried_in_turn(image_server):
    """The first address refuses the connection (nothing listens on 127.0.0.2), the second serves the image."""
    port = image_server.base.rsplit(":", 1)[1]
    resolve = _resolver({"two.test": ["127.0.0.2", "127.0.0.1"], "none.test": ["127.0.0.2", "127.0.0.3"]})
    assert _fetch(f"http://two.test:{port}/img.png", resolver=resolve).startswith("data:image/png;base64,")
    assert image_server.hosts[-1] == f"two.test:{port}"
    with pytest.raises(APIError) as info:
        _fetch(f"http://none.test:{port}/img.png", resolver=resolve)
    assert (info.value.status, info.value.code) == (400, "image_fetch_failed")


@pytest.mark.parametrize("url", ["http://example.com/a\x01.png", "http://example.com/a\x7f.png",
                                 "http://exa\x00mple.com/a.png", "http://example.com/a\r\nX-Evil: 1", "http://ex\tample.com/"])
def test_control_characters_in_image_urls_are_refused(url):
    with pytest.raises(ImageURLRefused, match="control character"):
        _fetch(url, ImagePolicy())


def test_crafted_headers_any_pillow_error_is_a_400(png, monkeypatch):
    """Whatever a format plugin raises on a crafted header (struct.error, IndexError, ...) is a 400 invalid_image;
    formats outside the policy never reach their plugin."""
    from PIL import PngImagePlugin, TiffImagePlugin

    url = "data:image/png;base64," + base64.b64encode(png).decode()
    for exc in (struct.error("unpack requires a buffer"), IndexError("list index"), ZeroDivisionError(), KeyError(3)):
        def boom(self, exc=exc):  # type: ignore[no-untyped-def]
            raise exc

        monkeypatch.setattr(PngImagePlugin.PngImageFile, "_open", boom)
        with pytest.raises(APIError) as info:
            check_data_url(url, ImagePolicy())
        assert (info.value.status, info.value.code) == (400, "invalid_image")
    monkeypatch.undo()

    def never(self):  # type: ignore[no-untyped-def]
        raise AssertionError("the TIFF plugin must not parse client bytes")

    monkeypatch.setattr(TiffImagePlugin.TiffImageFile, "_open", never)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="TIFF")
    with pytest.raises(APIError, match="accepted format") as info:
        check_data_url("data:image/tiff;base64," + base64.b64encode(buf.getvalue()).decode(), ImagePolicy())
    assert info.value.status == 400
