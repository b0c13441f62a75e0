"""The cache directory: an Ollama models directory plus the in-progress state beside it.

```
<cache>/blobs/sha256-<hex>            sealed blobs only (Ollama's layout)
<cache>/manifests/<host>/<ns>/<model>/<tag>
<cache>/partial/sha256-<hex>.partial  sparse files of blobs in progress (outside blobs/, so
                                      Ollama's prune and readers never see them)
<cache>/index.sqlite                  the chunk index of the partial blobs
```
"""

from __future__ import annotations

import logging
import os
import pathlib

import trio

from .chunks import Chunk, check_coverage
from .digests import parse_digest
from .errors import ModelfsError
from .index import ChunkIndex
from .partial import PartialBlob, partial_name
from .store import ModelsDir

log = logging.getLogger(__name__)


class BlobCache:
    """Owns the index and the open partial blobs of one cache directory (trio thread only)."""

    def __init__(self, root: os.PathLike | str, *, durable: bool = True, io_threads: int = 2):
        self.root = pathlib.Path(root)
        self.store = ModelsDir(self.root).create()
        self.partial_dir = self.root / "partial"
        self.partial_dir.mkdir(exist_ok=True)
        self.index = ChunkIndex(self.root / "index.sqlite")
        self.durable = durable
        # Hashing, pwrite and fsync threads. The machine has about one core of compute, so a
        # couple of threads keep the disk and the hash busy without oversubscribing the CPU.
        self.limiter = trio.CapacityLimiter(io_threads)
        self._open: dict[str, PartialBlob] = {}
        self._retired: list[PartialBlob] = []  # replaced while readers may still hold them
        self._clean_leftovers()

    def _clean_leftovers(self) -> None:
        known = {partial_name(d) for d in self.index.digests()}
        for path in self.partial_dir.iterdir():
            if path.name not in known:
                log.info("removing leftover %s (not in the chunk index)", path.name)
                path.unlink(missing_ok=True)
        for path in self.store.manifests.rglob(".tmp-*"):
            path.unlink(missing_ok=True)

    def close(self) -> None:
        for blob in [*self._open.values(), *self._retired]:
            blob.close()
        self._open.clear()
        self._retired.clear()
        self.index.close()

    def is_sealed(self, digest: str, size: int) -> bool:
        return self.store.has_blob(digest, size)

    def open_partial(self, digest: str, size: int, chunks: list[Chunk]) -> PartialBlob:
        """The partial blob for `digest`, resuming what the index holds if the chunk list is
        the same as last time; a different list starts over (its chunks cannot be trusted to
        line up)."""
        digest = parse_digest(digest)
        check_coverage(chunks, size)
        blob = self._open.get(digest)
        if blob is not None and not blob.sealed and blob.chunks == chunks:
            return blob
        if blob is not None:
            # Not closed here: a read in a thread may still use its fd. Closed with the cache.
            self._retired.append(blob)
            del self._open[digest]
        path = self.partial_dir / partial_name(digest)
        stored = self.index.load(digest)
        if stored is not None and stored[0] == size and stored[1] == chunks and path.exists():
            present = stored[2]
            if any(present):
                log.info("resuming %s: %d of %d chunks already cached",
                         digest[:19], sum(present), len(present))
        else:
            if stored is not None:
                log.info("chunk list of %s changed or its file is gone; starting over", digest[:19])
            path.unlink(missing_ok=True)
            self.index.replace(digest, size, chunks)
            present = [False] * len(chunks)
        blob = PartialBlob(digest=digest, size=size, chunks=chunks, present=present, path=path,
                           final_path=self.store.blob_path(digest), index=self.index,
                           limiter=self.limiter, durable=self.durable)
        self._open[digest] = blob
        return blob

    def open_stored(self, digest: str, size: int) -> PartialBlob | None:
        """The partial blob as the index last knew it, without asking the registry for its
        chunk list (so cached chunks stay readable while the registry is away)."""
        digest = parse_digest(digest)
        blob = self._open.get(digest)
        if blob is not None and not blob.sealed:
            return blob
        stored = self.index.load(digest)
        if stored is None or stored[0] != size:
            return None
        try:
            return self.open_partial(digest, size, stored[1])
        except ModelfsError as exc:
            log.warning("chunk index entry of %s is unusable (%s); ignoring it", digest[:19], exc)
            return None

    def cached_bytes(self, digest: str, size: int) -> int:
        """Bytes of this blob present on local disk (sealed: all of them)."""
        if self.is_sealed(digest, size):
            return size
        blob = self._open.get(digest)
        if blob is not None:
            return blob.cached_bytes()
        stored = self.index.load(digest)
        if stored is None or stored[0] != size:
            return 0
        return sum(c.length for c, here in zip(stored[1], stored[2]) if here)

    def release(self, blob: PartialBlob) -> None:
        if self._open.get(blob.digest) is blob:
            del self._open[blob.digest]
        blob.close()
