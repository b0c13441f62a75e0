"""What to fetch next: a priority queue of chunk fetches shared by every blob of a mount.

Priorities (lower first): DEMAND (a reader waits for it), WINDOW (just ahead of a sequential
reader), BACKGROUND (the rest of a blob an engine has opened, in file order). A job queued at a
low priority is promoted when a reader starts waiting for it, so background work never stands
in front of a demand miss for longer than one chunk transfer.

`ByteBudget` bounds the bytes of chunk data held by fetches in flight, across all workers and
blobs (invariant 8): a worker takes a chunk's length from it before fetching and gives it back
once the chunk is verified (its write behind is bounded by the cache: PENDING_LIMIT per blob
and the unrecorded budget, cache/groupsync.py).

Concurrency contract: trio thread only; no awaits between reading and changing the heap.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools

import trio

DEMAND, WINDOW, BACKGROUND = 0, 1, 2


@dataclasses.dataclass(eq=False)
class Job:
    key: tuple[str, int]  # (blob digest, chunk index)
    priority: int
    payload: object
    running: bool = False
    cancelled: bool = False


class FetchQueue:
    def __init__(self) -> None:
        self._heap: list[tuple[int, int, Job]] = []
        self._jobs: dict[tuple[str, int], Job] = {}
        self._seq = itertools.count()
        self._changed = trio.Event()

    def job(self, key) -> Job | None:
        return self._jobs.get(key)

    def push(self, key, priority: int, payload) -> Job:
        """Queue `key` (or promote it if it waits at a lower priority)."""
        job = self._jobs.get(key)
        if job is None:
            job = self._jobs[key] = Job(key, priority, payload)
        elif job.priority <= priority:
            return job
        elif job.running:
            job.priority = priority  # what it is wanted for now (the worker keeps its bytes)
            return job
        job.priority = priority
        heapq.heappush(self._heap, (priority, next(self._seq), job))
        self._wake()
        return job

    def cancel(self, key) -> None:
        """Drop a queued (not running) job, e.g. background work for a closed file."""
        job = self._jobs.get(key)
        if job is not None and not job.running:
            job.cancelled = True
            del self._jobs[key]

    def done(self, job: Job) -> None:
        if self._jobs.get(job.key) is job:
            del self._jobs[job.key]

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def get(self) -> Job:
        """The most urgent queued job (marked running)."""
        while True:
            while self._heap:
                priority, _, job = heapq.heappop(self._heap)
                if job.cancelled or job.running or job.priority != priority:
                    continue  # a stale entry: promoted, cancelled or taken already
                job.running = True
                return job
            await self._changed.wait()


class ByteBudget:
    """At most `limit` bytes held at once; one holder may exceed it if it is alone."""

    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0
        self.peak = 0
        self._changed = trio.Event()

    async def acquire(self, n: int) -> None:
        while self.held and self.held + n > self.limit:
            await self._changed.wait()
        self.held += n
        self.peak = max(self.peak, self.held)

    def release(self, n: int) -> None:
        self.held -= n
        self._changed.set()
        self._changed = trio.Event()
