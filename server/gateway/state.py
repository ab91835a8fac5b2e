"""Everything one gateway process holds, built once per app and reachable as ``app.state.gateway``: settings,
metrics, admission, keys and the image store from the start; HTTP clients, the engine and SDXL pools and the services
from :meth:`Gateway.start` on (the lifespan; clients need the running loop)."""

from __future__ import annotations

import logging

import httpx
from fastapi import Request

from server.gateway.admission import Admission
from server.gateway.auth import APIKeys
from server.gateway.chat import ChatService
from server.gateway.completions import CompletionsService
from server.gateway.config import GatewayConfig
from server.gateway.engine_pool import EnginePool
from server.gateway.image_fetch import Resolver, system_resolver
from server.gateway.image_generation import ImagesService
from server.gateway.image_store import ImageFiles
from server.gateway.metrics import GatewayMetrics
from server.gateway.models import ModelCatalog
from server.gateway.relay import ChatRelay
from server.gateway.responses import ResponsesService
from server.gateway.sdxl_pool import SDXLPool
from server.gateway.upstream import EngineClient
from server.store import open_store

logger = logging.getLogger("mgm.gateway")


class Gateway:
    pool: EnginePool
    sdxl: SDXLPool | None
    models: ModelCatalog
    chat: ChatService
    images: ImagesService
    responses: ResponsesService
    completions: CompletionsService

    def __init__(self, config: GatewayConfig, resolver: Resolver = system_resolver) -> None:
        self.config, self.resolver = config, resolver
        self.metrics = GatewayMetrics()
        self.api_keys = APIKeys(config.api_keys)
        self.files = ImageFiles(open_store(config.image_store, max_items=config.image_store_max_items,
                                           max_bytes=config.image_store_max_bytes,
                                           timeout_s=config.image_store_timeout_s),
                                config.image_store_ttl_s, config.retry_after_s)
        self.admission = Admission(config.chat_max_in_flight, config.chat_max_queue, config.chat_queue_timeout_s,
                                   config.retry_after_s, on_change=self._admission_changed)
        self.client: httpx.AsyncClient | None = None  # probes, SDXL workers
        self.engine_client: EngineClient | None = None  # chat requests (server.gateway.upstream)
        self.sdxl = None

    def _admission_changed(self, in_flight: int, waiting: int) -> None:
        self.metrics.chat_in_flight.set(in_flight)
        self.metrics.chat_queue_depth.set(waiting)

    async def start(self) -> None:
        cfg = self.config
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(cfg.request_timeout_s, connect=cfg.connect_timeout_s),
                                        trust_env=False,
                                        limits=httpx.Limits(max_connections=1024, max_keepalive_connections=128))
        self.engine_client = EngineClient(cfg.connect_timeout_s, cfg.request_timeout_s)
        self.pool = EnginePool(cfg.engines, self.client, self.metrics, probe_interval_s=cfg.probe_interval_s,
                               discover_interval_s=cfg.discover_interval_s, resolve=self.resolver,
                               health_interval_s=cfg.health_interval_s, error_threshold=cfg.engine_error_threshold,
                               cooldown_s=cfg.engine_cooldown_s, routing=cfg.routing,
                               routing_epsilon=cfg.routing_epsilon)
        await self.pool.probe_all()
        if cfg.sdxl_workers:
            self.sdxl = SDXLPool(cfg.sdxl_workers, self.client, self.metrics, max_in_flight=cfg.sdxl_max_in_flight,
                                 max_queue=cfg.sdxl_max_queue, probe_interval_s=cfg.probe_interval_s,
                                 retry_after_s=cfg.retry_after_s, job_timeout_s=cfg.sdxl_job_timeout_s,
                                 discover_interval_s=cfg.discover_interval_s, resolve=self.resolver,
                                 health_interval_s=cfg.health_interval_s)
            await self.sdxl.probe_all()
        relay = ChatRelay(cfg, self.pool, self.engine_client, self.metrics)
        self.models = ModelCatalog(cfg, self.pool)
        self.images = ImagesService(cfg, relay, self.pool, self.sdxl, self.files, self.metrics, self.resolver)
        self.chat = ChatService(cfg, relay, self.images, self.models, self.resolver, self.metrics)
        self.completions = CompletionsService(self.chat)
        self.responses = ResponsesService(self.chat, self.files.store, cfg.response_ttl_s, cfg.retry_after_s)
        logger.info("gateway started", extra={"fields": {
            "engines": ",".join(cfg.engines), "up": sum(e.up for e in self.pool.engines),
            "models": ",".join(self.pool.models()), "auth": bool(cfg.api_keys),
            "allow_loopback_images": cfg.images.allow_loopback, "image_store": self.files.store.kind}})

    async def stop(self) -> None:
        if hasattr(self, "pool"):
            await self.pool.close()
        if self.sdxl is not None:
            await self.sdxl.close()
        if self.client is not None:
            await self.client.aclose()
        if self.engine_client is not None:
            await self.engine_client.aclose()
        await self.files.close()


def current(request: Request) -> Gateway:
    """The app's :class:`Gateway`: the routes' dependency."""
    gateway: Gateway = request.app.state.gateway
    return gateway
