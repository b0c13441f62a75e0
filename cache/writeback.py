"""The file of a blob being materialized: its descriptors, the writes behind, reads and holes.

Write behind: a received chunk is readable as soon as it is verified (its reader is served from
the buffer it was received into) and written to the file later (`finish`, which the blob's
`commit_chunk` calls), from its page-aligned buffer with O_DIRECT, so the cache file's page cache
is not filled and no reader waits for the disk. `read`, `load` (direct too) and so the sealer
wait for a pending write of the chunks they touch (doing it if nobody is yet); eviction skips a
chunk whose write is pending; and at most PENDING_LIMIT bytes per blob wait to be written (a
receiver beyond it waits, `full`). A pending write holds a ref of its buffer until it is done.
A failed write is reported (`failed`): the chunk is unreadable again and fetched again when
wanted.

One writer per file (`lock`), from the budget's reservation to the end of the write:
concurrent pwrites would only contend; the room a reservation finds free (--min-free reads
statvfs) must not be taken by another write before this one lands; and on a full disk (ENOSPC)
a writer that is not alone takes the room another one's eviction just freed, so the write is
tried once more under the lock after the budget freed room for it, and its range is punched if
that fails too (CacheFull). The blob punches the holes of corrupt landed chunks under the same
lock (`LandedChecks.drop`, landedcheck.py), so no hole lands on a chunk fetched again meanwhile.

Where a filesystem refuses direct I/O (tmpfs), the first refused write turns it off for the
file: the ordinary fd is used from then on (directio.py).

Concurrency contract (trio): the pending writes change on the trio thread; threads get an fd and
a buffer: pwrite, pread and punch_hole run via `trio.to_thread.run_sync(..., limiter=...)`.
Replaced fds (a lost file opened again, `reopen`) stay open until `close`: a thread may still
use them.
"""

from __future__ import annotations

import errno
import logging
import os
import pathlib
from typing import Awaitable, Callable

import trio

from .buffers import punch_hole
from .chunkbuf import BufferPool, ChunkBuffer
from .chunks import Chunk
from .directio import load, open_direct, write_received
from .errors import CacheFull

log = logging.getLogger(__name__)

# Bytes of received chunks verified but not yet written, per blob; a receiver waits beyond it.
PENDING_LIMIT = 64 << 20


def pread_exact(fd: int, length: int, offset: int) -> bytes:
    parts, want = [], length
    while want:
        piece = os.pread(fd, want, offset)
        if not piece:
            raise EOFError(f"unexpected end of cache file at offset {offset}")
        parts.append(piece)
        want -= len(piece)
        offset += len(piece)
    return parts[0] if len(parts) == 1 else b"".join(parts)


class _PendingWrite:
    __slots__ = ("buf", "done", "started")

    def __init__(self, buf: ChunkBuffer):
        self.buf, self.done, self.started = buf, trio.Event(), False


class WriteBack:
    """The file at `path` (of `size` bytes, created if need be) and the writes behind to it.
    `reserve(bytes[, disk_full=True])` makes room under the cache's cap before a write (None:
    no cap); `written(i)` / `failed(i)` are told, in the same trio step, how each write behind
    ended."""

    def __init__(self, *, digest: str, chunks: list[Chunk], path: pathlib.Path, size: int,
                 create: bool, pool: BufferPool, limiter: trio.CapacityLimiter,
                 reserve: Callable[..., Awaitable[None]] | None,
                 written: Callable[[int], None], failed: Callable[[int], None]):
        self._digest, self._chunks, self._size = digest, chunks, size
        self._pool, self._limiter, self._reserve = pool, limiter, reserve
        self._on_written, self._on_failed = written, failed
        self.path = path
        # (a sealed blob must exist: never create an empty one in blobs/)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644) if create else \
            os.open(path, os.O_RDWR)
        if os.fstat(self._fd).st_size != size:
            os.ftruncate(self._fd, size)
        self._dfd = open_direct(path)
        self._direct = self._dfd >= 0  # False once the filesystem refused a direct write
        self._old_fds: list[int] = []  # replaced, closed with the blob (threads may hold them)
        self.lock = trio.Lock()
        # Received chunks verified and readable (from memory) whose write to the file is still
        # to come; file reads of them wait for it.
        self._pending: dict[int, _PendingWrite] = {}
        self._pending_bytes = 0

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def direct(self) -> bool:
        """Writes and loads go through O_DIRECT (the filesystem has it, and never refused)."""
        return self._direct

    @property
    def _direct_fd(self) -> int:
        return self._dfd if self._direct else -1

    def reopen(self, path: pathlib.Path) -> None:
        """The file is gone: an empty one (all holes) at `path` from now on."""
        self._old_fds += [self._fd, self._dfd]  # threads may still hold them
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self._fd, self._size)
        self._dfd = open_direct(path)
        self._direct = self._dfd >= 0

    def close(self) -> None:
        for fd in (self._fd, self._dfd, *self._old_fds):
            if fd >= 0:
                os.close(fd)
        self._fd = self._dfd = -1
        self._old_fds.clear()

    # -- writes behind ---------------------------------------------------------------------------

    def writing(self) -> int:
        """How many chunks taken in wait for their write behind (or are being written)."""
        return len(self._pending)

    def full(self, length: int) -> bool:
        """Whether a receiver of `length` more bytes must wait for pending writes."""
        return bool(self._pending) and self._pending_bytes + length > PENDING_LIMIT

    def put(self, i: int, buf: ChunkBuffer) -> None:
        """Chunk `i` is to be written from `buf` (a ref of it is held until then)."""
        assert i not in self._pending, f"chunk {i} of {self._digest[:19]}: written behind twice"
        self._pending[i] = _PendingWrite(self._pool.hold(buf))
        self._pending_bytes += self._chunks[i].length

    async def finish(self, i: int) -> None:
        """Write chunk `i` to the file if it is still pending (or wait for whoever is)."""
        pending = self._pending.get(i)
        if pending is None:
            return
        if pending.started:
            await pending.done.wait()
            return
        pending.started = True
        try:
            await self._write(i, pending.buf)
        except BaseException:
            self._end(i, pending)
            self._on_failed(i)
            raise
        self._end(i, pending)
        self._on_written(i)

    def _end(self, i: int, pending: _PendingWrite) -> None:
        del self._pending[i]
        self._pending_bytes -= self._chunks[i].length
        pending.done.set()
        self._pool.release(pending.buf)

    async def wait_written(self, indexes) -> None:
        """Wait until the chunks in `indexes` are in the file, not only readable from memory."""
        for i in indexes:
            await self.finish(i)

    async def _write(self, i: int, buf: ChunkBuffer) -> None:
        chunk = self._chunks[i]
        async with self.lock:
            if self._reserve is not None:
                await self._reserve(chunk.length)
            try:
                await self._write_once(chunk, buf)
            except OSError as exc:
                if exc.errno != errno.ENOSPC or self._reserve is None:
                    raise
                await self._after_enospc(i, buf)

    async def _after_enospc(self, i: int, buf: ChunkBuffer) -> None:
        """The disk filled up under us: free some of the cache and try once more (under the
        write lock: another writer would take the room just freed)."""
        chunk = self._chunks[i]
        await self._reserve(chunk.length, disk_full=True)
        try:
            await self._write_once(chunk, buf)
        except OSError as again:
            await self._punch(chunk)
            raise CacheFull(f"no room on disk for chunk {i} of {self._digest[:19]} "
                            f"({again.strerror})") from again

    async def _write_once(self, chunk: Chunk, buf: ChunkBuffer) -> None:
        # a page-aligned chunk buffer: direct I/O (the page cache where it is refused)
        if not await trio.to_thread.run_sync(write_received, self._direct_fd, self._fd,
                                             buf.view, chunk.start, limiter=self._limiter):
            # (not closed: a load thread may be using it; closed with the blob)
            log.info("direct I/O refused on %s; writing through the page cache", self.path)
            self._direct = False

    # -- reads and holes ---------------------------------------------------------------------------

    async def read(self, offset: int, size: int, indexes) -> bytes:
        """Bytes [offset, offset+size) of the file, once the chunks `indexes` (the ones they
        touch) are written."""
        await self.wait_written(indexes)
        return await trio.to_thread.run_sync(pread_exact, self._fd, size, offset,
                                             limiter=self._limiter)

    async def load(self, i: int) -> ChunkBuffer:
        """Chunk `i` read back from the file into a buffer (the caller releases it), once it is
        written."""
        chunk = self._chunks[i]
        await self.finish(i)
        return await load(self._pool, self._limiter, self._direct_fd, self._fd, chunk.start,
                          chunk.length)

    async def punch(self, i: int) -> None:
        """Give chunk `i`'s disk blocks back (a hole: it reads as zeros)."""
        await self._punch(self._chunks[i])

    async def _punch(self, chunk: Chunk) -> None:
        await trio.to_thread.run_sync(punch_hole, self._fd, chunk.start, chunk.length,
                                      limiter=self._limiter)
