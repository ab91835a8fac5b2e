"""The playground: one static page at ``/`` (HTML + CSS + vanilla JS from ``static/``, no build step, no CDN) that
talks to this gateway's own API from the browser.

The page is public even when API keys are on (it is static; the key typed into it goes into the ``Authorization``
header of its API calls). Caching: the HTML is ``no-cache`` with an ETag (revalidated every load, 304 when
unchanged), and references its CSS and JS with a content hash (``playground.js?v=…``), which are then served
``immutable`` for a year; a request with any other ``v`` is ``no-cache`` so an old page never pins a new file.
Every file is gzipped once at import and sent compressed to clients that accept it. A strict Content-Security-Policy
(same origin only; ``data:``/``blob:`` images for uploads and generated images) keeps the page offline by design.
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import Response

STATIC = Path(__file__).with_name("static")

_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_SECURITY = {"x-content-type-options": "nosniff", "referrer-policy": "no-referrer"}


@dataclass(frozen=True)
class Asset:
    body: bytes
    gzipped: bytes
    media_type: str
    version: str  # short content hash: the ETag and the ``v`` query of the CSS/JS

    @classmethod
    def of(cls, body: bytes, media_type: str) -> Asset:
        return cls(body, gzip.compress(body, 9, mtime=0), media_type, hashlib.sha256(body).hexdigest()[:16])

    def response(self, request: Request, cache_control: str, extra: dict[str, str] | None = None) -> Response:
        gz = "gzip" in request.headers.get("accept-encoding", "").lower()
        etag = f'"{self.version}{"-gz" if gz else ""}"'
        headers = {"etag": etag, "cache-control": cache_control, "vary": "Accept-Encoding", **_SECURITY,
                   **(extra or {})}
        if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
            return Response(status_code=304, headers=headers)
        if gz:
            headers["content-encoding"] = "gzip"
        return Response(self.gzipped if gz else self.body, media_type=self.media_type, headers=headers)


def load_assets(static: Path = STATIC) -> dict[str, Asset]:
    """The page's files by route; the HTML gets the CSS and JS content hashes substituted in."""
    css = Asset.of((static / "playground.css").read_bytes(), "text/css; charset=utf-8")
    js = Asset.of((static / "playground.js").read_bytes(), "text/javascript; charset=utf-8")
    html = (static / "playground.html").read_text(encoding="utf-8")
    html = html.replace("{{css_version}}", css.version).replace("{{js_version}}", js.version)
    page = Asset.of(html.encode(), "text/html; charset=utf-8")
    return {"/": page, "/playground.css": css, "/playground.js": js}


def create_router(static: Path = STATIC) -> APIRouter:
    assets = load_assets(static)
    router = APIRouter()

    @router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page(request: Request) -> Response:
        return assets["/"].response(request, "no-cache", {"content-security-policy": _CSP})

    def static_route(path: str) -> None:
        asset = assets[path]

        async def serve(request: Request) -> Response:
            pinned = request.query_params.get("v") == asset.version
            return asset.response(request, "public, max-age=31536000, immutable" if pinned else "no-cache")

        router.add_api_route(path, serve, methods=["GET", "HEAD"], include_in_schema=False)

    for path in ("/playground.css", "/playground.js"):
        static_route(path)
    return router
