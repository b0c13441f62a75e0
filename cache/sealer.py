"""The whole-blob hash of a blob being materialized, built as its chunks come in.

A seal compares the sha256 of the whole blob with the manifest digest (invariant 3). The sealer
builds that hash in file order while the blob is filled, so a seal in the common case costs no
second pass over the disk: `advance` hashes the chunks in the file that follow its `position`,
from the chunk buffers kept for it (`keep`: at most EARLY_LIMIT bytes, each holding a buffer
ref) or read back from the file when they were not kept. The blob drives it from
`commit_chunk`, before the batched fdatasync, so the buffers kept for it are let go soon; a seal
drives it to the end.

It waits while the mount's readers (readers.py) are being served (a mount sets them; it would
compete with them for the CPU) and catches up when they pause, or at the seal, which never
waits. It hashes in the cache's low-priority thread when there is one. A chunk whose bytes the
hash took in but were never checked on their own (landed, or a blob without chunk digests)
that leaves the file makes it start again from offset 0 (`forget_hashed`, `restart`): the next
bytes there may differ.

Where the seal is what everyone waits for (no readers: a pull), a receiver far ahead of the
sealer waits for it to come closer (`room_for`), so the sealer hashes from memory instead of
reading most chunks back from disk; a sealer that does not move for SEALER_PATIENCE may be
waiting for a chunk nobody is about to fetch (a pull that resumes) and is not waited for until
it moves again.

Concurrency contract (trio): the position, the kept buffers and the hasher change on the trio
thread; a thread gets the hasher and a buffer only under `lock` (hashing is one thread trip per
chunk). Whoever holds the lock re-checks what is in the file after each await.
"""

from __future__ import annotations

import hashlib
from typing import Awaitable, Callable

import trio

from .buffers import feed
from .chunkbuf import BufferPool, ChunkBuffer
from .chunks import Chunk
from .readers import ReaderActivity

# Bytes of chunks kept in memory for the sealer until it hashes them, per blob: enough for the
# chunks that concurrent fetches finish ahead of the one it waits for.
EARLY_LIMIT = 48 << 20
# A receiver waits for the sealer to come closer at most this long without it moving.
SEALER_PATIENCE = 1.0


class Sealer:
    """The whole-blob hasher of one blob. `in_file(i)` tells whether chunk i's bytes are in
    the file (or on their way), `load(i)` reads one back (a buffer to release)."""

    def __init__(self, *, digest: str, chunks: list[Chunk], pool: BufferPool,
                 limiter: trio.CapacityLimiter, in_file: Callable[[int], bool],
                 load: Callable[[int], Awaitable[ChunkBuffer]], hash_thread=None,
                 readers: ReaderActivity | None = None):
        self._digest, self._chunks = digest, chunks
        self._pool, self._limiter = pool, limiter
        self._in_file, self._load = in_file, load
        self._hash_thread = hash_thread  # a LowPriorityThread (lowprio.py), or None
        # A mount's readers: while they are being served, the sealer waits. None in a pull,
        # where the seal is what everyone waits for.
        self._readers = readers
        # (a blob without chunk digests has readers waiting for this hash: never the slow lane)
        self._slow_lane = hash_thread is not None and all(c.digest is not None for c in chunks)
        self._hasher = hashlib.sha256()
        self._position = 0  # chunks [0, position) are in the hash
        self.lock = trio.Lock()
        self._early: dict[int, ChunkBuffer] = {}  # chunks in the file ahead of it, kept for it
        self._early_bytes = 0
        self.stalled = False  # it did not move for a while: receivers go on without it
        self._moved = trio.Event()  # set (and replaced) when it moves or a pending write ends
        self.sealing = False  # a seal drives it: it never pauses for readers then

    @property
    def position(self) -> int:
        return self._position

    def hexdigest(self) -> str:
        return "sha256:" + self._hasher.hexdigest()

    def locked(self) -> bool:
        return self.lock.locked()

    def may_be_reading(self, i: int) -> bool:
        """Whether the sealer may be reading chunk `i` back right now. A chunk it has hashed
        already, and that is checked on its own when it comes back, is not."""
        return self.lock.locked() and not (self._chunks[i].digest is not None
                                           and i < self._position)

    async def advance(self) -> None:
        """Hash the chunks in the file that follow the position (from memory when kept)."""
        async with self.lock:
            n = len(self._chunks)
            hasher = self._hasher
            while self._position < n and self._in_file(self._position):
                if self.paused():
                    self.clear_early()  # read back from disk when it catches up
                    return
                j = self._position
                buf = self._pop_early(j)
                if buf is None:
                    buf = await self._load(j)
                try:
                    if self._slow_lane:
                        await self._hash_thread.run(feed, hasher, buf)
                    else:
                        await trio.to_thread.run_sync(feed, hasher, buf, limiter=self._limiter)
                finally:
                    self._pool.release(buf)
                if self._hasher is not hasher:
                    return  # restarted meanwhile (a failed write): what we hashed is void
                self._position = j + 1
                self.stalled = False
                self.wake()  # a receiver may wait for the sealer to come closer

    def restart(self) -> None:
        """Forget the whole-blob hash so far: it is built again from offset 0 (read back)."""
        self._hasher, self._position = hashlib.sha256(), 0
        self.clear_early()

    def forget_hashed(self, i: int) -> None:
        """Chunk `i`'s bytes, never checked on their own, are going: if the sealer took them
        in (or may be taking them in right now, under its lock) it starts again."""
        if i < self._position or (i == self._position and self.lock.locked()):
            self.restart()

    def paused(self) -> bool:
        return not self.sealing and self._readers is not None and \
            self._readers.active(self._digest)

    def within_reach(self, i: int) -> bool:
        """Whether chunk `i` ends within EARLY_LIMIT of the position. The chunk the sealer
        needs next always is, however large: it waits for that very chunk."""
        if i <= self._position or self._position >= len(self._chunks):
            return True
        return self._chunks[i].end - self._chunks[self._position].start <= EARLY_LIMIT

    def far_ahead(self, i: int) -> bool:
        """Whether a receiver of chunk `i` should wait for the sealer to come closer: where
        the seal is what everyone waits for (no readers: a pull), and `i` is beyond its reach."""
        return self._readers is None and not self.within_reach(i)

    async def room_for(self, i: int, full: Callable[[], bool]) -> None:
        """Wait while `full()` (too many bytes wait to be written: the commit tasks write
        them), or while chunk `i` is far ahead of a sealer that keeps going (it is given a
        push, and one that does not move for SEALER_PATIENCE is not waited for until it
        moves)."""
        pushed_at = -1
        while True:
            is_full = full()
            far = not self.stalled and self.far_ahead(i)
            if not (is_full or far):
                return
            if far and pushed_at != self._position and not self.lock.locked():
                pushed_at = self._position  # once per position: it may be stuck there
                await self.advance()
                continue
            with trio.move_on_after(SEALER_PATIENCE) as scope:
                await self._moved.wait()
            if scope.cancelled_caught and not is_full:
                self.stalled = True

    def wake(self) -> None:
        """It moved, or a pending write finished: receivers waiting in `room_for` look again."""
        self._moved.set()
        self._moved = trio.Event()

    # -- the buffers kept for it ---------------------------------------------------------------

    def keep(self, i: int, buf: ChunkBuffer) -> None:
        """Chunk `i` entered the file from `buf`: keep a ref for the sealer if it is just ahead
        of it (concurrent fetches finish out of order), rather than read it back from disk a
        moment later. Not far ahead: a reader elsewhere in the blob would pin the bytes until
        the sealer got there; and not while readers keep it waiting."""
        if self.paused():
            return
        length = self._chunks[i].length
        if i >= self._position and self._early_bytes + length <= EARLY_LIMIT and \
                self.within_reach(i):
            self._early[i] = self._pool.hold(buf)
            self._early_bytes += len(buf)

    def drop_early(self, i: int) -> None:
        """Chunk `i` leaves the file: its kept bytes are let go."""
        buf = self._pop_early(i)
        if buf is not None:
            self._pool.release(buf)

    def clear_early(self) -> None:
        for i in list(self._early):
            self.drop_early(i)

    def _pop_early(self, i: int) -> ChunkBuffer | None:
        buf = self._early.pop(i, None)
        if buf is not None:
            self._early_bytes -= len(buf)
        return buf
