"""SSRF policy of the gateway's remote image fetching: IP classification, URL parsing, DNS vetting, and real fetches
from a local HTTP server (redirect hops re-checked, caps, content type, connect-to-vetted-IP)."""

from __future__ import annotations

import asyncio
import base64

import pytest

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
    target, ip = asyncio.run(vet("http://ok.test/a.png", policy, _resolver(table)))
    assert (target.host, ip) == ("ok.test", "93.184.216.34")
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
