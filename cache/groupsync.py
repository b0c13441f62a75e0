"""Durability in batches: one fdatasync for every chunk written before it, and a bound in bytes
on what waits to be recorded.

`GroupSync` (one per blob file) makes writes durable at most every `interval` seconds, so a
fast stream of chunks costs a few syncs a second instead of one per chunk (nobody waits on
them to read: a verified chunk is served before it is durable). `UnrecordedBudget` (one per
cache) bounds what a crash costs in bytes, whatever the link speed: past half of it, every
group sync with writes waiting syncs at once, and past all of it a chunk waits for room before
it enters its blob. The blob records the chunks a sync covered in the same trio step as the
sync ends (cache/partial.py, `_record_durable`), so recorded is what is bounded, not only
durable.

Concurrency contract: trio thread only; the fdatasync runs in the cache's I/O threads.
"""

from __future__ import annotations

import os
from typing import Callable

import trio

# Bytes of chunks in a cache that may wait to be recorded in the index (UnrecordedBudget) when
# its owner does not say: a pull. (A mount gives its --max-inflight, whose default this is.)
UNRECORDED_LIMIT = 64 << 20


class UnrecordedBudget:
    """Bytes of chunks taken into the blobs of one cache (verified, or landed for the seal) and
    not recorded in the index yet: what a crash makes us fetch again, however fast the link.

    A chunk is admitted (`admit`) just before it enters its blob, and waits while the chunks
    admitted before it hold `limit` bytes (one chunk alone always fits); it is settled
    (`settle`) once it is recorded, or when it leaves the file unrecorded. Per cache, not per
    blob: the bound is what a crash of the whole process costs, all blobs together.

    From half the limit on, and while a chunk waits for room, the budget is `pressed`: every
    group sync with writes waiting syncs and records them at once instead of at its interval
    (`notify`). Half, so that the next half fills while that sync runs: a fast stream keeps
    flowing instead of stopping at each sync, and a burst still costs a sync per half budget,
    not one per chunk."""

    def __init__(self, limit: int = UNRECORDED_LIMIT):
        self.limit = max(1, limit)
        self.held = 0
        self._waiting = 0  # chunks waiting for room
        self._room = trio.Event()  # set (and replaced) whenever bytes are settled
        self._notify: set[trio.Event] = set()  # set when the budget is pressed

    @property
    def pressed(self) -> bool:
        return self.held > 0 and (self._waiting > 0 or 2 * self.held >= self.limit)

    async def admit(self, length: int) -> None:
        while self.held and self.held + length > self.limit:
            self._waiting += 1
            self._wake_syncs()
            try:
                await self._room.wait()
            finally:
                self._waiting -= 1
        self.held += length
        self._wake_syncs()

    def settle(self, length: int) -> None:
        self.held -= length
        self._room.set()
        self._room = trio.Event()

    def notify(self, event: trio.Event) -> None:
        """Set `event` as soon as the budget is pressed (now, if it is); `forget` it after."""
        if self.pressed:
            event.set()
        else:
            self._notify.add(event)

    def forget(self, event: trio.Event) -> None:
        self._notify.discard(event)

    def _wake_syncs(self) -> None:
        if self.pressed and self._notify:
            for event in self._notify:
                event.set()
            self._notify.clear()


class GroupSync:
    """fdatasync shared by every chunk waiting to be durable: one sync covers all writes before
    it, and syncs come at most every `interval` seconds, so a fast stream of chunks costs a few
    syncs a second instead of one per chunk (nobody waits on them to read: see write_chunk);
    sooner when the cache's unrecorded bytes press (`UnrecordedBudget`). Right after a sync,
    in the same trio step, `on_durable(generation)` records the chunks it covered.

    The first waiter that finds no sync under way leads the next one: it gathers writes (until
    the interval is up, `hurry`, or the budget presses), syncs and records; everyone else rides
    along on `_next`. A leader cancelled meanwhile hands over: the next waiter leads.

    Writes already under way for the file (`writing()`: how many chunks taken in wait for their
    write behind, or are being written) join the sync the leader is about to start, for at most another interval: a sync
    started while they land covers none of them, and under a pressed budget the next would
    start at once again, for one chunk each (measured: 64 chunks in a burst took 42-44 syncs,
    about 1.5 chunks each)."""

    def __init__(self, fd: int, limiter: trio.CapacityLimiter, interval: float = 0.5, *,
                 budget: UnrecordedBudget, on_durable: Callable[[int], None],
                 writing: Callable[[], int] = lambda: 0):
        self._fd, self._limiter, self._interval = fd, limiter, interval
        self._budget, self._on_durable, self._writing = budget, on_durable, writing
        self._landed: trio.Event | None = None  # set when a write ends, while a leader waits
        self._written = self._synced = 0
        self._last = -interval
        self._next: trio.Event | None = None  # set when the sync being gathered or run is done
        self._wake: trio.Event | None = None  # the leader's, while it gathers
        self._hurried = False
        self.syncs = 0  # (statistics)

    def hurry(self) -> None:
        """No more writes are coming to batch with: sync what waits now, not at the interval."""
        self._hurried = True
        if self._wake is not None:
            self._wake.set()

    def wrote(self) -> int:
        """A write to the file is done; its generation (the first sync after it covers it)."""
        self._written += 1
        self.write_ended()
        return self._written

    def write_ended(self) -> None:
        """A write under way ended (done, or failed): a leader waiting for it looks again."""
        if self._landed is not None:
            self._landed.set()

    async def wait_durable(self, generation: int) -> None:
        while self._synced < generation:
            if self._next is not None:
                await self._next.wait()
                continue
            done = self._next = trio.Event()
            try:
                await self._gather()
                target = self._written
                await trio.to_thread.run_sync(os.fdatasync, self._fd, limiter=self._limiter)
                self._synced = max(self._synced, target)
                self.syncs += 1
                self._on_durable(target)
            finally:
                self._last = trio.current_time()
                self._next = None
                done.set()

    async def _gather(self) -> None:
        """Let more writes join this sync, while there is time and room for them; then the
        writes under way, for at most another interval."""
        wait = self._last + self._interval - trio.current_time()
        if wait > 0 and not self._hurried:
            self._wake = trio.Event()
            self._budget.notify(self._wake)
            try:
                with trio.move_on_after(wait):
                    await self._wake.wait()
            finally:
                self._budget.forget(self._wake)
                self._wake = None
        # (the ones under way now, not the ones that start meanwhile: under a steady stream
        # that would hold the sync until the budget is full, and the stream with it)
        target = self._written + self._writing()
        with trio.move_on_after(self._interval):
            while self._written < (target := min(target, self._written + self._writing())):
                self._landed = trio.Event()
                try:
                    await self._landed.wait()
                finally:
                    self._landed = None
