"""``mgm gateway`` options and handler (registered by :mod:`server.cli`).

Flag defaults come from :class:`~server.gateway.config.GatewayConfig` and :class:`~server.gateway.config.ImagePolicy`;
the handler builds that config and runs :func:`server.gateway.app.create_app` under uvicorn.
"""

from __future__ import annotations

import argparse
import logging
import signal

from server.flags import SubParsers, add_flag, csv_list, defaults
from server.gateway.config import GatewayConfig, ImagePolicy
from server.gateway.routing import ROUTING_POLICIES

logger = logging.getLogger("mgm.gateway")

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000


def register(sub: SubParsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "gateway", parents=[common],
        help="OpenAI-compatible gateway in front of one or more `mgm engine` servers",
        description="OpenAI-compatible HTTP gateway: validates chat requests, fetches remote images itself (SSRF "
        "policy), routes to the least loaded engine, streams SSE, exposes /health, /ready, /metrics.")
    gw, img = defaults(GatewayConfig), defaults(ImagePolicy)
    add_flag(p, "--engine", env="MGM_ENGINES", action="append", default=(), metavar="URL",
             help="engine base URL, repeatable")
    add_flag(p, "--host", env="MGM_GATEWAY_HOST", default=DEFAULT_HOST)
    add_flag(p, "--port", env="MGM_GATEWAY_PORT", type=int, default=DEFAULT_PORT)
    add_flag(p, "--api-key", env="MGM_API_KEYS", action="append", default=gw.api_keys, metavar="KEY",
             shown_default="none = no auth", help="accepted Bearer key, repeatable")
    add_flag(p, "--model-name", env="MGM_MODEL_NAME", default=gw.model_name,
             help="extra id clients may use for the chat model")
    add_flag(p, "--sdxl-worker", env="MGM_SDXL_WORKERS", action="append", default=gw.sdxl_workers, metavar="URL",
             help="SDXL worker URL, repeatable; lists the image model")
    add_flag(p, "--image-model-name", env="MGM_IMAGE_MODEL_NAME", default=gw.image_model_name,
             help="model id of image generation")
    add_flag(p, "--sdxl-max-in-flight", env="MGM_SDXL_MAX_IN_FLIGHT", type=int, default=gw.sdxl_max_in_flight,
             help="image jobs one worker gets from the gateway at a time")
    add_flag(p, "--sdxl-max-queue", env="MGM_SDXL_GATEWAY_QUEUE", type=int, default=gw.sdxl_max_queue,
             help="image jobs waiting in the gateway for a worker; beyond that 429")
    add_flag(p, "--max-edit-images", env="MGM_MAX_EDIT_IMAGES", type=int, default=gw.max_edit_images,
             help="input images one /v1/images/edits request may carry (MGM sees them all when it re-captions: keep "
             "it within the engines' --limit-mm-per-prompt)")
    add_flag(p, "--image-url-ttl", env="MGM_IMAGE_URL_TTL", type=float, default=gw.image_store_ttl_s,
             help="seconds a response_format=url image stays downloadable")
    add_flag(p, "--image-store", env="MGM_IMAGE_STORE", default=gw.image_store,
             help="where response_format=url images live: memory:// (this process), file:///path (a shared volume) or "
             "redis://[:password@]host:port/db (shared; prefer the variable for a password)")
    add_flag(p, "--image-store-timeout", env="MGM_IMAGE_STORE_TIMEOUT", type=float, default=gw.image_store_timeout_s,
             metavar="SECONDS", help="longest wait for one image store call before 503")
    add_flag(p, "--response-ttl", env="MGM_RESPONSE_TTL", type=float, default=gw.response_ttl_s, metavar="SECONDS",
             help="how long a stored response (Responses API, store=true) can be retrieved or continued")
    add_flag(p, "--allowed-image-domains", env="MGM_ALLOWED_IMAGE_DOMAINS", type=csv_list,
             default=img.allowed_domains, shown_default="any public host",
             help="comma-separated host names (and subdomains) image URLs may point to")
    add_flag(p, "--max-image-bytes", env="MGM_MAX_IMAGE_BYTES", type=int, default=img.max_bytes)
    add_flag(p, "--max-image-pixels", env="MGM_MAX_IMAGE_PIXELS", type=int, default=img.max_pixels)
    add_flag(p, "--image-fetch-timeout", env="MGM_IMAGE_FETCH_TIMEOUT", type=float, default=img.timeout_s)
    add_flag(p, "--image-dns-timeout", env="MGM_IMAGE_DNS_TIMEOUT", type=float, default=img.dns_timeout_s,
             help="seconds resolving an image URL's host may take before 400")
    add_flag(p, "--allowed-image-port", env="MGM_ALLOWED_IMAGE_PORTS", action="append", type=int,
             default=img.allowed_ports, metavar="PORT", help="port image URLs may use, repeatable")
    add_flag(p, "--max-body-bytes", env="MGM_MAX_BODY_BYTES", type=int, default=gw.max_body_bytes,
             help="request body cap; larger bodies get 413 before they are read")
    add_flag(p, "--max-json-items", env="MGM_MAX_JSON_ITEMS", type=int, default=gw.max_json_items,
             help="JSON values one request body may hold; beyond that 413 before it is parsed")
    add_flag(p, "--max-prompt-chars-per-token", env="MGM_MAX_PROMPT_CHARS_PER_TOKEN", type=int,
             default=gw.max_prompt_chars_per_token,
             help="text longer than the engines' context × this many characters is a 400 before the engine sees it")
    add_flag(p, "--health-interval", env="MGM_HEALTH_INTERVAL", type=float, default=gw.health_interval_s,
             metavar="SECONDS", help="how often up engines and SDXL workers are health-probed in the background")
    add_flag(p, "--engine-error-threshold", env="MGM_ENGINE_ERROR_THRESHOLD", type=int,
             default=gw.engine_error_threshold, help="consecutive 5xx answers after which an engine cools down")
    add_flag(p, "--engine-cooldown", env="MGM_ENGINE_COOLDOWN", type=float, default=gw.engine_cooldown_s,
             metavar="SECONDS", help="how long a cooling-down engine gets no traffic while another is up")
    add_flag(p, "--routing", env="MGM_ROUTING", choices=ROUTING_POLICIES, default=gw.routing,
             help="affinity: a conversation's requests go to the engine that holds its image (its prefix cache), "
             "within a load bound; least-loaded: the engine with the fewest requests in flight")
    add_flag(p, "--routing-epsilon", env="MGM_ROUTING_EPSILON", type=float, default=gw.routing_epsilon,
             help="affinity: an engine takes a keyed request while its in-flight count stays within (1+ε) × the mean")
    add_flag(p, "--stream-keepalive", env="MGM_STREAM_KEEPALIVE", type=float, default=gw.stream_keepalive_s,
             metavar="SECONDS", help="SSE keep-alive comment interval while an any-to-any stream waits for SDXL")
    add_flag(p, "--chat-max-in-flight", env="MGM_CHAT_MAX_IN_FLIGHT", type=int, default=gw.chat_max_in_flight,
             help="chat requests served at once")
    add_flag(p, "--chat-max-queue", env="MGM_CHAT_MAX_QUEUE", type=int, default=gw.chat_max_queue,
             help="chat requests waiting for a slot; beyond that 429 + retry-after")
    add_flag(p, "--chat-queue-timeout", env="MGM_CHAT_QUEUE_TIMEOUT", type=float, default=gw.chat_queue_timeout_s,
             help="seconds a chat request may wait for a slot before 503")
    add_flag(p, "--drain-timeout", env="MGM_DRAIN_TIMEOUT", type=float, default=gw.drain_timeout_s,
             help="on SIGTERM: stop accepting and give in-flight requests this many seconds to finish, then exit 0")
    add_flag(p, "--client-read-timeout", env="MGM_CLIENT_READ_TIMEOUT", type=float, default=gw.client_read_timeout_s,
             help="longest pause while a request body arrives; then 408")
    add_flag(p, "--client-body-timeout", env="MGM_CLIENT_BODY_TIMEOUT", type=float, default=gw.client_body_timeout_s,
             help="longest a whole request body may take to arrive, however steadily it trickles; then 408")
    add_flag(p, "--client-write-timeout", env="MGM_CLIENT_WRITE_TIMEOUT", type=float,
             default=gw.client_write_timeout_s, help="longest wait for a client to read its response; then it is cut")
    add_flag(p, "--discover-interval", env="MGM_DISCOVER_INTERVAL", type=float, default=gw.discover_interval_s,
             metavar="SECONDS", help="> 0: an engine/worker URL whose host is a DNS name (e.g. a Kubernetes headless "
             "Service) stands for every address it resolves to, re-resolved this often; 0: URLs used as given")
    p.add_argument("--unsafe-allow-loopback-images", action="store_true",
                   help="TESTS ONLY: let image URLs point to 127.0.0.0/8 and ::1")
    p.set_defaults(handler=run_gateway)


def run_gateway(args: argparse.Namespace) -> int:
    try:
        config = GatewayConfig(
            engines=tuple(args.engine), api_keys=tuple(args.api_key), model_name=args.model_name,
            sdxl_workers=tuple(args.sdxl_worker), image_model_name=args.image_model_name,
            sdxl_max_in_flight=args.sdxl_max_in_flight, sdxl_max_queue=args.sdxl_max_queue,
            max_edit_images=args.max_edit_images,
            image_store=args.image_store, image_store_timeout_s=args.image_store_timeout,
            response_ttl_s=args.response_ttl,
            image_store_ttl_s=args.image_url_ttl, max_body_bytes=args.max_body_bytes, max_json_items=args.max_json_items,
            chat_max_in_flight=args.chat_max_in_flight, chat_max_queue=args.chat_max_queue,
            chat_queue_timeout_s=args.chat_queue_timeout, drain_timeout_s=args.drain_timeout,
            client_read_timeout_s=args.client_read_timeout, client_write_timeout_s=args.client_write_timeout,
            client_body_timeout_s=args.client_body_timeout,
            discover_interval_s=args.discover_interval, max_prompt_chars_per_token=args.max_prompt_chars_per_token,
            health_interval_s=args.health_interval, engine_error_threshold=args.engine_error_threshold,
            engine_cooldown_s=args.engine_cooldown, stream_keepalive_s=args.stream_keepalive,
            routing=args.routing, routing_epsilon=args.routing_epsilon,
            images=ImagePolicy(timeout_s=args.image_fetch_timeout, max_bytes=args.max_image_bytes,
                               max_pixels=args.max_image_pixels, dns_timeout_s=args.image_dns_timeout,
                               allowed_ports=tuple(args.allowed_image_port),
                               allowed_domains=tuple(d.lower() for d in args.allowed_image_domains),
                               allow_loopback=args.unsafe_allow_loopback_images))
    except ValueError as exc:
        logger.error(str(exc))
        return 2
    import uvicorn  # after the config checks: a bad setting is reported without loading the web stack

    from server.gateway.app import create_app

    if config.images.allow_loopback:
        logger.warning("image URLs may point to loopback addresses (--unsafe-allow-loopback-images): tests only")
    # uvicorn handles SIGTERM itself (stop accepting, wait for in-flight requests up to the drain timeout, cancel the
    # rest) and then re-raises it to the handler that was installed before: this one, so the exit status is 0.
    signal.signal(signal.SIGTERM, lambda _sig, _frame: logger.info("gateway stopped after SIGTERM"))
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_config=None, access_log=False,
                timeout_graceful_shutdown=config.drain_timeout_s)
    return 0
