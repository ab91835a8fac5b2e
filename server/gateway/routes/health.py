"""Probes and metrics: ``/health`` (alive), ``/ready`` (an engine, and an SDXL worker if configured, is up),
``/metrics`` (Prometheus). Public: orchestrators call them without keys.

``/ready`` reports the state the pools keep (startup probe, background health probes of up backends, re-probes of
down ones, mark-downs by failed requests: :mod:`server.gateway.backends`); it never probes, so calling it costs the
backends nothing and cannot mark them down. Backend addresses (``url``) are shown only to callers with a valid API
key when keys are configured (to everyone when none are); others get each backend's ``up`` and ``in_flight``."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.errors import APIError
from server.gateway import openapi
from server.gateway.protocol import Health, NotReady, Readiness
from server.gateway.state import Gateway, current

router = APIRouter()


@router.get("/health", summary="Liveness", responses=openapi.ok(Health, "Alive"))
async def health() -> JSONResponse:
    return JSONResponse({"status": "ok"})


def _authenticated(gateway: Gateway, request: Request) -> bool:
    """True without configured keys, or with a valid ``Authorization: Bearer`` key."""
    try:
        gateway.api_keys.check(request.headers.get("authorization"))
    except APIError:
        return False
    return True


@router.get("/ready", summary="Readiness (engines and workers)",
            responses={**openapi.ok(Readiness, "Ready"), 503: {"description": "Not ready", "model": NotReady}})
async def ready(request: Request, gateway: Annotated[Gateway, Depends(current)]) -> JSONResponse:
    pool = gateway.pool
    show_urls = _authenticated(gateway, request)
    engines: list[dict[str, Any]] = [
        {"url": e.url, "up": e.up, "in_flight": e.in_flight} if show_urls else {"up": e.up, "in_flight": e.in_flight}
        for e in pool.engines]
    store = gateway.files.store
    extra: dict[str, Any] = {"image_store": {"kind": store.kind, "shared": store.shared}}
    sdxl = gateway.sdxl
    if sdxl is not None:
        workers = sdxl.status()
        extra["workers"] = workers if show_urls else [{k: v for k, v in w.items() if k != "url"} for w in workers]
    if not pool.any_up or (sdxl is not None and not sdxl.any_up):
        what = "inference engine" if not pool.any_up else "SDXL worker"
        err = APIError(503, f"No {what} is reachable.", type_="server_error", code="not_ready",
                       headers={"retry-after": str(gateway.config.retry_after_s)})
        return JSONResponse({**err.body(), "engines": engines, **extra}, status_code=503, headers=err.headers)
    return JSONResponse({"status": "ready", "engines": engines, **extra})


@router.get("/metrics", summary="Prometheus metrics",
            responses=openapi.ok(None, "Metrics", {"text/plain": {"type": "string"}}))
async def metrics(gateway: Annotated[Gateway, Depends(current)]) -> Response:
    return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)
