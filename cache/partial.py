"""A blob being materialized: a sparse file outside `blobs/`, filled chunk by chunk. The facade
the rest of the code uses; what it holds lives in small modules around it:

  chunkstate.py   every chunk's state (absent, pending, written, recorded, landed), one state
                  machine per chunk, with its share of the unrecorded budget
  sealer.py       the whole-blob hash, built in file order as chunks come in
  writeback.py    the file: writes behind (O_DIRECT), reads, holes, the write lock
  groupsync.py    fdatasync in batches, and the unrecorded budget
  landedcheck.py  landed chunks (a pull's, never checked on their own) checked when needed

Life cycle: in progress (file in `partial/`), sealed (the same file renamed into `blobs/`, the
object kept with its fd), and back to in progress when the disk budget evicts one of its chunks
(`unseal`, then `evict_chunk` punches a hole). A blob replaced by a new chunk list, or
discarded, is `retire`d: it records nothing any more, its fds stay open for reads in flight
until `close`.

`PartialBlob.write_chunk` is the only door into the cache for blob bytes: a chunk comes in a
`Receiver` (`receiver(i)`, filled by a source), whose digest is compared with the chunk digest;
only then is it `readable`, and `commit_chunk` writes it at its final offset, makes it durable
and records it in the index (`present`). When every chunk is present, `seal` checks the
whole-file sha256 against the manifest digest and only then moves the file into `blobs/`.

Checked as a whole (`check_whole`, a pull): the chunks a pull receives are not hashed on their
own but `landed`, for the seal to check; a landed chunk is served only once checked
(landedcheck.py: `verify_landed`, and what a seal that does not match does).

Concurrency contract (trio):
- All state (the chunk states, the sealer's position, the index) changes on the trio thread.
- Threads get an fd, bytes and (under the sealer's lock) its hasher: hashing, pwrite, pread
  and fdatasync run via `trio.to_thread.run_sync(..., limiter=self._limiter)`.
- Several tasks may fetch different chunks at once; the caller guarantees that one chunk has
  at most one writer at a time (single-flight lives in the fetcher).
- A received chunk is readable as soon as it is verified (its reader is served from the buffer
  it was received into) and written behind by `commit_chunk` (writeback.py: the write lock, the
  pending writes, PENDING_LIMIT); a failed write makes it absent again.
- The sealer hashes the chunks strictly in file order, driven from `commit_chunk` (before the
  batched fdatasync, so the buffers kept for it are let go soon) and from `seal`; it waits
  while the mount's readers are served (sealer.py: EARLY_LIMIT, SEALER_PATIENCE).
- What a crash costs is bounded in bytes, not only in time: a chunk takes room in the cache's
  `UnrecordedBudget` (one for all its blobs) just before it enters its blob (write_chunk, after
  `Sealer.room_for`) and gives it back once it is recorded, or leaves the file (its share,
  chunkstate.py). A chunk that finds no room waits, with the fetch holding it (so a reader
  waits for the disk only when the link outruns it by the budget); whoever takes a chunk in
  commits it, and its commit's sync is what makes the room. Each blob's GroupSync syncs at its
  interval, or at once when the budget is pressed, and records every chunk the sync covered in
  the same trio step (`_record_durable`): none is left durable but unrecorded while its commit
  task waits to run.
"""

from __future__ import annotations

import bisect
import logging
import os
import pathlib

import trio

from .chunkbuf import BufferPool, ChunkBuffer, Receiver
from .chunks import Chunk, check_coverage
from .chunkstate import ChunkStates
from .digests import digest_hex
from .errors import ChunkDigestMismatch, SealInterrupted, SealMismatch
from .groupsync import GroupSync, UnrecordedBudget
from .index import ChunkIndex
from .landedcheck import LandedChecks
from .readers import ReaderActivity
from .sealer import Sealer
from .store import fsync_dir
from .units import part_lengths
from .writeback import WriteBack

log = logging.getLogger(__name__)


class PartialBlob:
    def __init__(self, *, digest: str, size: int, chunks: list[Chunk], present: list[int],
                 path: pathlib.Path, final_path: pathlib.Path, index: ChunkIndex,
                 limiter: trio.CapacityLimiter, durable: bool = True, reserve=None,
                 sealed: bool = False, sync_interval: float = 0.5,
                 pool: BufferPool | None = None, hash_thread=None, check_whole: bool = False,
                 unrecorded: UnrecordedBudget | None = None,
                 readers: ReaderActivity | None = None):
        self.digest, self.size = digest, size
        self.chunks = check_coverage(chunks, size)
        # received chunks are checked by the seal alone (module docstring); a pull sets it
        self.check_whole = check_whole and self.has_chunk_digests
        # The cache's budget of unrecorded bytes (shared by its blobs), and every chunk's state
        # with its share of that budget and the generation of its write (chunkstate.py), from
        # `present` as the index has it (ABSENT, VERIFIED or LANDED; or bools).
        self._unrecorded = unrecorded or UnrecordedBudget()
        self._states = ChunkStates([c.length for c in self.chunks], present, self._unrecorded)
        # Queries of those states, as read-only lists: recorded in the index (durable);
        # verified (maybe not written or durable yet); in the file, not verified on its own.
        self.present = self._states.present
        self.readable = self._states.readable
        self.landed = self._states.landed
        self._pool = pool or BufferPool()
        self.path, self.final_path = path, final_path
        self._index = index
        self._limiter = limiter
        self._durable = durable
        # the file and the writes behind to it (writeback.py)
        self._io = WriteBack(digest=digest, chunks=self.chunks,
                             path=final_path if sealed else path, size=size, create=not sealed,
                             pool=self._pool, limiter=limiter, reserve=reserve,
                             written=self._wrote, failed=self._write_failed)
        self._sync_interval = sync_interval
        self._sync = self._group_sync()
        self._sealer = Sealer(digest=digest, chunks=self.chunks, pool=self._pool,
                              limiter=limiter, in_file=self.in_file, load=self.load_chunk,
                              hash_thread=hash_thread, readers=readers)
        # Replaced by a new chunk list, or discarded: its rows in the index are another
        # object's now (or gone), so nothing of it is recorded any more (see retire).
        self._retired = False
        self._landed = LandedChecks(digest=digest, chunks=self.chunks, states=self._states,
                                    sealer=self._sealer, io=self._io, index=index,
                                    pool=self._pool, limiter=limiter,
                                    retired=lambda: self._retired)
        self._starts = [c.start for c in self.chunks]
        self.sealed = sealed

    def _group_sync(self) -> GroupSync:
        return GroupSync(self._io.fd, self._limiter, self._sync_interval, budget=self._unrecorded,
                         on_durable=self._record_durable, writing=self._io.writing)

    @property
    def has_chunk_digests(self) -> bool:
        return all(c.digest is not None for c in self.chunks)

    def missing(self) -> list[int]:
        return [i for i, here in enumerate(self.present) if not here]

    def cached_bytes(self) -> int:
        return sum(c.length for c, here in zip(self.chunks, self.present) if here)

    def close(self) -> None:
        self._sealer.clear_early()
        self._states.uncount_all()  # nobody records them any more
        self._io.close()

    def retire(self) -> None:
        """Replaced or discarded: let go of the memory it holds now (its fds stay open for
        reads in flight and are closed by `close`). Commits still running for it record
        nothing: its chunk indexes would name rows of the new list (a chunk recorded over a
        hole, after a restart). What it counted as unrecorded is given back."""
        self._retired = True
        self._sealer.clear_early()
        self._states.uncount_all()

    def receiver(self, i: int) -> Receiver:
        """A buffer to receive chunk `i` into, hashed by us as it arrives; give it to
        `write_chunk`. The caller holds the buffer's first ref and releases it
        (`release_buffer`)."""
        chunk = self.chunks[i]
        return Receiver(self._pool.take(chunk.length), chunk=chunk,
                        hashed=chunk.digest is not None and not self.check_whole)

    def forget_chunks(self) -> None:
        """No chunk is in the file any more (the caller deals with the file and the index)."""
        self._states.forget_all()

    def ready(self, i: int) -> bool:
        """Chunk `i` was verified: its bytes may be served (from memory until written)."""
        return self._states.is_readable(i)

    def fetched(self, i: int) -> bool:
        """Nothing is left to fetch for chunk `i`: it is verified or, in a blob checked as a
        whole (a pull), it landed for the seal to check."""
        return self._states.is_readable(i) or (self.check_whole and self._states.is_landed(i))

    def all_ready(self, indexes) -> bool:
        is_readable = self._states.is_readable
        return all(is_readable(i) for i in indexes)

    def in_file(self, i: int) -> bool:
        """Chunk `i`'s bytes are in the file (or on their way there), verified or landed."""
        return self._states.in_file(i)

    async def verify_landed(self, i: int) -> ChunkBuffer | None:
        """Landed chunk `i` read back and checked against its own digest. If it matches it is
        readable from now on and its bytes are returned (the caller releases the buffer);
        if not, it is absent again (fetch it) and None is returned; None as well when it is
        not (or no longer) a landed chunk."""
        if not self.landed[i] or self.check_whole or self.chunks[i].digest is None:
            return None
        return await self._landed.verify(i)

    async def load_chunk(self, i: int) -> ChunkBuffer:
        """Chunk `i` read back from the file into a buffer (the caller releases it). The
        caller has made sure it is in the file (`in_file`) and pinned."""
        return await self._io.load(i)

    def hurry(self) -> None:
        """The last chunk of this run was written: make the waiting ones durable now."""
        self._sync.hurry()

    def release_buffer(self, buf: ChunkBuffer) -> None:
        self._pool.release(buf)

    async def write_chunk(self, i: int, received: Receiver) -> bool:
        """Verify chunk `i`, received into `received` (a filled `Receiver` from `receiver(i)`,
        hashed by us as it arrived); from then on it may be read (it is `readable`), though it
        is not written, durable or recorded yet: `commit_chunk` writes it behind, with direct
        I/O, and records it. The caller serves it from its buffer meanwhile; file reads of it
        wait for the write. False if it was there already."""
        chunk = self.chunks[i]
        if received.filled != chunk.length:
            raise ChunkDigestMismatch(f"chunk {i} of {self.digest[:19]}: got {received.filled} "
                                      f"bytes, expected {chunk.length}")
        unchecked = self.check_whole  # the seal checks it (a pull)
        actual = received.digest()
        if actual != chunk.digest and not unchecked:
            what = "its digest" if chunk.parts is None else \
                f"the digests of its {len(part_lengths(chunk))} registry chunks"
            raise ChunkDigestMismatch(
                f"chunk {i} ({chunk.start}-{chunk.end - 1}) of {self.digest[:19]}...: "
                f"sha256 {actual[7:19]}... does not match {what}")
        if self.landed[i] and not unchecked:
            self._landed.unland(i)  # checked bytes take the place of the unchecked ones
        if self.in_file(i):
            return False  # (checked all the same: the caller may serve what it fetched)
        # Write behind: readable now (the caller serves it from its buffer), written to the
        # file by `commit_chunk`, off the readers' path. (Unchecked: landed, for the sealer
        # only.)
        length = chunk.length
        await self._sealer.room_for(i, lambda: self._io.full(length))
        if self.in_file(i):
            return False
        # (after room_for: chunks waiting there are not committable, so they must not hold
        # the room that the ones they wait for need)
        await self._unrecorded.admit(length)
        if self.in_file(i):
            self._unrecorded.settle(length)
            return False
        if unchecked:
            self._states.landed_pending(i, share=length)
        else:
            self._states.verified_pending(i, share=length)
        self._io.put(i, received.buf)
        self._sealer.keep(i, received.buf)
        return True

    def _wrote(self, i: int) -> None:
        """Chunk `i`'s write behind is done: the next group sync covers it."""
        self._states.written(i, self._sync.wrote())
        self._sealer.wake()

    def _write_failed(self, i: int) -> None:
        """Chunk `i`'s write behind failed: it is not readable any more, and is fetched (and
        kept for the sealer) again when wanted."""
        unchecked = self.landed[i] or self.chunks[i].digest is None
        self._states.write_failed(i)  # (and out of the budget)
        self._sync.write_ended()
        self._sealer.drop_early(i)
        if unchecked:
            self._sealer.forget_hashed(i)
        self._sealer.wake()

    async def commit_chunk(self, i: int) -> None:
        """Make chunk `i` durable (an fdatasync shared with the chunks around it) and record it
        in the index (invariant 2: recorded only once durable). Whoever had `write_chunk` take
        a chunk in calls this for it: until then it holds room in the unrecorded budget that
        other chunks may be waiting for."""
        if self.present[i]:
            return
        try:
            await self._io.finish(i)
            if not self._sealer.locked():
                # Catch the sealer up on the chunks written so far, from memory when it kept
                # them. Here, not in write_chunk: readers waiting for a chunk never wait for
                # this; and before the fdatasync, so the bytes kept for it are let go soon.
                # Whoever holds the lock re-checks `readable` after each await, so nothing is
                # missed.
                await self._sealer.advance()
            while self._durable and not self.present[i]:
                generation = self._states.generation(i)
                await self._sync.wait_durable(generation)  # records it (_record_durable)
                if self._states.generation(i) == generation:
                    break  # (else it was evicted and written again meanwhile: wait for that)
        except Exception:
            # A failed write, sealer read or sync: nobody may come back to record this chunk
            # (it is recorded if a later sync of the blob covers it), so the chunks waiting for
            # room do not wait for it. (Not on cancellation: a caller that gives up, like a
            # reader at its deadline, leaves the chunk to the commit task that owns it.)
            self._states.uncount(i)
            raise
        if self.present[i] or not self.in_file(i) or self._states.is_pending(i):
            # recorded with its sync; or evicted while it waited to be durable: nothing to
            # record (and if it came back since, its new bytes are not written yet: their own
            # commit records them)
            return
        self._record([i])

    def _record_durable(self, generation: int) -> None:
        """Called by the group sync right after a sync that covered writes up to `generation`,
        in the same trio step: every chunk it made durable is recorded at once, in one
        transaction, so none is left durable but unrecorded (fetched again after a crash)
        while its commit task waits its turn to run."""
        # (if the record fails they stay WRITTEN: the next sync records them)
        self._record(self._states.written_upto(generation))

    def _record(self, indexes: list[int]) -> None:
        """Record chunks whose bytes are durable in the file (WRITTEN) as present, out of the
        unrecorded budget."""
        for verified in (True, False) if not self._retired else ():
            these = [i for i in indexes if self.landed[i] != verified]
            if these:
                self._index.mark_present(self.digest, these, verified=verified)
        for i in indexes:
            self._states.recorded(i)

    async def read(self, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) from the file. The caller has made sure every chunk
        they touch is readable (verified, maybe not written or durable yet) and pinned."""
        return await self._io.read(offset, size, self.chunk_range(offset, size))

    def chunk_range(self, offset: int, size: int) -> range:
        """Indexes of the chunks that cover [offset, offset+size)."""
        starts = self._starts
        first = bisect.bisect_right(starts, offset) - 1
        last = bisect.bisect_right(starts, offset + size - 1) - 1
        return range(max(first, 0), last + 1)

    @property
    def seal_progress(self) -> int:
        """Chunks in the sealer's hash so far (a mark of progress for readers waiting on the
        seal of a blob without chunk digests)."""
        return self._sealer.position

    @property
    def sealing(self) -> bool:
        """Being sealed right now (nothing of it may be evicted or dropped)."""
        return self._sealer.sealing

    @property
    def complete(self) -> bool:
        return self._states.complete()

    async def seal(self) -> pathlib.Path:
        """Check the whole blob against its digest and move it into `blobs/`.

        On a mismatch the partial file and its index rows are discarded (the chunk list is not
        trusted any more) and SealMismatch is raised.
        """
        if not self.complete:
            raise RuntimeError("seal() called with chunks missing")
        self._sealer.sealing = True  # no chunk is evicted from under the seal (evict_chunk
        # refuses), and the sealer does not pause for readers
        try:
            return await self._seal()
        finally:
            self._sealer.sealing = False

    async def _seal(self) -> pathlib.Path:
        await self._sealer.advance()
        if self._sealer.position < len(self.chunks) or not self.complete:
            # a reader dropped a corrupt landed chunk meanwhile (verify_landed)
            raise SealInterrupted(f"blob {self.digest[:19]} lost a chunk while being sealed; "
                                  f"sealed once it is complete again")
        actual = self._sealer.hexdigest()
        if actual != self.digest and any(self.landed):
            self.check_whole = False  # from now on every chunk is checked on its own
            await self._landed.check_all(actual)  # raises, unless none is corrupt
        if actual != self.digest:
            log.error("SEAL MISMATCH for blob %s: every chunk verified, but the blob hashes to %s. "
                      "The chunk list was wrong; discarding the partial blob.",
                      self.digest, actual)
            await self.discard()
            raise SealMismatch(f"blob {self.digest} failed its seal: whole-file sha256 is "
                               f"{actual}; the cached copy was discarded")
        if self._durable:
            await trio.to_thread.run_sync(os.fsync, self._io.fd, limiter=self._limiter)
        if not self.complete:
            raise RuntimeError(f"blob {self.digest[:19]} lost a chunk while being sealed")
        landed = [i for i, here in enumerate(self.landed) if here]
        if landed:
            self._landed.mark_verified(landed)  # by the whole blob's digest
        os.chmod(self.path, 0o644)
        os.replace(self.path, self.final_path)
        st = os.fstat(self._io.fd)
        self._index.record_sealed(self.digest, self.size, st.st_mtime_ns, st.st_ino)
        if self._durable:
            await trio.to_thread.run_sync(fsync_dir, self.final_path.parent, limiter=self._limiter)
        # The fd stays open (it now names the sealed file): reads already in flight in threads
        # keep a valid descriptor. Whoever opened the blob closes it through BlobCache.release.
        # The chunk rows stay: eviction needs the chunk boundaries of sealed blobs too.
        self.sealed = True
        log.info("sealed %s (%d bytes)", self.digest, self.size)
        return self.final_path

    def unseal(self) -> None:
        """Move a sealed blob back to the in-progress state, before it loses a chunk (`blobs/`
        only ever holds complete blobs). The fd keeps naming the same file."""
        if not self.sealed:
            return
        try:
            os.replace(self.final_path, self.path)
        except FileNotFoundError:  # removed behind our back: nothing of it is on disk
            log.warning("sealed blob %s is gone from blobs/", self.digest[:19])
            self.forget_chunks()
            self._index.mark_absent(self.digest, list(range(len(self.chunks))))
            self._io.reopen(self.path)
            self._sync = self._group_sync()
        self._index.forget_sealed(self.digest)
        self.sealed = False
        self._sealer.restart()  # read again when it is complete again

    async def evict_chunk(self, i: int) -> int:
        """Give chunk `i`'s disk space back (punch a hole); it is fetched again when needed.
        The caller makes sure nobody is reading it. Returns the bytes freed."""
        chunk = self.chunks[i]
        if self.sealing or self._states.is_pending(i) or self._sealer.may_be_reading(i):
            return 0  # being sealed, not in the file yet, or being read back by the sealer
        if self.sealed:
            self.unseal()
        if not self.in_file(i):
            return 0
        unchecked = chunk.digest is None or self.landed[i]
        self._states.evicted(i)  # (and out of the budget: a crash would not make us fetch
        # it again now, it is gone)
        self._sealer.drop_early(i)
        if unchecked:
            # the sealer took in bytes never checked on their own, and the next ones may
            # differ: it must hash the chunk again
            self._sealer.forget_hashed(i)
        self._index.mark_absent(self.digest, [i])  # durable before the hole (index.py)
        await self._io.punch(i)
        return chunk.length

    async def discard(self) -> None:
        """Drop every byte and the index rows (the fd stays open for reads in flight)."""
        self._index.forget(self.digest)
        self.forget_chunks()
        self._sealer.clear_early()
        await trio.to_thread.run_sync(_unlink_quietly, self.path, limiter=self._limiter)


def _unlink_quietly(path: pathlib.Path) -> None:
    path.unlink(missing_ok=True)


def partial_name(digest: str) -> str:
    return "sha256-" + digest_hex(digest) + ".partial"
