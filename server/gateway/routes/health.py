"""Probes and metrics: ``/health`` (alive), ``/ready`` (an engine, and an SDXL worker if configured, answer),
``/metrics`` (Prometheus). Public: orchestrators call them without keys."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends
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


@router.get("/ready", summary="Readiness (engines and workers)",
            responses={**openapi.ok(Readiness, "Ready"), 503: {"description": "Not ready", "model": NotReady}})
async def ready(gateway: Annotated[Gateway, Depends(current)]) -> JSONResponse:
    pool = gateway.pool
    await asyncio.gather(*(pool.probe(e) for e in pool.engines))
    engines = [{"url": e.url, "up": e.up, "in_flight": e.in_flight} for e in pool.engines]
    for engine in pool.engines:
        if not engine.up:
            pool.mark_down(engine, "probe failed")
    extra: dict[str, Any] = {}
    sdxl = gateway.sdxl
    if sdxl is not None:
        await asyncio.gather(*(sdxl.probe(w) for w in sdxl.workers))
        for worker in sdxl.workers:
            if not worker.up:
                await sdxl.mark_down(worker, "probe failed")
        extra["workers"] = sdxl.status()
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
