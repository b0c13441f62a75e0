"""The disk budget of a cache: `--cache-max` (bytes of chunks on disk) and `--min-free` (bytes
the filesystem must keep free). Before a chunk is written, `reserve` evicts least recently used
chunks until it fits; eviction punches holes in sparse files, chunk by chunk, and a sealed blob
that loses a chunk goes back to the in-progress state first (`blobs/` only holds complete
blobs). An evicted chunk is simply fetched again when it is read.

Pins protect what is being read or pulled right now: a pinned chunk (or every chunk of a pinned
blob) is never evicted from under its reader; a cap smaller than what is pinned is exceeded,
with a warning, rather than breaking a read.

Recency: reads call `touch`, kept in memory and written to the index in batches (before each
eviction round and when asked), so the index orders victims by last use across restarts too.

Concurrency contract: trio thread only. `reserve` holds `_lock` across its awaits (the hole
punching runs in a thread), so two writers never evict for the same room twice.
"""

from __future__ import annotations

import collections
import logging
import os
import sqlite3
import time

import trio

from .errors import CacheFull

log = logging.getLogger(__name__)

SPARE_BYTES = 1 << 20


class DiskBudget:
    def __init__(self, cache, *, cap: int | None = None, min_free: int | None = None):
        self._cache = cache
        self.cap, self.min_free = cap, min_free
        self.used = cache.index.usage()
        self.evicted_bytes = 0
        self._pins: collections.Counter = collections.Counter()
        self._touched: dict[tuple[str, int], float] = {}
        self._lock = trio.Lock()
        self._warned = False
        cache.index.set_meta("cache_max", str(cap) if cap is not None else "")
        # Eviction writes to the index before it punches (a crash must never leave a chunk
        # recorded over a hole), and on a full disk that write itself fails. A small file of
        # allocated blocks, given back when the disk fills, leaves room for it.
        self._spare = cache.root / "spare"
        self._make_spare()

    # -- pins and recency ----------------------------------------------------------------------

    def pin(self, digest: str, indexes=None) -> None:
        for key in ([(digest, None)] if indexes is None else [(digest, i) for i in indexes]):
            self._pins[key] += 1

    def unpin(self, digest: str, indexes=None) -> None:
        for key in ([(digest, None)] if indexes is None else [(digest, i) for i in indexes]):
            self._pins[key] -= 1
            if self._pins[key] <= 0:
                del self._pins[key]

    def pinned(self, digest: str, index: int) -> bool:
        return (digest, None) in self._pins or (digest, index) in self._pins

    def touch(self, digest: str, indexes) -> None:
        now = time.time()
        for i in indexes:
            self._touched[(digest, i)] = now

    def flush(self) -> None:
        if self._touched:
            self._cache.index.touch([(t, d, i) for (d, i), t in self._touched.items()])
            self._touched.clear()

    async def resync(self) -> None:
        """Recount `used` from the index and the chunks written but not yet recorded (under
        the lock: not while an eviction round is half counted)."""
        async with self._lock:
            self._resync()

    def _resync(self) -> None:
        pending = sum(c.length for blob in self._cache.open_blobs()
                      for i, (c, present) in enumerate(zip(blob.chunks, blob.present))
                      if blob.in_file(i) and not present)
        self.used = self._cache.index.usage() + pending

    # -- room ---------------------------------------------------------------------------------

    def _free_bytes(self) -> int:
        st = os.statvfs(self._cache.root)
        return st.f_bavail * st.f_frsize

    def _short_of(self, need: int) -> int:
        """How many bytes must go before `need` more fit."""
        short = 0
        if self.cap is not None:
            short = max(short, self.used + need - self.cap)
        if self.min_free is not None:
            short = max(short, self.min_free + need - self._free_bytes())
        return short

    def _make_spare(self) -> None:
        try:
            fd = os.open(self._spare, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, SPARE_BYTES)
            finally:
                os.close(fd)
        except OSError as exc:
            log.info("no spare room for the index on a full disk (%s)", exc.strerror)

    async def reserve(self, need: int, *, disk_full: bool = False) -> None:
        """Make room for `need` bytes about to be written (and count them as used, unless
        `disk_full`: the write that hit ENOSPC reserved them already and is tried again)."""
        async with self._lock:
            short = max(self._short_of(need), need if disk_full else 0)
            if disk_full and self._spare.exists():
                os.truncate(self._spare, 0)
            if short > 0:
                try:
                    freed = await self._evict(short)
                except sqlite3.Error as exc:  # the index could not be written either
                    raise CacheFull(f"cannot evict to make room: {exc}") from exc
                finally:
                    if disk_full:
                        self._make_spare()
                if freed < short and not self._warned:
                    self._warned = True
                    log.warning("cache over its budget by %d bytes: what is left is being read "
                                "right now", short - freed)
            if not disk_full:  # (a retry after ENOSPC: its bytes were counted the first time)
                self.used += need

    async def _evict(self, want: int) -> int:
        self.flush()
        freed, seen = 0, set()
        while freed < want:
            batch = [v for v in self._cache.index.victims(256 + len(seen))
                     if (v[0], v[1]) not in seen]
            if not batch:
                break
            progressed = False
            for digest, index, length in batch:
                seen.add((digest, index))
                if self.pinned(digest, index):
                    continue
                blob = self._cache.unseal_for_eviction(digest)
                if blob is None or blob.sealing:
                    continue
                if not blob.has_chunk_digests and blob.complete:
                    # adopted whole, without the registry's chunk list: a hole would leave
                    # it unverifiable, so it goes whole (it is fetched again under the list)
                    got = await self._cache.drop_whole(blob)
                else:
                    got = await blob.evict_chunk(index)
                freed += got
                self.used -= got
                self.evicted_bytes += got
                progressed = True
                if freed >= want:
                    break
            if not progressed:
                break
        if freed < want:
            # Chunks written but not yet recorded (their fdatasync is batched) are on disk too
            # and not in the index's list: they go next, in file order.
            for blob in list(self._cache.open_blobs()):
                for index in range(len(blob.chunks)):
                    if freed >= want:
                        break
                    if blob.in_file(index) and not blob.present[index] \
                            and not self.pinned(blob.digest, index):
                        got = await blob.evict_chunk(index)
                        freed += got
                        self.used -= got
                        self.evicted_bytes += got
        if freed:
            log.info("evicted %d bytes of least recently used chunks", freed)
        return freed
