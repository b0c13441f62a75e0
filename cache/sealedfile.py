"""A sealed blob opened for reading without the page cache (see cache/directio.py for why).

`load(start, length)` reads a stretch into a pooled, page-aligned buffer with O_DIRECT; the
caller keeps it (the mount's memory cache) and serves slices of it. `read(offset, size)` is for
reads that are not part of a stream: only the pages under them, copied out.

Concurrency contract: called from the trio thread; the preads run in the cache's I/O threads
(`limiter`). The owner closes the file only when no load is running (the mount pins a blob while
it reads from it, and the budget does not unseal a pinned blob).
"""

from __future__ import annotations

import os

import trio

from .chunkbuf import PAGE, BufferPool, ChunkBuffer
from .directio import load, open_direct


class SealedFile:
    def __init__(self, path, size: int, pool: BufferPool, limiter: trio.CapacityLimiter):
        self.size = size
        self._fd = os.open(path, os.O_RDONLY)
        self._dfd = open_direct(path, os.O_RDONLY)
        self._pool, self._limiter = pool, limiter

    def close(self) -> None:
        for fd in (self._dfd, self._fd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._dfd = -1

    async def load(self, start: int, length: int) -> ChunkBuffer:
        """Bytes [start, start + length) in a buffer the caller releases (`start` page
        aligned, the range within the file)."""
        return await load(self._pool, self._limiter, self._dfd, self._fd, start, length)

    async def read(self, offset: int, size: int) -> bytes:
        """Bytes [offset, offset + size), clamped at the end of the file."""
        size = max(0, min(size, self.size - offset))
        if size == 0:
            return b""
        start = offset - offset % PAGE
        end = min(-(-(offset + size) // PAGE) * PAGE, self.size)
        buf = await self.load(start, end - start)
        try:
            return bytes(buf.view[offset - start:offset - start + size])
        finally:
            self._pool.release(buf)
