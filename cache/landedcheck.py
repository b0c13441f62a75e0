"""Landed chunks: in the file, recorded as LANDED, never checked on their own; checked here.

Checked as a whole (`check_whole`, a pull): nobody reads the blob before its seal, so the
chunks a pull receives are not hashed on their own. They are landed (chunkstate.py: in the
file, recorded in the index as LANDED), not readable, and the sealer's hash is the only one
each byte gets. A matching seal verifies them all (`mark_verified`). A mismatch checks each
landed chunk against its own digest (`check_all`); the ones that fail are dropped
(LandedChunksBad: fetch them again, checked on their own), and if none fails, the chunk list
lied (SealMismatch, as ever). A landed chunk found on reopen by anyone else (a pull that
stopped; a mount after it) is served only after it is checked (`verify`,
`PartialBlob.verify_landed`).

Dropping corrupt landed chunks (`drop`) punches their holes under the file's write lock
(writeback.py), deciding what is still landed and taking it out of the state in the same trio
step: a chunk a reader fetched again meanwhile is written only after the punches, never under a
hole.

Concurrency contract (trio): states change on the trio thread; a thread gets a buffer to hash.
"""

from __future__ import annotations

import logging
from typing import Callable

import trio

from .chunkbuf import BufferPool, ChunkBuffer
from .chunks import Chunk
from .chunkstate import ChunkStates
from .errors import LandedChunksBad
from .index import ChunkIndex
from .sealer import Sealer
from .units import digest_of
from .writeback import WriteBack

log = logging.getLogger(__name__)


class LandedChecks:
    """The checks of one blob's landed chunks. `retired()` tells whether the blob was replaced
    (then nothing of it is recorded in the index any more)."""

    def __init__(self, *, digest: str, chunks: list[Chunk], states: ChunkStates,
                 sealer: Sealer, io: WriteBack, index: ChunkIndex, pool: BufferPool,
                 limiter: trio.CapacityLimiter, retired: Callable[[], bool]):
        self._digest, self._chunks, self._states = digest, chunks, states
        self._sealer, self._io, self._index = sealer, io, index
        self._pool, self._limiter, self._retired = pool, limiter, retired
        # While a seal checks the landed chunks (check_all): the ones dropped as corrupt since
        # it began, by it or by a reader (verify). None otherwise.
        self._dropped_in_check: set[int] | None = None

    async def verify(self, i: int) -> ChunkBuffer | None:
        """Landed chunk `i` read back and checked against its own digest (see
        PartialBlob.verify_landed)."""
        buf, ok = await self.load_checked(i)
        if not self._states.is_landed(i):  # evicted (or checked by a seal) meanwhile
            self._pool.release(buf)
            return None
        if not ok:
            self._pool.release(buf)
            log.warning("landed chunk %d of %s does not match its digest; fetching it again",
                        i, self._digest[:19])
            await self.drop([i])
            return None
        self.mark_verified([i])
        return buf

    async def load_checked(self, i: int) -> tuple[ChunkBuffer, bool]:
        """Chunk `i` read back from the file (a buffer the caller releases), and whether it
        matches its own digest."""
        buf = await self._io.load(i)
        try:
            actual = await trio.to_thread.run_sync(digest_of, self._chunks[i], buf,
                                                   limiter=self._limiter)
        except BaseException:
            self._pool.release(buf)
            raise
        return buf, actual == self._chunks[i].digest

    def mark_verified(self, indexes: list[int]) -> None:
        """Landed chunks checked (on their own, or by the whole blob's digest): readable."""
        for i in indexes:
            self._states.checked(i)
        if not self._retired():
            self._index.mark_present(self._digest, indexes)

    def unland(self, i: int) -> None:
        """Landed chunk `i` is to be written again (checked), or dropped: not in the file until
        then, and out of the sealer's hash if it took the old bytes in."""
        self._states.dropped(i)
        self._sealer.drop_early(i)
        self._sealer.forget_hashed(i)

    async def drop(self, indexes: list[int]) -> list[int]:
        """Landed chunks that failed their own digest: absent again, their bytes (which the
        sealer may have hashed) out of the file and out of its hash. Only the ones still landed
        when it runs: one that a reader (or the seal) dropped or checked meanwhile may be in
        the file again, fetched and verified since. Returns the chunks it dropped."""
        # The caller found these corrupt some awaits ago; a reader may have dropped one since
        # and fetched it again. So, under the write lock that every write to the file takes
        # (writeback.py): decide (still landed?) and take them out of the state in one trio
        # step, then punch without letting go. A chunk fetched again meanwhile, even while a
        # punch runs in its thread, is written only after the last punch, never under a hole.
        # One that is in the file again when its turn comes (readable, its write behind
        # pending on this lock) is not punched: its own write replaces the old bytes. Nothing
        # but the punches is awaited under the lock (no deadlock with the reserve's evictions).
        async with self._io.lock:
            dropped = [i for i in indexes if self._states.is_landed(i)]
            if not dropped:
                return dropped
            for i in dropped:
                self.unland(i)
            self._index.mark_absent(self._digest, dropped)  # durable before the holes
            if self._dropped_in_check is not None:
                self._dropped_in_check.update(dropped)
            for i in dropped:
                if self._states.in_file(i):
                    continue
                await self._io.punch(i)
        return dropped

    async def check_all(self, actual: str) -> None:
        """The whole blob hashed to `actual`, not its digest, and some chunks were never
        checked on their own: check them now, from the file. Raises LandedChunksBad for the
        ones that fail (dropped: fetch them again); returns if none did."""
        # A reader may check a landed chunk meanwhile (verify), drop it as corrupt and fetch it
        # again between two awaits of this loop: its state when the loop reaches it, or at the
        # end, does not tell whether it was bad. So drops are counted as they happen
        # (_dropped_in_check) and such a chunk is blamed all the same (it explains the
        # mismatch: no SealMismatch), while `drop` punches only what is still landed.
        # (Nothing is evicted while this runs: the blob is `sealing`.)
        found = []  # corrupt, found here
        dropped = self._dropped_in_check = set()
        landed = self._states.is_landed
        try:
            for i in [i for i in range(len(self._chunks)) if landed(i)]:
                if not landed(i):
                    continue  # a reader checked it meanwhile (and dropped it if bad)
                buf, ok = await self.load_checked(i)
                self._pool.release(buf)
                if not landed(i):
                    continue  # likewise, while we read it
                if ok:
                    self.mark_verified([i])
                else:
                    found.append(i)
            if found:
                await self.drop(found)
        finally:
            self._dropped_in_check = None
        bad = sorted(dropped.union(found))
        if not bad:
            return  # every chunk matches its digest: the chunk list is what is wrong
        log.warning("blob %s hashed to %s, not its digest: %d of its chunks did not match their "
                    "own digests and are fetched again", self._digest[:19], actual[:19],
                    len(bad))
        raise LandedChunksBad(f"{len(bad)} chunks of {self._digest[:19]} were corrupt "
                              f"(first: chunk {bad[0]}); they must be fetched again", bad)
