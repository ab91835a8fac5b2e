"""``mgm gateway`` options and handler (registered by ``server.cli._add_gateway``)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
from collections.abc import Callable

logger = logging.getLogger("mgm.gateway")


def csv_list(value: str) -> list[str]:
    """"a, b,,c" → ["a", "b", "c"] (list flags' environment variables)."""
    return [v.strip() for v in value.split(",") if v.strip()]


def add_gateway(sub: argparse._SubParsersAction, common: argparse.ArgumentParser,
                env: Callable[[str, str], str]) -> None:
    p = sub.add_parser(
        "gateway", parents=[common],
        help="OpenAI-compatible gateway in front of one or more `mgm engine` servers",
        description="OpenAI-compatible HTTP gateway: validates chat requests, fetches remote images itself (SSRF "
        "policy), routes to the least loaded engine, streams SSE, exposes /health, /ready, /metrics.")
    p.add_argument("--engine", action="append", default=None, metavar="URL",
                   help="engine base URL, repeatable (default: $MGM_ENGINES, comma-separated)")
    p.add_argument("--host", default=env("MGM_GATEWAY_HOST", "127.0.0.1"), help="default: $MGM_GATEWAY_HOST or 127.0.0.1")
    p.add_argument("--port", type=int, default=env("MGM_GATEWAY_PORT", "8000"), help="default: $MGM_GATEWAY_PORT or 8000")
    p.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help="accepted Bearer key, repeatable (default: $MGM_API_KEYS, comma-separated; none = no auth)")
    p.add_argument("--model-name", default=os.environ.get("MGM_MODEL_NAME") or None,
                   help="extra id clients may use for the chat model (default: $MGM_MODEL_NAME)")
    p.add_argument("--sdxl-worker", action="append", default=None, metavar="URL",
                   help="SDXL worker URL, repeatable (default: $MGM_SDXL_WORKERS); lists the image model")
    p.add_argument("--image-model-name", default=env("MGM_IMAGE_MODEL_NAME", "sdxl"))
    p.add_argument("--sdxl-max-in-flight", type=int, default=env("MGM_SDXL_MAX_IN_FLIGHT", "2"),
                   help="image jobs one worker gets from the gateway at a time")
    p.add_argument("--sdxl-max-queue", type=int, default=env("MGM_SDXL_GATEWAY_QUEUE", "32"),
                   help="image jobs waiting in the gateway for a worker; beyond that 429")
    p.add_argument("--image-url-ttl", type=float, default=env("MGM_IMAGE_URL_TTL", "3600"),
                   help="seconds a response_format=url image stays downloadable")
    p.add_argument("--allowed-image-domains", type=csv_list, default=env("MGM_ALLOWED_IMAGE_DOMAINS", ""),
                   help="comma-separated host names (and subdomains) image URLs may point to; empty = any public host")
    p.add_argument("--max-image-bytes", type=int, default=env("MGM_MAX_IMAGE_BYTES", str(20 * 1024 * 1024)))
    p.add_argument("--max-image-pixels", type=int, default=env("MGM_MAX_IMAGE_PIXELS", "40000000"))
    p.add_argument("--image-fetch-timeout", type=float, default=env("MGM_IMAGE_FETCH_TIMEOUT", "10"))
    p.add_argument("--max-body-bytes", type=int, default=env("MGM_MAX_BODY_BYTES", str(64 * 1024 * 1024)),
                   help="request body cap; larger bodies get 413 before they are read")
    p.add_argument("--chat-max-in-flight", type=int, default=env("MGM_CHAT_MAX_IN_FLIGHT", "256"),
                   help="chat requests served at once (default: $MGM_CHAT_MAX_IN_FLIGHT or 256)")
    p.add_argument("--chat-max-queue", type=int, default=env("MGM_CHAT_MAX_QUEUE", "512"),
                   help="chat requests waiting for a slot; beyond that 429 + retry-after (default: $MGM_CHAT_MAX_QUEUE "
                   "or 512)")
    p.add_argument("--chat-queue-timeout", type=float, default=env("MGM_CHAT_QUEUE_TIMEOUT", "60"),
                   help="seconds a chat request may wait for a slot before 503 (default: $MGM_CHAT_QUEUE_TIMEOUT or 60)")
    p.add_argument("--drain-timeout", type=float, default=env("MGM_DRAIN_TIMEOUT", "25"),
                   help="on SIGTERM: stop accepting and give in-flight requests this many seconds to finish, then "
                   "exit 0 (default: $MGM_DRAIN_TIMEOUT or 25)")
    p.add_argument("--discover-interval", type=float, default=env("MGM_DISCOVER_INTERVAL", "0"), metavar="SECONDS",
                   help="> 0: an engine/worker URL whose host is a DNS name (e.g. a Kubernetes headless Service) stands "
                   "for every address it resolves to, re-resolved this often; 0: URLs used as given "
                   "(default: $MGM_DISCOVER_INTERVAL or 0)")
    p.add_argument("--unsafe-allow-loopback-images", action="store_true",
                   help="TESTS ONLY: let image URLs point to 127.0.0.0/8 and ::1")
    p.set_defaults(handler=run_gateway)


def run_gateway(args: argparse.Namespace) -> int:
    import uvicorn

    from server.gateway.app import create_app
    from server.gateway.config import GatewayConfig, ImagePolicy

    engines = args.engine or csv_list(os.environ.get("MGM_ENGINES", ""))
    keys = args.api_key or csv_list(os.environ.get("MGM_API_KEYS", ""))
    workers = args.sdxl_worker or csv_list(os.environ.get("MGM_SDXL_WORKERS", ""))
    domains = args.allowed_image_domains if isinstance(args.allowed_image_domains, list) else csv_list(
        args.allowed_image_domains)
    try:
        config = GatewayConfig(
            engines=tuple(engines), api_keys=tuple(keys), model_name=args.model_name, sdxl_workers=tuple(workers),
            image_model_name=args.image_model_name, sdxl_max_in_flight=args.sdxl_max_in_flight,
            sdxl_max_queue=args.sdxl_max_queue, image_store_ttl_s=args.image_url_ttl,
            max_body_bytes=args.max_body_bytes, chat_max_in_flight=args.chat_max_in_flight,
            chat_max_queue=args.chat_max_queue, chat_queue_timeout_s=args.chat_queue_timeout,
            drain_timeout_s=args.drain_timeout, discover_interval_s=args.discover_interval,
            images=ImagePolicy(timeout_s=args.image_fetch_timeout, max_bytes=args.max_image_bytes,
                               max_pixels=args.max_image_pixels, allowed_domains=tuple(d.lower() for d in domains),
                               allow_loopback=args.unsafe_allow_loopback_images))
    except ValueError as exc:
        logger.error(str(exc))
        return 2
    if config.images.allow_loopback:
        logger.warning("image URLs may point to loopback addresses (--unsafe-allow-loopback-images): tests only")
    # uvicorn handles SIGTERM itself (stop accepting, wait for in-flight requests up to the drain timeout, cancel the
    # rest) and then re-raises it to the handler that was installed before: this one, so the exit status is 0.
    signal.signal(signal.SIGTERM, lambda _sig, _frame: logger.info("gateway stopped after SIGTERM"))
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_config=None, access_log=False,
                timeout_graceful_shutdown=config.drain_timeout_s)
    return 0
