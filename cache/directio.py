"""Blob file I/O around the page cache: O_DIRECT from and into page-aligned chunk buffers.

Why: the bytes of a blob are served into the mount's own page cache (FUSE); going through the
cache file's page cache as well would hold a model in memory twice, and on a VM each fresh
page-cache page costs more than the copy into it. Where a filesystem refuses direct I/O
(tmpfs), or for the tail of a file that is not whole pages, the ordinary fd is used.
"""

from __future__ import annotations

import errno
import os

import trio

from .buffers import pwrite_all
from .chunkbuf import PAGE, BufferPool, ChunkBuffer


def open_direct(path, flags: int = os.O_RDWR) -> int:
    """An O_DIRECT descriptor of `path`, or -1 where the filesystem has no direct I/O."""
    try:
        return os.open(path, flags | os.O_DIRECT)
    except (OSError, AttributeError):
        return -1


def direct_part(dfd: int, n: int, offset: int) -> int:
    """How many of `n` bytes at `offset` can go through O_DIRECT (whole pages from a page
    boundary, when there is a direct fd); the rest goes through the page cache."""
    return n - n % PAGE if dfd >= 0 and offset % PAGE == 0 else 0


def write_received(dfd: int, fd: int, view, offset: int) -> bool:
    """Write a received chunk: its page-aligned part with O_DIRECT from the aligned buffer,
    the rest through the page cache. False if direct I/O was refused (then all of it went
    buffered)."""
    n = len(view)
    head = direct_part(dfd, n, offset)
    if head:
        try:
            pwrite_all(dfd, view[:head], offset)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            pwrite_all(fd, view, offset)
            return False
    if head < n:
        pwrite_all(fd, view[head:], offset + head)
    return True


def read_into(dfd: int, fd: int, view, offset: int) -> None:
    """Fill `view` (page-aligned) from the file at `offset`: the page-aligned part with
    O_DIRECT (the disk's DMA, no page-cache pages), the rest through the page cache."""
    n = len(view)
    head = direct_part(dfd, n, offset)
    done = 0
    while done < n:
        use = dfd if done < head else fd
        want = (head if done < head else n) - done
        try:
            got = os.preadv(use, [view[done:done + want]], offset + done)
        except OSError as exc:
            if use != dfd or exc.errno != errno.EINVAL:
                raise
            head = 0  # direct I/O refused: the rest through the page cache
            continue
        if got <= 0:
            raise EOFError(f"unexpected end of cache file at offset {offset + done}")
        done += got


async def load(pool: BufferPool, limiter: trio.CapacityLimiter, dfd: int, fd: int, start: int,
               length: int) -> ChunkBuffer:
    """Bytes [start, start + length) of the file in a pooled buffer the caller releases,
    read in one of the cache's I/O threads (`read_into`)."""
    buf = pool.take(length)
    try:
        await trio.to_thread.run_sync(read_into, dfd, fd, buf.view, start, limiter=limiter)
    except BaseException:
        buf.abandon()  # (a cancelled thread may still be reading into it)
        pool.release(buf)
        raise
    return buf
