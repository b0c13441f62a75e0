"""Chunk buffers kept in memory for the readers about to want them: the mount's memory
cache, bounded in bytes, and the `Keeper` that fills it.

Concurrency contract: trio thread only. The cache holds a ref on each buffer it keeps
(cache/chunkbuf.py) and gives it back when it drops one; a reader that is handed a buffer
from `get` uses it in the same trio step or takes a ref of its own.
"""

from __future__ import annotations

import collections
import logging

import trio

from modelfs.cache.chunkbuf import BufferPool, ChunkBuffer
from modelfs.cache.partial import PartialBlob

log = logging.getLogger(__name__)


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


class Keeper:
    """What the mount keeps in memory for its readers: a `MemoryCache` of chunk buffers,
    filled from fetches (`keep`) or read back from the disk once however many reads want the
    same bytes (`load`), and optionally pushed into the kernel's page cache as they are kept
    (`publish`, called as a task of `nursery` with (blob digest, offset, buffer); the buffer
    is held for the call: fs/pagecache.py copies it from a worker thread).

    Concurrency contract: trio thread only; the pushes are tasks of the mount's nursery, each
    holding a ref on its buffer until it returns."""

    def __init__(self, memory: MemoryCache, pool: BufferPool, nursery, publish=None):
        self.memory, self._pool, self._nursery = memory, pool, nursery
        self._publish_to = publish
        self._loading: dict[tuple, trio.Event] = {}  # keys being read back
        self.loads = 0  # loads from the disk (statistics)

    def get(self, key):
        return self.memory.get(key)

    def loading(self, key) -> bool:
        return key in self._loading

    def keep(self, key: tuple[str, int, int], buf: ChunkBuffer, publish: bool) -> None:
        """Keep `buf` (the bytes of `key`) for the readers about to want it; with `publish`
        also push it into the kernel's page cache."""
        self.memory.put(key, buf)
        if publish and self._publish_to is not None:
            self._nursery.start_soon(self._publish, key[0], key[1], self._pool.hold(buf))

    async def _publish(self, digest: str, start: int, buf: ChunkBuffer) -> None:
        try:
            await self._publish_to(digest, start, buf)
        except Exception as exc:  # an optimisation: readers get the bytes anyway
            log.debug("publishing %s at %d failed: %s", digest[:19], start, exc)
        finally:
            self._pool.release(buf)

    async def load(self, key: tuple[str, int, int], load, still_wanted, publish=False):
        """The bytes of `key` from the disk (`await load()`, a buffer we release), once
        however many reads want them; kept if `still_wanted()` after the load (the blob was
        not reset meanwhile). The kept buffer, or None when the memory cache could not keep
        it."""
        while (loading := self._loading.get(key)) is not None:
            await loading.wait()
            data = self.memory.get(key)
            if data is not None:
                return data
        self._loading[key] = done = trio.Event()
        try:
            self.loads += 1
            buf = await load()
            if still_wanted():
                self.keep(key, buf, publish)
            self._pool.release(buf)
            return self.memory.get(key)
        finally:
            del self._loading[key]
            done.set()
