"""Chunk buffers kept in memory for the readers about to want them: the materializer's
memory cache, bounded in bytes.

Concurrency contract: trio thread only. The cache holds a ref on each buffer it keeps
(cache/chunkbuf.py) and gives it back when it drops one; a reader that is handed a buffer
from `get` uses it in the same trio step or takes a ref of its own.
"""

from __future__ import annotations

import collections

from modelfs.cache.chunkbuf import BufferPool, ChunkBuffer
from modelfs.cache.partial import PartialBlob


def memory_key(blob: PartialBlob, i: int) -> tuple[str, int, int]:
    """A chunk's key in the memory cache: its byte range, not its index, so an entry put
    under an older chunk list can never answer for another range."""
    chunk = blob.chunks[i]
    return blob.digest, chunk.start, chunk.length


class MemoryCache:
    """Recently fetched chunk buffers, oldest out first, at most `limit` bytes of them.
    Holds a ref on each (cache/chunkbuf.py) and gives it back when it drops one."""

    def __init__(self, limit: int, pool: BufferPool):
        self.limit, self.size = limit, 0
        self._pool = pool
        self._items: collections.OrderedDict[tuple, ChunkBuffer] = collections.OrderedDict()

    def _let_go(self, buf: ChunkBuffer) -> None:
        self.size -= buf.capacity
        self._pool.release(buf)

    def get(self, key):
        # No refresh on use: first in, first out. Chunks are put just ahead of their readers;
        # by the time one is read, the chunks after it are in too, and under LRU they, not yet
        # read, would be the first to go.
        return self._items.get(key)

    def put(self, key, buf: ChunkBuffer) -> None:
        if buf.capacity > self.limit or key in self._items:
            return
        self._items[key] = self._pool.hold(buf)
        self.size += buf.capacity
        while self.size > self.limit:
            self._let_go(self._items.popitem(last=False)[1])

    def drop(self, digest: str) -> None:
        for key in [k for k in self._items if k[0] == digest]:
            self._let_go(self._items.pop(key))

    def clear(self) -> None:
        while self._items:
            self._let_go(self._items.popitem()[1])
