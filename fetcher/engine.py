"""The one fetch engine: every chunk fetch of a process goes through it, whoever wants it (a
mount's readers, a pull; next, a pull-through registry).

A client (a `Requester`) wants chunk `i` of a blob at a priority; the engine gives it the one
`Flight` of that chunk (single-flight: however many want it, it is fetched once), queues a job
in its one `FetchQueue` (most urgent first; a job waiting at a lower priority is promoted) and
runs it in one of its `workers` tasks:
- the worker takes the chunk's bytes from the `ByteBudget` first (`max_inflight`: memory is
  bounded in bytes whatever the chunk size, count or number of clients, invariant 8);
- it asks the requester for the blob's `ChunkSource` (fetcher/source.py) and fetches the chunk
  through the one fetch path (fetcher/fetch.py: one retry policy, one error classification,
  one answer check);
- the verified chunk's buffer is shown to the requester (`fetched`: a mount keeps it for its
  readers), the flight is done (readers go on: the chunk is served from memory until written),
  and a task of the engine's nursery makes it durable and records it (`commit_chunk`), then
  tells the requester (`recorded`: a mount seals a complete blob).
A failed flight carries its error to whoever waits on it; the next `want` makes a new one.

Progress for deadlines (fetcher/deadline.py): a flight being fetched moves with its bytes
received, all tries together; a flight still queued moves with the bytes of every fetch (as
they move, its turn comes).

Concurrency contract: trio thread only. The engine owns its flights and queue; the cache owns
each chunk's state (the engine asks `BlobCache.current(digest)` and `PartialBlob.fetched`, it
never keeps a copy). The workers and commit tasks belong to the nursery given to the
constructor (a mount's, or a pull's own); a flight belongs to that nursery too, not to a
waiter: a reader that gives up at its deadline does not cancel a fetch that others wait for.
When one chunk is wanted by two requesters, the one whose job runs is the one told.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Protocol

import trio

from modelfs.cache.blobcache import BlobCache
from modelfs.cache.chunkbuf import ChunkBuffer, Receiver
from modelfs.cache.errors import ModelfsError
from modelfs.cache.partial import PartialBlob

from .deadline import ProgressDeadline
from .fetch import fetch_chunk
from .retry import RetryPolicy
from .scheduler import BACKGROUND, ByteBudget, FetchQueue
from .source import ChunkSource
from .stats import FetchStats, source_label

log = logging.getLogger(__name__)


class BlobReset(ModelfsError):
    """A blob's cached state was reset under a fetch or a read (sealed, discarded, or given a
    new chunk list): look again."""


@dataclasses.dataclass(eq=False)  # (by identity: flights are kept in sets)
class Flight:
    done: trio.Event = dataclasses.field(default_factory=trio.Event)
    error: BaseException | None = None
    receiver: Receiver | None = None  # of the try in progress (or the last one)
    earlier: int = 0  # bytes received by its earlier tries

    def attempt(self, receiver: Receiver) -> None:
        """A new try receives into `receiver` (fetch_chunk tells us)."""
        self.earlier = self.received()
        self.receiver = receiver

    def received(self) -> int:
        """Bytes received for this chunk so far, all tries together: its progress."""
        return self.earlier + (self.receiver.arrived if self.receiver is not None else 0)


class Requester(Protocol):
    """A client of the engine: what it wants fetched, it is asked about (by blob digest)."""

    async def source(self, digest: str) -> ChunkSource:
        """Where the blob's chunks come from (may ask the registry; may raise BlobReset)."""

    def defer(self, digest: str, index: int, priority: int) -> bool:
        """True: not now (the requester wants it again later, or calls it off)."""

    def fetched(self, blob: PartialBlob, index: int, buf: ChunkBuffer, priority: int) -> None:
        """The chunk is verified; `buf` holds its bytes for the call (hold it to keep it).
        `priority` is what the chunk was wanted for when its bytes came in."""

    def recorded(self, blob: PartialBlob, index: int, error: Exception | None) -> None:
        """The chunk is durable and recorded in the index; or, with `error`, making it so
        failed (it is fetched again when wanted)."""


class FetchEngine:
    def __init__(self, cache: BlobCache, nursery: trio.Nursery, *, retry: RetryPolicy,
                 workers: int = 4, max_inflight: int = 64 << 20):
        self._cache, self._nursery, self._retry = cache, nursery, retry
        self._queue = FetchQueue()
        self.budget = ByteBudget(max_inflight)
        self._flights: dict[tuple[str, int], Flight] = {}
        self._fetching: set[Flight] = set()  # flights whose chunk is being received
        self._received = 0  # bytes received by the flights that ended (progress marks)
        self.fetches = 0  # chunk fetches started (statistics)
        self.stats = FetchStats()
        for _ in range(max(1, workers)):
            nursery.start_soon(self._worker)

    # -- what clients call --------------------------------------------------------------------

    def want(self, requester: Requester, digest: str, i: int, priority: int) -> Flight | None:
        """Make sure chunk `i` of blob `digest` is on its way, at least at `priority`; its
        flight, or None when there is nothing to fetch (verified already, or the blob is not
        open in progress: sealed, or reset)."""
        blob = self._cache.current(digest)
        if blob is None or blob.fetched(i):
            return None
        flight = self._flights.get((digest, i))
        if flight is None:
            flight = self._flights[(digest, i)] = Flight()
        self._queue.push((digest, i), priority, (requester, i))
        return flight

    def call_off(self, digest: str, i: int) -> None:
        """Nobody wants chunk `i` in the background any more: a background job that did not
        start is dropped, and a flight without a job ends (its waiters look again). A job
        that runs, or that waits at a higher priority, goes on."""
        job = self._queue.job((digest, i))
        if job is not None:
            if job.running or job.priority != BACKGROUND:
                return
            self._queue.cancel(job.key)
        flight = self._flights.pop((digest, i), None)
        if flight is not None:
            flight.done.set()

    async def wait(self, flight: Flight, deadline: ProgressDeadline | None = None) -> None:
        """Until `flight` is done, reporting its progress to `deadline` (the caller's scope)."""
        if deadline is None:
            await flight.done.wait()
        else:
            await deadline.wait(flight.done, lambda: self._progress(flight))

    # -- the workers --------------------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            job = await self._queue.get()
            requester, i = job.payload
            digest = job.key[0]
            try:
                if not requester.defer(digest, i, job.priority):
                    await self._run(requester, digest, i, job)
            finally:
                self._queue.done(job)

    def _reset(self, digest: str) -> BlobReset:
        return BlobReset(f"blob {digest[:19]} was reset while being fetched")

    async def _run(self, requester: Requester, digest: str, i: int, job) -> None:
        key = (digest, i)
        flight = self._flights.setdefault(key, Flight())
        label = None  # the source's, once there is one
        try:
            blob = self._cache.current(digest)
            if blob is None:
                raise self._reset(digest)
            length = blob.chunks[i].length
            await self.budget.acquire(length)
            try:
                source = await requester.source(digest)
                label = source_label(source.name)
                blob = self._cache.current(digest)
                if blob is None:  # sealed or dropped while the source was found
                    raise self._reset(digest)
                if not blob.fetched(i):
                    self.fetches += 1
                    self._fetching.add(flight)
                    buf = await fetch_chunk(source, blob, i, self._retry, flight.attempt,
                                            lambda exc: self.stats.retried(label, exc))
                    if flight.receiver is not None:  # (not a landed chunk checked from disk)
                        self.stats.fetched(label, digest, length)
                    try:
                        requester.fetched(blob, i, buf, job.priority)
                    finally:
                        blob.release_buffer(buf)
            finally:
                self.budget.release(length)
            self._end(key, flight)  # verified (written behind): waiters may go on
            # durable in batches, without holding up this worker
            self._nursery.start_soon(self._commit, requester, blob, i)
        except Exception as exc:  # handed to whoever waits on this flight
            flight.error = exc
            if label is not None and not isinstance(exc, BlobReset):
                self.stats.failed(label, exc)
            log.warning("fetching chunk %d of %s failed: %s", i, digest[:19], exc)
        finally:
            if flight in self._fetching:
                self._fetching.discard(flight)
                self._received += flight.received()
            self._end(key, flight)

    def _end(self, key: tuple[str, int], flight: Flight) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        flight.done.set()

    async def _commit(self, requester: Requester, blob: PartialBlob, i: int) -> None:
        try:
            await blob.commit_chunk(i)
        except Exception as exc:
            log.warning("recording chunk %d of %s failed: %s", i, blob.digest[:19], exc)
            requester.recorded(blob, i, exc)
        else:
            requester.recorded(blob, i, None)

    def _progress(self, flight: Flight) -> tuple:
        """A waiter's mark of progress (fetcher/deadline.py): its flight's bytes received once
        it is being fetched; before that, the bytes received by every fetch."""
        if flight in self._fetching or flight.receiver is not None:
            return id(flight), flight.received()
        return id(flight), "queued", self._received + sum(f.received() for f in self._fetching)
