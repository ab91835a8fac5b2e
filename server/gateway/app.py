"""The gateway's FastAPI app: the wiring of state, middleware and routers (docs/architecture.md shows the request
path; docs/api.md is the API)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI

from server import errors
from server.gateway.config import GatewayConfig
from server.gateway.image_fetch import Resolver, system_resolver
from server.gateway.image_store import FILES_PATH
from server.gateway.middleware import (
    AdmissionMiddleware,
    BodyLimitMiddleware,
    ClientTimeoutMiddleware,
    MetricsMiddleware,
    RequestIdMiddleware,
)
from server.gateway.playground import create_router as playground_router
from server.gateway.routes import ROUTERS
from server.gateway.state import Gateway


def create_app(config: GatewayConfig, resolver: Resolver = system_resolver) -> FastAPI:
    gateway = Gateway(config, resolver)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    # strict_content_type=False: a body without a Content-Type is read as JSON, as OpenAI's API does.
    app = FastAPI(title="MGM gateway", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json", strict_content_type=False)
    app.state.gateway = gateway
    errors.install(app)
    for router in ROUTERS:
        app.include_router(router)
    app.include_router(playground_router())  # the static playground page at / (server.gateway.playground)

    # Middleware, innermost first (add_middleware wraps what is there): the body cap, admission, client timeouts
    # (which end whatever a stuck client holds, its admission slot included), then metrics around everything, so
    # refusals are counted too.
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes, max_json_items=config.max_json_items)
    app.add_middleware(AdmissionMiddleware, keys=gateway.api_keys, metrics=gateway.metrics,
                       guarded={path: gateway.admission for path in (
                           "/v1/chat/completions", "/v1/completions", "/v1/images/generations", "/v1/images/edits",
                           "/v1/responses")})
    app.add_middleware(ClientTimeoutMiddleware, metrics=gateway.metrics, read_timeout_s=config.client_read_timeout_s,
                       write_timeout_s=config.client_write_timeout_s, body_timeout_s=config.client_body_timeout_s)
    routes = frozenset(path for r in app.routes if "{" not in (path := getattr(r, "path", "")) and path
                       != app.openapi_url)
    app.add_middleware(MetricsMiddleware, metrics=gateway.metrics, routes=routes,
                       prefixes={FILES_PATH + "/": FILES_PATH})
    app.add_middleware(RequestIdMiddleware)  # outermost: every answer has its id, refusals included
    return app
