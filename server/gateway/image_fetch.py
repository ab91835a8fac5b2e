"""Remote image fetching for ``image_url`` parts: the gateway downloads ``http(s)`` images itself and forwards them
to the engines as ``data:`` URLs, so engines never open outbound connections.

SSRF policy (every redirect hop is vetted again):

* schemes ``http``/``https`` only, no credentials or control characters in the URL, optional domain allow-list,
  ports from ``ImagePolicy.allowed_ports`` only (80/443 by default);
* the host name is resolved once, in a small thread pool of its own with a timeout (``dns_timeout_s``); if **any**
  address is not globally routable (private, loopback, link-local incl. 169.254.169.254, CGNAT, multicast, reserved,
  unspecified, unique-local fc00::/7, site-local fec0::/10, and IPv4 addresses embedded in IPv6: ``::ffff:a.b.c.d``,
  6to4, NAT64) the URL is refused;
* the connection goes to the vetted IPs themselves, in the resolver's order, the next one when a connection fails
  (Host header and TLS SNI/certificate check keep the name), so a second DNS answer cannot rebind it; proxies from
  the environment are ignored;
* caps: total time, connect time, body bytes (raw bytes as received: content encodings are refused, so nothing is
  decompressed), pixels (PIL reads the header only, of the accepted formats only), content type (header and the real
  format).

``ImagePolicy.allow_loopback`` is a test-only switch that lets 127.0.0.0/8 and ::1 through (nothing else), on any port.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import io
import ipaddress
import logging
import re
import socket
import warnings
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

from server.errors import APIError
from server.gateway.config import ImagePolicy
from server.gateway.metrics import GatewayMetrics

logger = logging.getLogger("mgm.gateway.images")

Resolver = Callable[[str, int], Awaitable[list[str]]]
_REDIRECTS = (301, 302, 303, 307, 308)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # urlsplit silently drops tab/CR/LF, httpx rejects the others (500)


class ImageURLRefused(APIError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(400, message, code="image_url_not_allowed", param=param)


def ip_refusal(ip: str, *, allow_loopback: bool = False) -> str | None:
    """Why ``ip`` may not be fetched, or None when it is a public address."""
    try:
        addr: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return "not an IP address"
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.is_site_local:  # fec0::/10: deprecated, but still routed inside some networks; is_global says yes
            return "site-local address"
        if addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        elif addr.sixtofour is not None:
            addr = addr.sixtofour
        elif addr.teredo is not None:
            return "Teredo address"
        elif addr in _NAT64:
            addr = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    if addr.is_loopback:
        return None if allow_loopback else "loopback address"
    if addr.is_link_local:
        return "link-local address"
    if addr.is_multicast:
        return "multicast address"
    if addr.is_unspecified or addr.is_reserved:
        return "reserved address"
    if addr.is_private or not addr.is_global:
        return "private address"
    return None


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str  # lower-case, IDNA-encoded name, or the IP literal without brackets
    port: int
    path: str  # path + query, never empty

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"

    def url_for(self, ip: str) -> str:
        host = f"[{ip}]" if ":" in ip else ip
        return f"{self.scheme}://{host}:{self.port}{self.path}"


def parse_url(url: str, policy: ImagePolicy) -> Target:
    """Scheme, credentials, host syntax and allow-list checks (no network)."""
    if _CONTROL.search(url):
        raise ImageURLRefused("Image URL contains a control character.")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ImageURLRefused(f"Invalid image URL: {exc}.") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ImageURLRefused(f"Image URL scheme {scheme or '(none)'!r} is not allowed; use http, https or data.")
    if parts.username is not None or parts.password is not None:
        raise ImageURLRefused("Image URLs with credentials are not allowed.")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise ImageURLRefused("Image URL has no host.")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        try:
            host = host.encode("idna").decode("ascii").lower()
        except UnicodeError:
            raise ImageURLRefused("Image URL host is not a valid name.") from None
    if policy.allowed_domains and not any(host == d or host.endswith("." + d) for d in policy.allowed_domains):
        raise ImageURLRefused(f"Image host {host!r} is not in the allowed domains.")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(scheme, host, port or (443 if scheme == "https" else 80), path)


#: getaddrinfo blocks a thread. It gets this small pool of its own, so that slow DNS answers (an attacker's name
#: server) cannot take the event loop's default executor, which data-URL checks and discovery need. vet() bounds the
#: wait (``ImagePolicy.dns_timeout_s``); a query past it keeps its thread until libc gives up, queued queries whose
#: caller gave up are cancelled before they start, so the pool never holds more than its threads' worth of work.
_DNS_POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="mgm-dns")


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().run_in_executor(
        _DNS_POOL, functools.partial(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM))
    return [str(info[4][0]) for info in infos]


async def _resolve(target: Target, policy: ImagePolicy, resolver: Resolver) -> list[str]:
    try:
        ipaddress.ip_address(target.host)
        return [target.host]
    except ValueError:
        pass
    try:
        async with asyncio.timeout(policy.dns_timeout_s):
            ips = list(dict.fromkeys(await resolver(target.host, target.port)))
    except TimeoutError:  # before OSError, its base class
        raise APIError(400, f"Resolving image host {target.host!r} took longer than {policy.dns_timeout_s:g} s.",
                       code="image_fetch_failed") from None
    except (OSError, UnicodeError):
        raise APIError(400, f"Could not resolve image host {target.host!r}.", code="image_fetch_failed") from None
    if not ips:
        raise APIError(400, f"Could not resolve image host {target.host!r}.", code="image_fetch_failed")
    return ips


async def vet(url: str, policy: ImagePolicy, resolver: Resolver = system_resolver) -> tuple[Target, list[str]]:
    """The parsed target and the IPs to connect to, in order; refuses when any resolved address is not public, or
    the port is not allowed (any port for loopback-only targets when the test-only ``allow_loopback`` is set)."""
    target = parse_url(url, policy)
    port_allowed = target.port in policy.allowed_ports
    port_refused = ImageURLRefused(f"Image URL port {target.port} is not allowed (allowed: "
                                   f"{', '.join(map(str, policy.allowed_ports)) or 'none'}).")
    if not port_allowed and not policy.allow_loopback:  # before any DNS work
        raise port_refused
    ips = await _resolve(target, policy, resolver)
    for ip in ips:
        why = ip_refusal(ip, allow_loopback=policy.allow_loopback)
        if why is not None:
            raise ImageURLRefused(f"Image URL host {target.host!r} resolves to a {why}; refused.")
    if not port_allowed and any(ip_refusal(ip) != "loopback address" for ip in ips):
        raise port_refused
    return target, ips


def check_data_url(url: str, policy: ImagePolicy) -> None:
    """A client's ``data:`` URL: shape, size cap, strict base64, and the same header-only image checks as a fetched
    image (real format allowed, pixel cap against decompression bombs). The engine does the full decode."""
    decode_data_url(url, policy)


def decode_data_url(url: str, policy: ImagePolicy) -> bytes:
    """:func:`check_data_url`, returning the image's bytes."""
    head, sep, payload = url.partition(",")
    if not sep or not head.lower().startswith("data:image/") or not head.lower().endswith(";base64"):
        raise APIError(400, "Image data URLs must look like data:image/<type>;base64,<data>.", code="invalid_image")
    if len(payload) * 3 // 4 > policy.max_bytes:
        raise APIError(413, f"Image is larger than {policy.max_bytes} bytes.", code="image_too_large")
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "The image data URL is not valid base64.", code="invalid_image") from None
    _inspect(data, policy, "The image data URL does not hold a readable image.")
    return data


@functools.lru_cache(maxsize=8)
def _pil_formats(content_types: tuple[str, ...]) -> tuple[str, ...]:
    """Pillow's format names for the accepted MIME types (image/bmp → BMP and DIB, ...)."""
    from PIL import Image

    Image.init()
    return tuple(fmt for fmt, mime in Image.MIME.items() if mime in content_types)


def _inspect(data: bytes, policy: ImagePolicy, unreadable: str = "The image URL did not return a readable image.") -> str:
    """The image's MIME type from its real format, after the pixel cap (header only, no full decode)."""
    return describe_image(data, policy, unreadable)[0]


def describe_image(data: bytes, policy: ImagePolicy, unreadable: str = "The image is not a readable image."
                   ) -> tuple[str, int, int]:
    """(MIME type from the real format, width, height), after the format and pixel checks (header only)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own pixel cap decides below
            # Only the accepted formats' plugins look at the bytes (no TIFF/PSD/... parser on client input).
            with Image.open(io.BytesIO(data), formats=_pil_formats(policy.content_types)) as img:
                width, height = img.size
                mime = Image.MIME.get(img.format or "", "")
    except Image.DecompressionBombError:
        raise APIError(413, f"Image has more than {policy.max_pixels} pixels.", code="image_too_large") from None
    except Exception:  # noqa: BLE001 - crafted headers make plugins raise struct.error, IndexError, ...: all a 400
        raise APIError(400, f"{unreadable[:-1]} in an accepted format ({', '.join(policy.content_types)}).",
                       code="invalid_image") from None
    if mime not in policy.content_types:
        raise APIError(400, f"Image format {mime or 'unknown'} is not supported.", code="invalid_image")
    if width * height > policy.max_pixels:
        raise APIError(413, f"Image has {width}x{height} pixels, more than {policy.max_pixels}.",
                       code="image_too_large")
    return mime, width, height


async def _send(client: httpx.AsyncClient, target: Target, ips: list[str]) -> httpx.Response:
    """GET ``target`` from the first of its vetted ``ips`` that takes the connection (the next one when connecting
    fails or times out; nothing has been sent then, so trying again is safe)."""
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    for n, ip in enumerate(ips):
        try:
            # Accept-Encoding identity: see the body loop in _download.
            request = client.build_request("GET", target.url_for(ip), extensions=extensions, headers={
                "Host": target.host_header, "Accept": "image/*", "Accept-Encoding": "identity",
                "User-Agent": "minigemini-serve-gateway"})
        except httpx.InvalidURL as exc:  # parse_url lets nothing through that gets here; a 400 all the same
            raise ImageURLRefused(f"Invalid image URL: {exc}.") from None
        try:
            return await client.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            if n == len(ips) - 1:
                raise
            logger.info("image host %r: connecting to %s failed (%s); trying its next address", target.host, ip,
                        type(exc).__name__)
    raise AssertionError("unreachable: vet() returns at least one address")


async def _download(url: str, policy: ImagePolicy, resolver: Resolver) -> bytes:
    timeout = httpx.Timeout(policy.timeout_s, connect=policy.connect_timeout_s)
    # trust_env=False: no proxy from the environment (a proxy would resolve the name again).
    async with httpx.AsyncClient(trust_env=False, follow_redirects=False, timeout=timeout) as client:
        for _hop in range(policy.max_redirects + 1):
            target, ips = await vet(url, policy, resolver)
            response = await _send(client, target, ips)
            try:
                if response.status_code in _REDIRECTS:
                    location = response.headers.get("location")
                    if not location:
                        raise APIError(400, "Image URL redirected without a Location.", code="image_fetch_failed")
                    url = urljoin(url, location)
                    continue
                if response.status_code != 200:
                    raise APIError(400, f"Image URL returned HTTP {response.status_code}.", code="image_fetch_failed")
                ctype = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
                if ctype not in policy.content_types:
                    raise APIError(400, f"Image URL content type {ctype or '(none)'!r} is not an allowed image type.",
                                   code="invalid_image")
                length = response.headers.get("content-length")
                if length is not None and length.isdigit() and int(length) > policy.max_bytes:
                    raise APIError(413, f"Image is larger than {policy.max_bytes} bytes.", code="image_too_large")
                # Content encodings are refused rather than decoded under a cap: the accepted formats are compressed
                # already, so an honest server gains nothing from gzip/br, while decoding an untrusted coding chain
                # is where bombs live (httpx decodes `gzip, gzip` in one go: 252 B on the wire -> 52 MB in a single
                # read, before any cap could look). We ask for identity and read the raw bytes, so every byte the
                # cap counts is a byte that came over the wire (decoded/raw ratio 1, no decoder to get wrong).
                coding = response.headers.get("content-encoding", "")
                if any(c.strip().lower() not in ("", "identity") for c in coding.split(",")):
                    raise APIError(400, f"Image URL answered with Content-Encoding {coding[:64]!r}; images must be "
                                   "sent unencoded (Accept-Encoding: identity).", code="image_fetch_failed")
                body = bytearray()
                async for chunk in response.aiter_raw():
                    body += chunk
                    if len(body) > policy.max_bytes:
                        raise APIError(413, f"Image is larger than {policy.max_bytes} bytes.", code="image_too_large")
                return bytes(body)
            finally:
                await response.aclose()
    raise APIError(400, f"Image URL redirected more than {policy.max_redirects} times.", code="image_fetch_failed")


async def fetch_image(url: str, policy: ImagePolicy, resolver: Resolver = system_resolver) -> str:
    """Download ``url`` under ``policy`` and return it as a ``data:`` URL (raises :class:`APIError`)."""
    data = await fetch_bytes(url, policy, resolver)
    mime = _inspect(data, policy)
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


async def fetch_bytes(url: str, policy: ImagePolicy, resolver: Resolver = system_resolver) -> bytes:
    """Download ``url`` under ``policy`` (the image checks are the caller's)."""
    try:
        async with asyncio.timeout(policy.timeout_s):
            data = await _download(url, policy, resolver)
    except TimeoutError:
        raise APIError(400, f"Fetching the image took longer than {policy.timeout_s:g} s.",
                       code="image_fetch_failed") from None
    except httpx.HTTPError as exc:
        raise APIError(400, f"Could not fetch the image: {type(exc).__name__}.", code="image_fetch_failed") from None
    return data


async def inline_images(body: dict[str, Any], policy: ImagePolicy, resolver: Resolver, metrics: GatewayMetrics) -> None:
    """Check every ``data:`` image URL in a chat ``body`` and replace every http(s) one by a data URL fetched under
    ``policy`` (all fetches at once); errors name the part (``messages[i].content[j].image_url.url``)."""
    parts = [(part["image_url"], f"messages[{i}].content[{j}].image_url.url")
             for i, message in enumerate(body["messages"]) if isinstance(message.get("content"), list)
             for j, part in enumerate(message["content"]) if part.get("type") == "image_url"]
    if len(parts) > policy.max_images_per_request:  # before any image is looked at
        raise APIError(400, f"At most {policy.max_images_per_request} images per request.", param="messages",
                       code="too_many_images")
    jobs: list[tuple[dict[str, Any], str, str]] = []
    for holder, param in parts:
        url = holder["url"]
        if url[:5].lower() != "data:":
            jobs.append((holder, url, param))
            continue
        try:
            if len(url) > 256 * 1024:  # base64 decoding of a large image would stall the event loop
                await asyncio.to_thread(check_data_url, url, policy)
            else:
                check_data_url(url, policy)
        except APIError as exc:
            exc.param = param
            raise
    results = await asyncio.gather(*(fetch_image(url, policy, resolver) for _, url, _ in jobs), return_exceptions=True)
    for (holder, _url, param), result in zip(jobs, results):
        if isinstance(result, BaseException):
            metrics.image_fetches.labels("refused" if isinstance(result, APIError) else "error").inc()
            if isinstance(result, APIError):
                result.param = param
            raise result
        metrics.image_fetches.labels("ok").inc()
        holder["url"] = result
