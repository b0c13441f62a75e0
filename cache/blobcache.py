"""The cache directory: an Ollama models directory plus the in-progress state beside it.

```
<cache>/blobs/sha256-<hex>            sealed blobs only (Ollama's layout)
<cache>/manifests/<host>/<ns>/<model>/<tag>
<cache>/partial/sha256-<hex>.partial  sparse files of blobs in progress (outside blobs/, so
                                      Ollama's prune and readers never see them)
<cache>/index.sqlite                  chunk lists and presence of every blob (sealed ones too),
                                      and which files in blobs/ were checked against their digest
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

from .budget import DiskBudget
from .buffers import punch_hole
from .chunkbuf import BufferPool
from .chunks import DEFAULT_CHUNK_SIZE, Chunk, check_coverage, fixed_chunks
from .units import same_registry_chunks
from .digests import parse_digest
from .errors import ModelfsError
from .index import ChunkIndex
from .lowprio import LowPriorityThread
from .groupsync import UNRECORDED_LIMIT, UnrecordedBudget
from .partial import PartialBlob, partial_name
from .readers import ReaderActivity
from .sealedfile import SealedFile
from .store import ModelsDir

log = logging.getLogger(__name__)


def resumes(known: list[Chunk], new: list[Chunk], digest: str) -> bool:
    """Whether a blob cached in the units `known` is resumed as it is when asked for in the
    units `new`, rather than started over: when both group the same registry chunks (another
    --fetch-unit, or a list stored before units), or when `new` is the layer as one chunk that
    no list was asked for (a small layer) and `known` has digests (the registry's list, as
    trusted as the layer digest: a list that lied fails the seal, which discards it)."""
    if not known or not new or known[-1].end != new[-1].end:
        return known == new
    if same_registry_chunks(known, new):
        return True
    shortcut = len(new) == 1 and new[0].digest == digest
    return shortcut and bool(known) and all(c.digest is not None for c in known)


def _free_absent(path: pathlib.Path, chunks: list[Chunk], present: list[bool]) -> None:
    """A crash may leave bytes of chunks that were written but never recorded: give their
    space back (they are fetched again anyway)."""
    fd = os.open(path, os.O_RDWR)
    try:
        for chunk, here in zip(chunks, present):
            if not here:
                punch_hole(fd, chunk.start, chunk.length)
    finally:
        os.close(fd)


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


def _unlink_missing_ok(path: pathlib.Path) -> None:
    path.unlink(missing_ok=True)


def _hash_file(path: pathlib.Path) -> tuple[str, int, int]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(8 << 20):
            h.update(piece)
        st = os.fstat(f.fileno())
    return "sha256:" + h.hexdigest(), st.st_mtime_ns, st.st_ino


class BlobCache:
    """Owns the index and the open partial blobs of one cache directory (trio thread only)."""

    def __init__(self, root: os.PathLike | str, *, durable: bool = True, io_threads: int = 4,
                 cap: int | None = None, min_free: int | None = None,
                 sync_interval: float = 0.5, readers: ReaderActivity | None = None,
                 max_unrecorded: int = UNRECORDED_LIMIT):
        self.root = pathlib.Path(root)
        self.store = ModelsDir(self.root).create()
        # One process per cache: two writers would race on the same partial files and seals.
        self._lock_fd = _lock(self.root)
        self.partial_dir = self.root / "partial"
        self.partial_dir.mkdir(exist_ok=True)
        self.index = ChunkIndex(self.root / "index.sqlite")
        self.durable = durable
        self.sync_interval = sync_interval  # chunks are made durable in batches this far apart
        # ... or sooner: at most this many bytes of chunks, all blobs together, wait to be
        # recorded (what a crash costs: partial.py, UnrecordedBudget)
        self.unrecorded = UnrecordedBudget(max_unrecorded)
        # Hashing, pwrite and fsync threads. The machine has about one core of compute, so a
        # couple of threads keep the disk and the hash busy without oversubscribing the CPU.
        self.limiter = trio.CapacityLimiter(io_threads)
        # Memory for chunk bytes, shared by the blobs and the fetcher (cache/chunkbuf.py).
        self.pool = BufferPool()
        # A mount's readers (readers.py), or None (a pull). Where readers come first, sealers
        # wait for them and hash in a thread at the lowest priority; where the seal is what
        # everyone waits for, in trio's threads.
        self.readers = readers
        self.hash_thread = LowPriorityThread(name="modelfs-sealer") if readers is not None \
            else None
        # The one open object of each blob: in progress (or sealed by us, until it is
        # released), and sealed blobs opened for reading. Readers ask for them here each time
        # (`current`, `sealed_file`), so a blob replaced, dropped or unsealed is never read
        # through an object nobody owns any more.
        self._open: dict[str, PartialBlob] = {}
        self._sealed_files: dict[str, SealedFile] = {}
        self._retired: list[PartialBlob] = []  # replaced while readers may still hold them
        self._adopting: dict[str, trio.Lock] = {}
        self._clean_leftovers()
        self.budget = DiskBudget(self, cap=cap, min_free=min_free)

    def _clean_leftovers(self) -> None:
        known = {partial_name(d) for d in self.index.digests()}
        for path in self.partial_dir.iterdir():
            if path.name not in known:
                log.info("removing leftover %s (not in the chunk index)", path.name)
                path.unlink(missing_ok=True)
        for path in self.store.manifests.rglob(".tmp-*"):
            path.unlink(missing_ok=True)

    def close(self) -> None:
        if getattr(self, "budget", None) is not None:
            try:
                self.budget.flush()
            except Exception as exc:  # recency is a hint; the lock must still be released
                log.warning("could not save chunk recency: %s", exc)
        for blob in [*self._open.values(), *self._retired]:
            blob.close()
        self._open.clear()
        for digest in list(self._sealed_files):
            self._close_sealed(digest)
        self._retired.clear()
        self.pool.close()
        if self.hash_thread is not None:
            self.hash_thread.close()
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
        """Trust a file in `blobs/` we did not seal only after hashing it (in a thread, once
        however many readers ask). A file that does not match its name is removed, loudly.
        True if the blob is sealed. (An adopted blob has no chunk digests: when the budget
        needs its room it is dropped whole, never left with holes it could not verify.)"""
        if self.is_sealed(digest, size):
            return True
        if not self.store.has_blob(digest, size):
            return False
        lock = self._adopting.setdefault(digest, trio.Lock())
        async with lock:
            if self.is_sealed(digest, size):
                return True
            return await self._adopt(digest, size)

    async def _adopt(self, digest: str, size: int) -> bool:
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
        if self.index.load(digest) is None:
            # Rows, so the budget counts it and can choose it. They carry no digests, so
            # eviction drops it whole (budget.py) and it is fetched again under the
            # registry's chunk list.
            chunks = fixed_chunks(size, DEFAULT_CHUNK_SIZE)
            self.index.replace(digest, size, chunks)
            self.index.mark_present(digest, list(range(len(chunks))))
            self.budget.used += size
        return True

    def _blob(self, digest: str, size: int, chunks: list[Chunk], present: list[int],
              path: pathlib.Path, sealed: bool = False, check_whole: bool = False) -> PartialBlob:
        return PartialBlob(digest=digest, size=size, chunks=chunks, present=present, path=path,
                           final_path=self.store.blob_path(digest), index=self.index,
                           limiter=self.limiter, durable=self.durable,
                           reserve=self.budget.reserve, sealed=sealed,
                           sync_interval=self.sync_interval, pool=self.pool,
                           hash_thread=self.hash_thread, check_whole=check_whole,
                           unrecorded=self.unrecorded, readers=self.readers)

    def open_partial(self, digest: str, size: int, chunks: list[Chunk], *,
                     check_whole: bool = False) -> PartialBlob:
        """The partial blob for `digest`, resuming what the index holds if the chunk list is
        the same as last time; a different list starts over (its chunks cannot be trusted to
        line up). `check_whole`: nobody reads it before its seal, which alone checks the
        chunks received from now on (partial.py: a pull)."""
        digest = parse_digest(digest)
        check_coverage(chunks, size)
        blob = self._open.get(digest)
        if blob is not None and not blob.sealed and blob.size == size and \
                resumes(blob.chunks, chunks, digest):
            blob.check_whole = check_whole and blob.has_chunk_digests
            return blob
        # what the budget counts for this blob now (as DiskBudget._resync does), should it
        # start over
        counted = 0 if blob is None or blob.sealed else sum(
            c.length for i, c in enumerate(blob.chunks) if blob.in_file(i) and not blob.present[i])
        if blob is not None:
            # Not closed here: a read in a thread may still use its fd. Closed with the cache.
            blob.retire()
            self._retired.append(blob)
            del self._open[digest]
        path = self.partial_dir / partial_name(digest)
        stored = self.index.load(digest)
        if stored is not None:
            counted += self.index.present_bytes(digest, stored[0])
            if stored[0] == size and resumes(stored[1], chunks, digest):
                chunks = stored[1]
        if stored is not None and stored[0] == size and stored[1] == chunks and path.exists():
            present = stored[2]
            if any(present):
                log.info("resuming %s: %d of %d chunks already cached",
                         digest[:19], sum(1 for p in present if p), len(present))
            _free_absent(path, chunks, present)
        else:
            if stored is not None:
                log.info("chunk list of %s changed or its file is gone; starting over", digest[:19])
            path.unlink(missing_ok=True)
            self.index.replace(digest, size, chunks)
            self.budget.used -= counted  # those bytes are gone with the file and the rows
            present = [False] * len(chunks)
        blob = self._blob(digest, size, chunks, present, path, check_whole=check_whole)
        self._open[digest] = blob
        return blob

    def open_stored(self, digest: str, size: int) -> PartialBlob | None:
        """The partial blob as the index last knew it, without asking the registry for its
        chunk list (so cached chunks stay readable while the registry is away)."""
        digest = parse_digest(digest)
        blob = self._open.get(digest)
        if blob is not None and not blob.sealed:
            return blob
        if self.index.sealed_as(digest) is not None:
            return None  # sealed: read from blobs/, its rows are not a partial file's
        stored = self.index.load(digest)
        if stored is None or stored[0] != size:
            return None
        try:
            return self.open_partial(digest, size, stored[1])
        except ModelfsError as exc:
            log.warning("chunk index entry of %s is unusable (%s); ignoring it", digest[:19], exc)
            return None

    def current(self, digest: str) -> PartialBlob | None:
        """The in-progress blob of `digest` open now, if any (nothing is opened)."""
        blob = self._open.get(digest)
        return blob if blob is not None and not blob.sealed else None

    async def sealed_file(self, digest: str, size: int) -> SealedFile | None:
        """The sealed blob of `digest` opened for reading (once; kept until it is unsealed or
        the cache closes), or None: not sealed, or in progress here (only its own seal moves
        it into blobs/). A file in blobs/ we did not seal is hashed first (adopt_sealed)."""
        if self.current(digest) is not None:
            return None
        sealed = self._sealed_files.get(digest)
        if sealed is not None:
            return sealed
        if not await self.adopt_sealed(digest, size):
            return None
        sealed = self._sealed_files.get(digest)  # opened by another read meanwhile
        if sealed is None and self.current(digest) is None:
            try:
                sealed = SealedFile(self.store.blob_path(digest), size, self.pool,
                                    self.limiter)
            except FileNotFoundError:
                return None
            self._sealed_files[digest] = sealed
        return sealed

    def open_sealed(self, digest: str) -> SealedFile | None:
        """The sealed blob of `digest` if it is open for reading now (nothing is opened)."""
        return self._sealed_files.get(digest)

    def _close_sealed(self, digest: str) -> None:
        """No longer readable as sealed (unsealed, dropped). Never under a read: reads pin
        the blob, and the budget neither unseals nor drops a pinned one."""
        sealed = self._sealed_files.pop(digest, None)
        if sealed is not None:
            sealed.close()

    def verified_bytes(self, digest: str, size: int) -> int:
        """Bytes of this blob verified (servable): a sealed blob's all, an open one's
        verified chunks; for a blob not open, what the index calls present (a landed chunk
        there is checked on its first read)."""
        blob = self.current(digest)
        if blob is None:
            return self.cached_bytes(digest, size)
        return sum(c.length for i, c in enumerate(blob.chunks) if blob.ready(i))

    def cached_bytes(self, digest: str, size: int) -> int:
        """Bytes of this blob present on local disk (sealed: all of them)."""
        if self.is_sealed(digest, size):
            return size
        blob = self._open.get(digest)
        if blob is not None:
            return blob.cached_bytes()
        return self.index.present_bytes(digest, size)

    def unseal_for_eviction(self, digest: str) -> PartialBlob | None:
        """The blob of `digest` as an in-progress PartialBlob whose chunks can be evicted: an
        open one as it is, a sealed one moved back out of `blobs/` first."""
        blob = self._open.get(digest)
        if blob is not None:
            if blob.sealed:
                self._close_sealed(digest)
                blob.unseal()
            return blob
        stored = self.index.load(digest)
        sealed = self.index.sealed_as(digest)
        if stored is None:
            return None
        size, chunks, present = stored
        if sealed is None:
            return self.open_stored(digest, size)
        if not self.is_sealed(digest, size):  # gone or changed behind our back
            log.warning("blobs/%s is not the blob that was sealed; forgetting it", digest[7:19])
            self.index.forget(digest)
            self.index.forget_sealed(digest)
            return None
        path = self.partial_dir / partial_name(digest)
        self._close_sealed(digest)
        blob = self._blob(digest, size, chunks, present, path, sealed=True)
        blob.unseal()
        self._open[digest] = blob
        return blob

    async def drop_whole(self, blob: PartialBlob) -> int:
        """Remove a blob entirely (file and rows); returns the bytes it held."""
        held = blob.cached_bytes()
        self.index.forget(blob.digest)
        self.index.forget_sealed(blob.digest)
        self.drop(blob)
        self._close_sealed(blob.digest)
        blob.forget_chunks()
        for path in (blob.path, blob.final_path):
            await trio.to_thread.run_sync(_unlink_missing_ok, path, limiter=self.limiter)
        return held

    def drop(self, blob: PartialBlob) -> None:
        """Forget an open blob that was discarded (its fd is closed with the cache: a read in
        a thread may still hold it); the next open starts from the index."""
        if self._open.get(blob.digest) is blob:
            del self._open[blob.digest]
            blob.retire()
            self._retired.append(blob)

    async def commit_pending(self) -> None:
        """Record every chunk written but not yet recorded (a clean shutdown loses nothing)."""
        for blob in self.open_blobs():
            for i, present in enumerate(blob.present):
                if blob.in_file(i) and not present:
                    await blob.commit_chunk(i)
        self.budget.flush()

    def open_blobs(self) -> list[PartialBlob]:
        return [b for b in self._open.values() if not b.sealed]

    def release(self, blob: PartialBlob) -> None:
        if self._open.get(blob.digest) is blob:
            del self._open[blob.digest]
        blob.close()
