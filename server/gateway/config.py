"""Gateway settings (one frozen dataclass; ``mgm gateway`` fills it from flags and ``MGM_*`` variables)."""

from __future__ import annotations

from dataclasses import dataclass, field

from server.store import check_store_url
from server.gateway.routing import ROUTING_POLICIES


@dataclass(frozen=True)
class ImagePolicy:
    """How the gateway fetches ``http(s)`` image URLs on behalf of clients (engines never reach out)."""

    timeout_s: float = 10.0  # whole fetch, all redirect hops included
    connect_timeout_s: float = 3.0
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_redirects: int = 3
    max_images_per_request: int = 8
    #: Host names (and their subdomains) that may be fetched; empty = any public host.
    allowed_domains: tuple[str, ...] = ()
    #: TEST ONLY: also allow loopback targets (127.0.0.0/8, ::1) so tests can serve images locally.
    allow_loopback: bool = False
    content_types: tuple[str, ...] = ("image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp")
    #: Ports image URLs (and every redirect hop) may use; with ``allow_loopback`` any port is allowed for targets
    #: that resolve to loopback only (tests serve images on random ports).
    allowed_ports: tuple[int, ...] = (80, 443)
    #: Name resolution for image hosts (its own small thread pool): longer than this → 400 image_fetch_failed.
    dns_timeout_s: float = 2.0


@dataclass(frozen=True)
class GatewayConfig:
    engines: tuple[str, ...]  # base URLs of `mgm engine` servers, e.g. http://127.0.0.1:8001
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # empty = no auth; never logged
    #: Extra model id clients may use for the chat model (the engines' own id is always accepted).
    model_name: str | None = None
    #: SDXL worker URLs (``mgm sdxl-worker``); empty = no image generation (the image routes answer 400).
    sdxl_workers: tuple[str, ...] = ()
    image_model_name: str = "sdxl"
    sdxl_max_in_flight: int = 2  # jobs one worker gets from the gateway at a time
    sdxl_max_queue: int = 32  # jobs waiting in the gateway for a worker; beyond that → 429
    sdxl_job_timeout_s: float = 600.0
    #: Image sizes: any "WxH" with both sides multiples of 8 in [min, max] (the worker's own limits by default).
    image_min_side: int = 64
    image_max_side: int = 2048
    image_default_size: str = "1024x1024"
    #: Generated images kept for ``response_format=url`` (served at /v1/files/images/{id}): the blob store's URL
    #: (server.store: memory://, file:///path, redis://host:port/db; it may hold a password, so it is never shown),
    #: how long an image stays, and the timeout of each store call. The limits bound the memory store.
    image_store: str = field(default="memory://", repr=False)
    image_store_ttl_s: float = 3600.0
    image_store_timeout_s: float = 2.0
    #: Stored responses (the Responses API's store=true) live in the same store for this long.
    response_ttl_s: float = 24 * 3600.0
    image_store_max_items: int = 512
    image_store_max_bytes: int = 512 * 1024 * 1024
    #: Prompt enhancement (images API): max new tokens and temperature of the MGM re-caption call.
    enhance_max_tokens: int = 512  # the official CLI's cap: a caption at the end of a long answer is not cut off
    enhance_temperature: float = 0.2
    images: ImagePolicy = ImagePolicy()
    max_edit_images: int = 4  # input images one /v1/images/edits request may carry (the first is drawn from)
    max_body_bytes: int = 64 * 1024 * 1024  # request body cap (413 above)
    #: Prompt pre-check (server.gateway.chat): text longer than the engines' context × this many characters is a
    #: 400 before the engine tokenises it (no real tokenizer averages more than ~5 characters per token; the engine
    #: still enforces the exact limit).
    max_prompt_chars_per_token: int = 16
    #: JSON values one body may hold (counted as commas while it arrives): bounds what parsing it costs (413 above).
    max_json_items: int = 200_000
    #: Chat admission (server.gateway.admission): requests served at once, requests waiting for a slot (429 beyond),
    #: and how long one may wait (503 after that).
    chat_max_in_flight: int = 256
    chat_max_queue: int = 512
    chat_queue_timeout_s: float = 60.0
    #: `mgm gateway` on SIGTERM: stop accepting, give in-flight requests this long to finish, then cut them.
    drain_timeout_s: float = 25.0
    #: Slow clients (server.gateway.middleware.ClientTimeoutMiddleware): the longest pause allowed while a request
    #: body arrives (408 after it) and while a response waits for the client to read (the connection is cut), and
    #: the longest a whole body may take from its first read (408: a body trickling in under the pause limit).
    client_read_timeout_s: float = 30.0
    client_write_timeout_s: float = 60.0
    client_body_timeout_s: float = 120.0
    connect_timeout_s: float = 3.0
    request_timeout_s: float = 600.0
    probe_interval_s: float = 2.0  # how often a down engine is re-probed
    health_interval_s: float = 5.0  # how often up engines and workers are health-probed in the background
    #: Error back-off (server.gateway.engine_pool): consecutive 5xx answers after which an engine cools down, and
    #: for how long.
    engine_error_threshold: int = 3
    engine_cooldown_s: float = 5.0
    routing: str = "affinity"  # server.gateway.routing.ROUTING_POLICIES
    # an engine takes a keyed request while in flight ≤ ceil((1+ε) × the mean). 0.5, not the literature's 0.25: a cold
    # image costs MGM's towers seconds, a warm one a few ms, so waiting behind one more request beats a spill (0.25
    # sent 32 of 48 requests past their engine in BENCHMARKS.md, "Cache-aware routing"); not 1 either, which on two
    # engines never refuses (ceil(2 × (m+1)/2) = m+1): a hot conversation could take one engine whole
    routing_epsilon: float = 0.5
    #: Any-to-any streams: an SSE comment this often while SDXL draws, so idle-timeout proxies keep the stream.
    stream_keepalive_s: float = 5.0
    #: > 0: engine/worker URLs with a DNS host stand for every address it resolves to (a headless Service),
    #: re-resolved this often (server.gateway.discovery); 0: URLs are used as given.
    discover_interval_s: float = 0.0
    retry_after_s: int = 2  # hint sent with 503 when no engine is up

    def __post_init__(self) -> None:
        if self.chat_max_in_flight < 1 or self.chat_max_queue < 0 or self.chat_queue_timeout_s <= 0:
            raise ValueError("chat_max_in_flight must be >= 1, chat_max_queue >= 0, chat_queue_timeout_s > 0")
        if self.client_read_timeout_s <= 0 or self.client_write_timeout_s <= 0 or self.client_body_timeout_s <= 0:
            raise ValueError("client_read_timeout_s, client_write_timeout_s and client_body_timeout_s must be > 0")
        if self.max_edit_images < 1:
            raise ValueError("max_edit_images must be >= 1")
        if self.max_prompt_chars_per_token < 1:
            raise ValueError("max_prompt_chars_per_token must be >= 1")
        if self.drain_timeout_s < 0 or self.max_body_bytes < 1 or self.max_json_items < 1:
            raise ValueError("drain_timeout_s must be >= 0, max_body_bytes and max_json_items >= 1")
        if self.sdxl_max_in_flight < 1 or self.sdxl_max_queue < 0 or self.image_store_ttl_s <= 0:
            raise ValueError("sdxl_max_in_flight must be >= 1, sdxl_max_queue >= 0, image_store_ttl_s > 0")
        check_store_url(self.image_store)
        if self.image_store_timeout_s <= 0 or self.response_ttl_s <= 0:
            raise ValueError("image_store_timeout_s and response_ttl_s must be > 0")
        for url in self.sdxl_workers:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"SDXL worker URL must start with http:// or https://, got {url!r}")
        if self.health_interval_s <= 0 or self.engine_cooldown_s < 0 or self.stream_keepalive_s <= 0:
            raise ValueError("health_interval_s and stream_keepalive_s must be > 0, engine_cooldown_s >= 0")
        if self.engine_error_threshold < 1:
            raise ValueError("engine_error_threshold must be >= 1")
        if self.routing not in ROUTING_POLICIES:
            raise ValueError(f"routing must be one of {', '.join(ROUTING_POLICIES)}, got {self.routing!r}")
        if not 0 <= self.routing_epsilon <= 10:
            raise ValueError("routing_epsilon must be within [0, 10]")
        if self.discover_interval_s < 0:
            raise ValueError("discover_interval_s must be >= 0")
        if not self.engines:
            raise ValueError("at least one engine URL is required")
        for url in self.engines:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"engine URL must start with http:// or https://, got {url!r}")
