"""Reads of sealed blobs, for the mount.

Sealed blobs are read with direct I/O (cache/sealedfile.py), never through the cache file's
page cache: the mount's own page cache holds the bytes once. A reader in sequence gets slices
of SEALED_STRETCH stretches kept in the memory cache (fetcher/memcache.py `Keeper`); tasks of
the mount's nursery load the next ones (up to SEALED_LEAD ahead; one task per stretch,
`_stretching`; at most STRETCHES_AHEAD loading at once, so memory stays bounded whatever the
number of readers) and push them into the kernel's page cache, which then answers the reader
itself (so a stretch's chunks are marked as used when it is loaded). Measured on a 2 GiB warm
read: 3.4–3.9 s before stretches, 1.6–1.8 s after (`scripts/bench --cases 3`), with 1.8
instead of 4.5 CPU seconds.

Concurrency contract: trio thread only. A read, and each stretch task, pins the blob in the
disk budget: it is not unsealed (its file closed) under them. The cache owns the sealed file
(`BlobCache.open_sealed`); what is kept here per blob (where the stretches ahead end, the
chunk starts for recency) is keyed by that file object, so a blob sealed again (maybe with
another chunk list) starts afresh.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging

import trio

from modelfs.cache.blobcache import BlobCache
from modelfs.cache.sealedfile import SealedFile

from .memcache import Keeper

log = logging.getLogger(__name__)

# A sealed blob read in sequence is loaded in stretches of this size (direct I/O, kept in the
# memory cache and pushed into the kernel's page cache), up to SEALED_LEAD bytes ahead.
SEALED_STRETCH = 8 << 20
SEALED_LEAD = 32 << 20
STRETCHES_AHEAD = 2  # stretch loads ahead of readers at a time, all blobs together


def stretch_starts(begin: int, end: int, size: int) -> range:
    """Starts of the SEALED_STRETCH-aligned stretches under [begin, end) of a blob of `size`."""
    end = min(end, size)
    if end <= begin:
        return range(0)
    return range(begin - begin % SEALED_STRETCH, end, SEALED_STRETCH)


@dataclasses.dataclass
class _Sealed:
    file: SealedFile  # the sealed file this is about
    starts: list[int] | None = None  # its chunks' starts, from the index (for recency)
    stretches_end: int = 0  # end of the stretches last asked for ahead of a reader


class SealedReads:
    def __init__(self, cache: BlobCache, keeper: Keeper, nursery: trio.Nursery):
        self._cache, self._keeper, self._nursery = cache, keeper, nursery
        self._budget = cache.budget
        self._blobs: dict[str, _Sealed] = {}
        self._stretching: set[tuple] = set()  # stretches with a task to load them
        self._ahead_limiter = trio.CapacityLimiter(STRETCHES_AHEAD)

    def _of(self, digest: str, sealed: SealedFile) -> _Sealed:
        known = self._blobs.get(digest)
        if known is None or known.file is not sealed:
            known = self._blobs[digest] = _Sealed(sealed)
        return known

    async def read(self, digest: str, offset: int, size: int,
                   ahead: tuple[int, int] | None) -> bytes | None:
        """Bytes [offset, offset+size) of sealed blob `digest` (clamped by the caller): a
        reader in sequence (`ahead`: its prefetch window) gets slices of stretches loaded
        ahead of it; any other read only the pages under it. None when it is not sealed."""
        self._budget.pin(digest)  # no chunk of it is evicted (and its file closed) meanwhile
        try:
            sealed = self._cache.open_sealed(digest)
            if sealed is None:
                return None
            blob = self._of(digest, sealed)
            if self._in_sequence(blob, offset, ahead):
                data = await self._read_stretches(digest, blob, offset, size)
                self._stretches_ahead(digest, blob, offset + size)
            else:
                data = await sealed.read(offset, size)
            self._budget.touch(digest, self._chunks(digest, blob, offset, size))
            return data
        finally:
            self._budget.unpin(digest)

    def _in_sequence(self, blob: _Sealed, offset: int, ahead) -> bool:
        """Whether a read continues a stream (its stretches are worth loading). The cursor
        says so, or the read lands on the stretch just past the ones loaded ahead: the kernel
        answered the reader from those pages itself, so its next READ comes further on than
        the cursor would call sequential."""
        if SEALED_STRETCH > self._keeper.memory.limit:
            return False  # (stretches could not be kept)
        if ahead is not None and ahead[1] > ahead[0]:
            return True
        end = blob.stretches_end
        return end > 0 and end - SEALED_LEAD - SEALED_STRETCH <= offset <= end + SEALED_STRETCH

    def _stretches_ahead(self, digest: str, blob: _Sealed, pos: int) -> None:
        """Load the stretches of [pos, pos + SEALED_LEAD) that are not in memory, in tasks of
        the mount's nursery, one task per stretch."""
        size = blob.file.size
        end = min(pos + SEALED_LEAD, size)
        for start in stretch_starts(pos, end, size):
            key = _stretch_key(digest, size, start)
            if self._keeper.get(key) is None and not self._keeper.loading(key) and \
                    key not in self._stretching:
                self._stretching.add(key)
                self._nursery.start_soon(self._stretch_ahead, digest, start, key)
        blob.stretches_end = end

    async def _stretch(self, digest: str, blob: _Sealed, start: int):
        """The stretch of a sealed blob at `start`, loaded once and kept (or None)."""
        sealed = blob.file
        key = _stretch_key(digest, sealed.size, start)
        data = self._keeper.get(key)
        if data is None:
            data = await self._keeper.load(key, lambda: sealed.load(start, key[2]),
                                           lambda: self._cache.open_sealed(digest) is sealed,
                                           publish=True)
            # Its pages go to the kernel, which answers the reader without us from now on:
            # the chunks under it are marked as used here (LRU eviction), not read by read.
            self._budget.touch(digest, self._chunks(digest, blob, start, key[2]))
        return data

    async def _read_stretches(self, digest: str, blob: _Sealed, offset: int,
                              size: int) -> bytes:
        end = offset + size  # (clamped at the end of the blob by the caller)
        starts = list(stretch_starts(offset, end, blob.file.size))
        parts = []
        for start in starts:
            data = await self._stretch(digest, blob, start)
            lo, hi = max(offset, start), min(end, start + SEALED_STRETCH)
            if data is None:  # the memory cache could not keep it
                parts.append(await blob.file.read(lo, hi - lo))
            else:
                # returned at once (no await before the FUSE reply), a slice is valid; kept
                # across the next stretch's await it is copied (cache/chunkbuf.py)
                piece = data.slice(lo - start, hi - start)
                parts.append(piece if len(starts) == 1 else bytes(piece))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _stretch_ahead(self, digest: str, start: int, key) -> None:
        """One stretch ahead of a reader. At most STRETCHES_AHEAD load at a time, all blobs
        together, and a task takes its buffer only once it may load: memory does not grow
        with the number of readers."""
        self._budget.pin(digest)
        try:
            async with self._ahead_limiter:
                sealed = self._cache.open_sealed(digest)
                if sealed is not None:
                    await self._stretch(digest, self._of(digest, sealed), start)
        except Exception as exc:  # an optimisation: the reader reads it itself if it must
            log.debug("loading %s at %d ahead of its reader failed: %s", digest[:19], start, exc)
        finally:
            self._stretching.discard(key)
            self._budget.unpin(digest)

    def _chunks(self, digest: str, blob: _Sealed, offset: int, size: int) -> range:
        """Chunk indexes under a read of a sealed blob (for recency), from the index once per
        sealed file."""
        if blob.starts is None:
            stored = self._cache.index.load(digest)
            blob.starts = [c.start for c in stored[1]] if stored else []
        starts = blob.starts
        if not starts:
            return range(0)
        first = bisect.bisect_right(starts, offset) - 1
        last = bisect.bisect_right(starts, offset + size - 1) - 1
        return range(max(first, 0), last + 1)


def _stretch_key(digest: str, size: int, start: int) -> tuple[str, int, int]:
    return digest, start, min(SEALED_STRETCH, size - start)
