"""Prometheus metrics of the gateway (own registry, so several apps can live in one process, e.g. in tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mgm_gateway_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.latency = Histogram("mgm_gateway_request_latency_seconds", "Time to the last response byte", ["route"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("mgm_gateway_ttft_seconds", "Time to the first content token (streaming chat)",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("mgm_gateway_tokens", "Tokens reported by the engines", ["kind"], registry=r)
        self.in_flight = Gauge("mgm_gateway_in_flight_requests", "Requests being served", ["route"], registry=r)
        self.engine_up = Gauge("mgm_gateway_engine_up", "1 when the engine answers, else 0", ["engine"], registry=r)
        self.engine_in_flight = Gauge("mgm_gateway_engine_in_flight", "Requests in flight per engine", ["engine"],
                                      registry=r)
        self.engine_retries = Counter("mgm_gateway_engine_retries", "Requests retried on another engine",
                                      registry=r)
        self.engine_backoffs = Counter("mgm_gateway_engine_backoffs",
                                       "Engine cool-downs after repeated 5xx answers (skipped while others are up)",
                                       registry=r)
        self.routing = Counter("mgm_gateway_routing", "Engine choices: hit = the key's own engine, spill = the next "
                               "one on the ring (load bound), unkeyed = least loaded", ["engine", "outcome"],
                               registry=r)
        self.engine_crashes = Counter("mgm_gateway_engine_crashes",
                                      "Engine connections lost after a request was sent (the request may have "
                                      "crashed the engine)", registry=r)
        self.image_fetches = Counter("mgm_gateway_image_fetches", "Remote image fetches by outcome", ["outcome"],
                                     registry=r)
        self.sdxl_queue_depth = Gauge("mgm_gateway_sdxl_queue_depth", "Image jobs waiting in the gateway for a worker",
                                      registry=r)
        self.sdxl_in_flight = Gauge("mgm_gateway_sdxl_in_flight", "Image jobs sent to workers and not answered yet",
                                    registry=r)
        self.sdxl_latency = Histogram("mgm_gateway_sdxl_latency_seconds", "Worker round trip of one image job",
                                      buckets=_LATENCY_BUCKETS, registry=r)
        self.sdxl_worker_up = Gauge("mgm_gateway_sdxl_worker_up", "1 when the SDXL worker is ready, else 0", ["worker"],
                                    registry=r)
        self.sdxl_retries = Counter("mgm_gateway_sdxl_retries", "Image jobs moved to another worker", registry=r)
        self.chat_in_flight = Gauge("mgm_gateway_chat_in_flight", "Chat requests holding an admission slot",
                                    registry=r)
        self.chat_queue_depth = Gauge("mgm_gateway_chat_queue_depth", "Chat requests waiting for an admission slot",
                                      registry=r)
        self.rejected = Counter("mgm_gateway_rejected", "Requests refused for capacity (429/503) by route and reason",
                                ["route", "reason"], registry=r)
        self.client_disconnects = Counter("mgm_gateway_client_disconnects",
                                          "Requests whose client left before the answer was complete", ["route"],
                                          registry=r)
        self.client_timeouts = Counter("mgm_gateway_client_timeouts",
                                       "Requests cut because the client paused too long (read: its body, write: "
                                       "reading the response)", ["direction"], registry=r)
        self.images_generated = Counter("mgm_gateway_images_generated", "Images returned by route", ["route"],
                                        registry=r)
