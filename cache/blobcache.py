"""The cache directory: an Ollama models directory plus the in-progress state beside it.

```
<cache>/blobs/sha256-<hex>            sealed blobs only (Ollama's layout)
<cache>/manifests/<host>/<ns>/<model>/<tag>
<cache>/partial/sha256-<hex>.partial  sparse files of blobs in progress (outside blobs/, so
                                      Ollama's prune and readers never see them)
<cache>/index.sqlite                  the chunk index of the partial blobs, and which files in
                                      blobs/ were checked against their digest
<cache>/lock                          held (flock) by the one process using this cache
```

A file in `blobs/` counts as sealed only if the index recorded it when it was sealed (same size,
mtime and inode). Any other file there (copied in, left by another tool) is hashed once before
it is trusted (`adopt_sealed`), so a blob is never accepted on its size alone.
"""

from __future__ import annotations

import fcntl
import hashlib
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


class CacheBusy(ModelfsError):
    """Another process uses this cache directory."""


def _lock(root: pathlib.Path) -> int:
    fd = os.open(root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise CacheBusy(f"cache {root} is in use by another modelfs process"
                        + (f" (pid {holder})" if holder else "")) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _hash_file(path: pathlib.Path) -> tuple[str, int, int]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(8 << 20):
            h.update(piece)
        st = os.fstat(f.fileno())
    return "sha256:" + h.hexdigest(), st.st_mtime_ns, st.st_ino


class BlobCache:
    """Owns the index and the open partial blobs of one cache directory (trio thread only)."""

    def __init__(self, root: os.PathLike | str, *, durable: bool = True, io_threads: int = 2):
        self.root = pathlib.Path(root)
        self.store = ModelsDir(self.root).create()
        # One process per cache: two writers would race on the same partial files and seals.
        self._lock_fd = _lock(self.root)
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
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    def is_sealed(self, digest: str, size: int) -> bool:
        """True if `blobs/` holds this blob as we sealed (or adopted) it."""
        try:
            st = self.store.blob_path(digest).stat()
        except FileNotFoundError:
            return False
        return self.index.sealed_as(digest) == (size, st.st_mtime_ns, st.st_ino) == (
            st.st_size, st.st_mtime_ns, st.st_ino)

    async def adopt_sealed(self, digest: str, size: int) -> bool:
        """Trust a file in `blobs/` we did not seal only after hashing it (in a thread). A
        file that does not match its name is removed, loudly. True if the blob is sealed."""
        if self.is_sealed(digest, size):
            return True
        path = self.store.blob_path(digest)
        if not self.store.has_blob(digest, size):
            return False
        actual, mtime_ns, ino = await trio.to_thread.run_sync(_hash_file, path,
                                                              limiter=self.limiter)
        if actual != digest:
            log.error("blobs/%s does not hash to its name (%s); removing it", path.name, actual)
            path.unlink(missing_ok=True)
            return False
        self.index.record_sealed(digest, size, mtime_ns, ino)
        return True

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
