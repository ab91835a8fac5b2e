"""server.sdxl.batching: batch selection and FIFO fairness (pure logic, fake jobs), and the thread-safe queue."""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass

import pytest
from server.sdxl.batching import BatchKey, FairBatcher, JobQueue, QueueClosed, QueueFull

A = BatchKey(64, 64, 4, 5.0)
B = BatchKey(64, 96, 4, 5.0)
C = BatchKey(64, 64, 8, 5.0)  # same size, other steps: not compatible with A


@dataclass(eq=False)
class FakeJob:
    name: str
    key: BatchKey
    n: int = 1


def names(batch: list[FakeJob]) -> list[str]:
    return [j.name for j in batch]


def test_compatible_jobs_share_a_batch_in_fifo_order():
    q: FairBatcher[FakeJob] = FairBatcher(max_batch=8, max_queue=10)
    for name, key in [("a1", A), ("b1", B), ("a2", A), ("c1", C), ("a3", A), ("b2", B)]:
        q.push(FakeJob(name, key))
    assert names(q.pop_batch()) == ["a1", "a2", "a3"]
    assert names(q.pop_batch()) == ["b1", "b2"]
    assert names(q.pop_batch()) == ["c1"]
    assert q.pop_batch() == [] and len(q) == 0


def test_batch_is_bounded_in_images_and_skips_what_does_not_fit():
    q: FairBatcher[FakeJob] = FairBatcher(max_batch=4, max_queue=10)
    for name, n in [("a1", 2), ("a2", 3), ("a3", 1), ("a4", 2)]:
        q.push(FakeJob(name, A, n))
    assert names(q.pop_batch()) == ["a1", "a3"]  # a2 (3 images) would make 5: it heads the next batch
    assert names(q.pop_batch()) == ["a2"]  # 3 + a4's 2 > 4
    assert names(q.pop_batch()) == ["a4"]


def test_oversized_head_runs_alone():
    q: FairBatcher[FakeJob] = FairBatcher(max_batch=2, max_queue=10)
    q.push(FakeJob("big", A, 3))
    q.push(FakeJob("small", A, 1))
    assert names(q.pop_batch()) == ["big"]
    assert names(q.pop_batch()) == ["small"]


def test_a_stream_of_one_group_does_not_starve_another():
    q: FairBatcher[FakeJob] = FairBatcher(max_batch=2, max_queue=100)
    q.push(FakeJob("a0", A))
    q.push(FakeJob("b0", B))
    order = []
    for i in range(1, 6):  # a new A job arrives before every batch
        q.push(FakeJob(f"a{i}", A))
        order.append(names(q.pop_batch()))
    assert order[0] == ["a0", "a1"]
    assert order[1][0] == "b0"  # b0 became the oldest waiting job: it runs next, whatever keeps arriving


def test_full_queue_refuses_and_remove_frees_a_slot():
    q: FairBatcher[FakeJob] = FairBatcher(max_batch=4, max_queue=2)
    j1, j2 = FakeJob("1", A), FakeJob("2", A)
    q.push(j1)
    q.push(j2)
    with pytest.raises(QueueFull):
        q.push(FakeJob("3", A))
    assert q.remove(j1) and not q.remove(j1)
    q.push(FakeJob("3", A))
    assert names(q.pop_batch()) == ["2", "3"]
    with pytest.raises(ValueError):
        FairBatcher(max_batch=0, max_queue=1)


def test_fairness_invariants_on_random_traffic():
    """Every batch starts with the oldest waiting job, holds one key, fits max_batch (or is a lone oversized job),
    keeps FIFO order, and no job waits longer than the number of jobs queued before it."""
    rng = random.Random(0)
    keys = [A, B, C]
    max_batch = 4
    q: FairBatcher[FakeJob] = FairBatcher(max_batch=max_batch, max_queue=1000)
    waiting: list[FakeJob] = []  # mirror of the queue in arrival order
    ahead: dict[str, int] = {}  # jobs queued before this one at arrival
    pops_waited: dict[str, int] = {}
    serial = 0
    for _ in range(400):
        if rng.random() < 0.6:
            job = FakeJob(f"j{serial}", rng.choice(keys), rng.choice([1, 1, 1, 2, 3, 5]))
            serial += 1
            ahead[job.name] = len(waiting)
            pops_waited[job.name] = 0
            q.push(job)
            waiting.append(job)
            continue
        batch = q.pop_batch()
        if not waiting:
            assert batch == []
            continue
        assert batch[0] is waiting[0]
        assert all(j.key == batch[0].key for j in batch)
        assert sum(j.n for j in batch) <= max_batch or len(batch) == 1
        positions = [waiting.index(j) for j in batch]
        assert positions == sorted(positions)
        for j in batch:
            waiting.remove(j)
            assert pops_waited.pop(j.name) <= ahead[j.name]
        for name in pops_waited:
            pops_waited[name] += 1


# --- JobQueue (threads) ----------------------------------------------------------------------------------------------


def test_take_times_out_empty():
    q: JobQueue[FakeJob] = JobQueue(max_batch=4, max_queue=4)
    start = time.monotonic()
    assert q.take(timeout=0.05) == []
    assert 0.04 <= time.monotonic() - start < 2


def test_take_waits_briefly_for_companions():
    q: JobQueue[FakeJob] = JobQueue(max_batch=4, max_queue=4)
    q.put(FakeJob("a1", A))
    late = threading.Timer(0.05, lambda: q.put(FakeJob("a2", A)))
    late.start()
    try:
        assert names(q.take(timeout=1, batch_wait=0.5)) == ["a1", "a2"]  # not full (4): waits the whole 0.5 s
    finally:
        late.cancel()


def test_take_does_not_wait_when_the_batch_is_full():
    q: JobQueue[FakeJob] = JobQueue(max_batch=2, max_queue=4)
    q.put(FakeJob("a1", A))
    q.put(FakeJob("a2", A))
    start = time.monotonic()
    assert names(q.take(timeout=1, batch_wait=5.0)) == ["a1", "a2"]
    assert time.monotonic() - start < 2


def test_close_wakes_the_taker_and_returns_waiting_jobs():
    q: JobQueue[FakeJob] = JobQueue(max_batch=4, max_queue=4)
    got: list[list[FakeJob]] = []
    taker = threading.Thread(target=lambda: got.append(q.take(timeout=10)))
    taker.start()
    time.sleep(0.05)
    assert q.close() == []
    taker.join(5)
    assert not taker.is_alive() and got == [[]]
    with pytest.raises(QueueClosed):
        q.put(FakeJob("late", A))

    q2: JobQueue[FakeJob] = JobQueue(max_batch=4, max_queue=4)
    q2.put(FakeJob("a", A))
    q2.put(FakeJob("b", B))
    assert names(q2.close()) == ["a", "b"]
    assert q2.take(timeout=0) == []


def test_put_reports_depth_and_refuses_when_full():
    q: JobQueue[FakeJob] = JobQueue(max_batch=4, max_queue=2)
    assert q.put(FakeJob("1", A)) == 1
    assert q.put(FakeJob("2", B)) == 2
    with pytest.raises(QueueFull):
        q.put(FakeJob("3", A))
    assert len(q) == 2
