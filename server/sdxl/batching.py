"""Queue and batch selection for the SDXL worker (pure Python: no torch, no clock in the core logic).

Policy — one pipeline call runs one *batch*, i.e. jobs that share a :class:`BatchKey` (size, steps, guidance: the
things a single ``StableDiffusionXLPipeline`` call cannot vary per row):

* the **oldest** waiting job always starts the next batch (strict FIFO between groups), so a job waits at most for
  the batches of the jobs that were queued before it — no group can starve another;
* later jobs with the same key *ride along* in FIFO order while the batch has room (``max_batch`` images); they
  only ever fill free rows of a batch that would run anyway, so they never delay an older job;
* the queue is bounded (``max_queue`` jobs): :class:`QueueFull` lets the HTTP layer answer 429 at once instead of
  letting latency grow without limit.

:class:`FairBatcher` is that policy as a plain data structure (unit-tested with fake jobs); :class:`JobQueue` adds
the thread-safety and blocking waits the worker thread needs.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar


@dataclass(frozen=True)
class BatchKey:
    """What must be equal for jobs to share one pipeline call."""

    width: int
    height: int
    steps: int
    guidance_scale: float
    mode: str = "text2img"  # text2img | img2img | inpaint: one pipeline per call
    strength: float = 1.0  # img2img/inpaint: how far from the input image (it sets the steps actually run)


class Batchable(Protocol):
    @property
    def key(self) -> BatchKey: ...

    @property
    def n(self) -> int: ...  # images this job asks for (rows in the batch)


J = TypeVar("J", bound=Batchable)


class QueueFull(Exception):
    """The bounded queue has no room; the caller should retry later."""


class QueueClosed(Exception):
    """The worker is shutting down and accepts no more jobs."""


class FairBatcher(Generic[J]):
    """FIFO queue of jobs with the batch selection described in the module docstring."""

    def __init__(self, max_batch: int, max_queue: int) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be >= 1, got {max_batch}, {max_queue}")
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._jobs: deque[J] = deque()

    def __len__(self) -> int:
        return len(self._jobs)

    def push(self, job: J) -> None:
        if len(self._jobs) >= self.max_queue:
            raise QueueFull(f"queue is full ({self.max_queue} jobs waiting)")
        self._jobs.append(job)

    def remove(self, job: J) -> bool:
        """Drop a waiting job (e.g. its client left). False when it is not waiting (already taken or unknown)."""
        try:
            self._jobs.remove(job)
        except ValueError:
            return False
        return True

    def head_batch_full(self) -> bool:
        """Whether the batch the next :meth:`pop_batch` would return already has ``max_batch`` images."""
        return bool(self._jobs) and sum(j.n for j in self._select()) >= self.max_batch

    def pop_batch(self) -> list[J]:
        """Remove and return the next batch (oldest job first, then compatible jobs in FIFO order); [] if empty."""
        batch = self._select()
        for job in batch:
            self._jobs.remove(job)
        return batch

    def _select(self) -> list[J]:
        if not self._jobs:
            return []
        head = self._jobs[0]
        batch = [head]
        # The head always runs, even when it alone exceeds max_batch (the HTTP layer bounds n separately).
        rows = head.n
        for job in list(self._jobs)[1:]:
            if rows >= self.max_batch:
                break
            # A compatible job that does not fit is skipped, not waited for: it will head a later batch.
            if job.key == head.key and rows + job.n <= self.max_batch:
                batch.append(job)
                rows += job.n
        return batch


class JobQueue(Generic[J]):
    """Thread-safe :class:`FairBatcher`: HTTP handlers :meth:`put`, the single inference thread :meth:`take`s."""

    def __init__(self, max_batch: int, max_queue: int) -> None:
        self._batcher: FairBatcher[J] = FairBatcher(max_batch, max_queue)
        self._cond = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        with self._cond:
            return len(self._batcher)

    @property
    def max_batch(self) -> int:
        return self._batcher.max_batch

    @property
    def max_queue(self) -> int:
        return self._batcher.max_queue

    def put(self, job: J) -> int:
        """Enqueue; returns the queue depth after it. Raises :class:`QueueFull` or :class:`QueueClosed`."""
        with self._cond:
            if self._closed:
                raise QueueClosed("worker is shutting down")
            self._batcher.push(job)
            self._cond.notify_all()
            return len(self._batcher)

    def remove(self, job: J) -> bool:
        with self._cond:
            return self._batcher.remove(job)

    def take(self, timeout: float, batch_wait: float = 0.0) -> list[J]:
        """Next batch, waiting up to ``timeout`` s for a first job ([] if none or closed).

        When the head's batch has free rows, wait up to ``batch_wait`` s more for compatible jobs to arrive: a
        burst of requests sent "at the same time" lands a few ms apart and should share one pipeline call.
        """
        with self._cond:
            deadline = time.monotonic() + timeout
            while not self._closed and len(self._batcher) == 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                self._cond.wait(left)
            if self._closed:
                return []
            fill_deadline = time.monotonic() + batch_wait
            while not self._closed and len(self._batcher) and not self._batcher.head_batch_full():
                left = fill_deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return self._batcher.pop_batch()

    def close(self) -> list[J]:
        """Refuse new jobs, wake the taker and return the jobs that were still waiting (the caller fails them)."""
        with self._cond:
            self._closed = True
            left: list[J] = []
            while len(self._batcher):  # bounded: each pop removes at least one job
                left.extend(self._batcher.pop_batch())
            self._cond.notify_all()
            return left
