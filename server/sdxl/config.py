"""SDXL worker settings (one frozen dataclass, standard library only): ``mgm sdxl-worker`` takes its flag defaults
from it without importing the worker's web stack, and :mod:`server.sdxl.worker` runs with it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from server.sdxl.pipeline import PipelineOptions


@dataclass(frozen=True)
class WorkerConfig:
    model: Path
    model_name: str | None = None  # reported in responses; default: the model directory's name
    device: str = "auto"
    dtype: str = "auto"
    attention: str = "auto"
    variant: str | None = "auto"
    vae_slicing: bool = True
    threads: int | None = None
    max_batch: int = 4  # images per pipeline call; also the largest n one request may ask for
    max_queue: int = 64  # waiting jobs; beyond that → 429
    batch_wait_s: float = 0.02  # how long a free worker waits for companions of a lone job
    job_timeout_s: float = 600.0
    warmup_steps: int = 2  # 0 disables the warm-up generation
    min_side: int = 64
    max_side: int = 2048
    max_steps: int = 200
    #: After an out-of-memory batch: seconds the worker stays not-ready once memory is freed (the gateway's
    #: probe sees it and sends jobs elsewhere; other processes on the GPU settle).
    oom_cooldown_s: float = 2.0

    def pipeline_options(self) -> PipelineOptions:
        return PipelineOptions(model=self.model, device=self.device, dtype=self.dtype, attention=self.attention,
                               variant=self.variant, vae_slicing=self.vae_slicing, threads=self.threads)

    def validate(self) -> None:
        for name in ("max_batch", "max_queue", "min_side", "max_side", "max_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.min_side % 8 or self.max_side % 8 or self.min_side > self.max_side:
            raise ValueError("min_side/max_side must be multiples of 8 with min_side <= max_side")
        if self.batch_wait_s < 0 or self.job_timeout_s <= 0 or self.warmup_steps < 0 or self.oom_cooldown_s < 0:
            raise ValueError("batch_wait_s, warmup_steps and oom_cooldown_s must be >= 0, job_timeout_s > 0")
