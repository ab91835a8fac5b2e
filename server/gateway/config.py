"""Gateway settings (one frozen dataclass; ``mgm gateway`` fills it from flags and ``MGM_*`` variables)."""

from __future__ import annotations

from dataclasses import dataclass, field


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


@dataclass(frozen=True)
class GatewayConfig:
    engines: tuple[str, ...]  # base URLs of `mgm engine` servers, e.g. http://127.0.0.1:8001
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # empty = no auth; never logged
    #: Extra model id clients may use for the chat model (the engines' own id is always accepted).
    model_name: str | None = None
    #: SDXL worker URLs: only listed here so /v1/models shows the image model (the pool is not part of the gateway yet).
    sdxl_workers: tuple[str, ...] = ()
    image_model_name: str = "sdxl"
    images: ImagePolicy = ImagePolicy()
    max_body_bytes: int = 64 * 1024 * 1024  # request body cap (413 above)
    connect_timeout_s: float = 3.0
    request_timeout_s: float = 600.0
    probe_interval_s: float = 2.0  # how often a down engine is re-probed
    retry_after_s: int = 2  # hint sent with 503 when no engine is up

    def __post_init__(self) -> None:
        if not self.engines:
            raise ValueError("at least one engine URL is required")
        for url in self.engines:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"engine URL must start with http:// or https://, got {url!r}")
