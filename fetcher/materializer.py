"""Byte ranges of blobs on demand, for the mount: the read path below fs/.

`Materializer.read(name, layer, offset, size)` returns exactly the bytes asked for (clamped at
EOF), fetching the chunks that cover them if they are missing, and only bytes whose chunk was
verified (invariant 1). Reads of sealed blobs come straight from `blobs/`.

Concurrency contract (trio thread only; file I/O goes through the cache's thread limiter):
- Fetches go through the process's fetch engine (fetcher/engine.py, shared with a pull): one
  queue, most urgent first: a reader's miss (DEMAND), the window ahead of a sequential reader
  (WINDOW), the rest of an open model (BACKGROUND); one flight per chunk however many readers
  wait (invariant 5); memory bounded by its `max_inflight` bytes (invariant 8). The
  materializer is the engine's requester for the mount's blobs: it says where a blob comes
  from (`source`), holds back background chunks too far ahead of a busy reader (`defer`,
  then `_pace`), keeps the chunks a reader is about to want (`fetched`) and seals a blob
  once its last chunk is recorded (`recorded`). A failed flight hands its error to the
  readers waiting on it; the next read wants a new one.
- A chunk is served as soon as it is verified (`ready`), from its buffer until it is written;
  it is made durable and recorded in the index right after, with one fdatasync shared by the
  chunks that wait for it.
- Chunks a reader wants (demand, or the window, also when the window reached a chunk that was
  already being fetched in the background) stay in memory (`memory_cache` bytes, as refs on
  their chunk buffers), so the stream of READs behind them is answered with slices of those
  buffers, without a disk read or a thread hop. The memory cache is larger than the widest
  window, or the chunks just ahead of a reader would be the first to go. A chunk read from
  disk is read back whole, once (`Keeper.load`, fetcher/memcache.py), and kept the same way.
- Chunk lists come from the index when the blob was seen before (no network needed to read
  cached chunks); the registry is asked for the URL and list only when a chunk must be fetched.
- When the last chunk is recorded, the blob is sealed once (fetcher/seals.py: when, and what
  a failure means; a seal mismatch quarantines the blob for `quarantine_seconds`).
- Blobs the registry gives no chunk digests for are fetched whole and sealed before any byte
  is served.
- Sealed blobs are read by fetcher/sealedreads.py (direct I/O, stretches ahead of a reader).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Awaitable, Callable

import trio

from modelfs.cache.blobcache import BlobCache, resumes
from modelfs.cache.chunkbuf import ChunkBuffer
from modelfs.cache.chunks import DEFAULT_CHUNK_SIZE
from modelfs.cache.errors import CacheFull
from modelfs.cache.partial import PartialBlob

from .client import RegistryClient
from .deadline import ProgressDeadline
from .engine import BlobReset, FetchEngine
from .manifest import Layer
from .memcache import Keeper, MemoryCache, memory_key
from .names import ModelName
from .scheduler import BACKGROUND, DEMAND, WINDOW
from .sealedreads import SealedReads
from .seals import BlobSeals, Quarantined
from .source import ChunkSource, OriginSource

log = logging.getLogger(__name__)

# Layers up to this size (templates, params, licenses) are fetched whole on first read; larger
# ones by the registry's chunks, so a read touches only the chunks under it.
WHOLE_UP_TO = 1 << 20


__all__ = ["BlobReset", "Materializer", "Quarantined"]  # (what fs/ catches)


@dataclasses.dataclass
class _BlobState:
    name: ModelName  # a model that has this blob: where to fetch it from
    layer: Layer
    url: str | None = None
    plan_lock: trio.Lock = dataclasses.field(default_factory=trio.Lock)
    open_handles: int = 0
    deferred: set[int] = dataclasses.field(default_factory=set)  # background, too far ahead
    pacing: bool = False  # a _pace task runs for `deferred`
    background: bool = False
    served: bool = False  # a read of it was answered (its first miss went alone)


class Materializer:
    def __init__(self, client: RegistryClient, cache: BlobCache, nursery: trio.Nursery, *,
                 workers: int = 4, max_inflight: int = 64 << 20, memory_cache: int = 80 << 20,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, quarantine_seconds: float = 30.0,
                 background: bool = True, on_sealed: Callable[[str], None] | None = None,
                 publish: Callable[[str, int, ChunkBuffer], Awaitable[None]] | None = None,
                 engine: FetchEngine | None = None):
        """`engine`: the process's fetch engine (fetcher/engine.py); without one, the
        materializer makes its own in `nursery`, of `workers` tasks and `max_inflight` bytes.
        `publish`: called (as a task of the mount) with (blob digest, offset, chunk buffer)
        for each chunk kept for a reader, the buffer held for the call (fs/pagecache.py
        pushes it into the kernel's page cache)."""
        self._client, self._cache, self._nursery = client, cache, nursery
        self.engine = engine or FetchEngine(cache, nursery, retry=client.config.retry,
                                            workers=workers, max_inflight=max_inflight)
        self._keeper = Keeper(MemoryCache(memory_cache, cache.pool), cache.pool, nursery,
                              publish)
        self._sealed = SealedReads(cache, self._keeper, nursery)
        self._seals = BlobSeals(cache, nursery, self._keeper.memory,
                                quarantine_seconds=quarantine_seconds, on_sealed=on_sealed)
        # how far ahead of a busy reader background chunks are fetched (and kept in memory)
        self._lead = max(memory_cache - 2 * chunk_size, chunk_size)
        self._chunk_size = chunk_size
        self._background = background
        self._states: dict[str, _BlobState] = {}
        self._budget = cache.budget
        if cache.readers is None:
            raise ValueError("a mount's cache records its readers: BlobCache(readers=...)")
        self._readers = cache.readers

    @property
    def loads(self) -> int:
        """Chunks and stretches read back from the disk for readers (statistics)."""
        return self._keeper.loads

    def close(self) -> None:
        self._keeper.memory.clear()

    def _blob(self, state: _BlobState) -> PartialBlob | None:
        """The blob's in-progress state, as the cache has it open now (the cache owns which
        object that is: it replaces it for a new chunk list, drops it on a failed seal, opens
        a sealed one again to evict from it). None when it is sealed or not open."""
        return self._cache.current(state.layer.digest)

    def cached_bytes(self, layer: Layer) -> int:
        return self._cache.cached_bytes(layer.digest, layer.size)

    def _state(self, name: ModelName, layer: Layer) -> _BlobState:
        state = self._states.get(layer.digest)
        if state is None:
            state = self._states[layer.digest] = _BlobState(name, layer)
        return state

    # -- open files ---------------------------------------------------------------------------

    def opened(self, name: ModelName, layer: Layer) -> None:
        self._state(name, layer).open_handles += 1

    def closed(self, layer: Layer) -> None:
        """A handle of a blob closed; when it was the last, the blob's background fetch stops
        (what a window or a reader already asked for still completes)."""
        state = self._states.get(layer.digest)
        if state is None:
            return
        state.open_handles -= 1
        if state.open_handles <= 0 and state.background:
            state.background = False
            blob = self._blob(state)
            for i in range(len(blob.chunks) if blob is not None else 0):
                self.engine.call_off(layer.digest, i)

    # -- reading ----------------------------------------------------------------------------

    async def read(self, name: ModelName, layer: Layer, offset: int, size: int, *,
                   ahead: tuple[int, int] | None = None, whole: bool = False,
                   deadline: ProgressDeadline | None = None) -> bytes:
        """Bytes [offset, offset+size) of `layer`. `ahead`: a byte range to fetch ahead of
        the reader; `whole`: the rest of the blob too, in the background. The waits for
        fetches report their progress to `deadline` (the caller's scope: fetcher/deadline.py)."""
        if offset >= layer.size or size <= 0:
            return b""
        size = min(size, layer.size - offset)
        state = self._state(name, layer)
        self._readers.read(layer.digest, offset, size)
        while True:
            self._seals.check(layer.digest)
            if await self._cache.sealed_file(layer.digest, layer.size) is not None:
                data = await self._sealed.read(layer.digest, offset, size, ahead)
                if data is not None:
                    return data
                continue  # evicted from since: read it as a partial blob
            blob = await self._partial(state)
            try:
                data = await self._read_partial(state, blob, offset, size, ahead, whole,
                                                deadline)
            except BlobReset:
                await trio.sleep(0)  # its state was reset under us: start over (deadline holds)
                continue
            if data is not None:
                return data

    async def _read_partial(self, state: _BlobState, blob: PartialBlob, offset: int, size: int,
                            ahead, whole, deadline) -> bytes | None:
        """The bytes from an in-progress blob, or None to go round again."""
        if not blob.has_chunk_digests:
            await self._fetch_whole(state, blob, deadline)  # servable only once sealed
            return None
        chunks = blob.chunk_range(offset, size)
        for i in chunks:
            self._want(state, blob, i, DEMAND)
        # The background waits until the first read of a blob that had to wait is answered:
        # fetched beside it, the rest of the blob would share the link and the server's disk
        # with that chunk and delay the reader's first bytes (streaming start). The window
        # ahead of the reader does not wait (the reader wants it next).
        first = not state.served and not blob.all_ready(chunks)
        self._want_ahead(state, blob, ahead, whole and not first)
        # pinned before waiting: a chunk that arrives is not evicted before it is read
        self._budget.pin(blob.digest, chunks)
        try:
            for i in chunks:
                await self._wait_chunk(state, i, deadline)
            state.served = True
            if first:
                self._want_ahead(state, blob, None, whole)
            if self._blob(state) is blob and blob.all_ready(chunks):
                if blob.complete:  # (a seal that failed for no fault of the blob's: again)
                    self._seals.soon(blob)
                self._budget.touch(blob.digest, chunks)
                return await self._read_chunks(state, blob, chunks, offset, size)
        finally:
            self._budget.unpin(blob.digest, chunks)
        return None  # replaced by a new chunk list meanwhile: go round again

    def _want_ahead(self, state: _BlobState, blob: PartialBlob, ahead, whole) -> None:
        """Queue the window ahead of a sequential reader, and with `whole` the rest of the
        blob in the background (when it fits the cache and a handle is open)."""
        layer = state.layer
        if ahead is not None and ahead[1] > ahead[0]:
            end = min(ahead[1], layer.size)
            if end > ahead[0]:
                for i in blob.chunk_range(ahead[0], end - ahead[0]):
                    self._want(state, blob, i, WINDOW)
        fits = self._budget.cap is None or layer.size <= self._budget.cap
        if whole and self._background and fits and not state.background \
                and state.open_handles:
            state.background = True
            for i in blob.missing():
                self._want(state, blob, i, BACKGROUND)

    async def _read_chunks(self, state: _BlobState, blob: PartialBlob, chunks: range,
                           offset: int, size: int) -> bytes:
        parts = []
        end = offset + size
        for i in chunks:
            chunk = blob.chunks[i]
            lo, hi = max(offset, chunk.start), min(end, chunk.end)
            data = self._keeper.get(memory_key(blob, i))
            if data is None and hi - lo < chunk.length:
                # Part of a chunk: the reads behind this one want the rest of it, so it is
                # read back whole, once (direct I/O), and kept (see _load).
                data = await self._keeper.load(memory_key(blob, i), lambda: blob.load_chunk(i),
                                               lambda: self._blob(state) is blob)
            if data is not None:
                piece = data.slice(lo - chunk.start, hi - chunk.start)
                # A slice of a chunk buffer is valid while somebody holds the buffer: returned
                # at once it is (no await until the FUSE reply is sent); kept across the awaits
                # of the next chunk it is copied (cache/chunkbuf.py, ownership contract).
                parts.append(piece if len(chunks) == 1 else bytes(piece))
            else:
                parts.append(await blob.read(lo, hi - lo))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def finish_seals(self) -> None:
        """Wait for the seals in progress (at unmount)."""
        await self._seals.finish()

    async def _partial(self, state: _BlobState) -> PartialBlob:
        blob = self._blob(state)
        if blob is not None:
            return blob
        async with state.plan_lock:
            blob = self._blob(state)
            if blob is None:
                layer = state.layer
                blob = self._cache.open_stored(layer.digest, layer.size)
                if blob is None:
                    plan = await self._client.chunk_plan(state.name, layer, self._chunk_size,
                                                         WHOLE_UP_TO)
                    blob = self._cache.open_partial(layer.digest, layer.size, plan.chunks)
                    state.url = plan.url
                if blob.complete and not blob.sealed:
                    self._seals.soon(blob)  # complete, but not sealed before a restart
            return blob

    async def _url(self, state: _BlobState) -> str:
        """The URL to fetch chunks from; asks the registry (once) if we only had the index."""
        if state.url is not None:
            return state.url  # (no checkpoint: the next request leaves before readers wake)
        async with state.plan_lock:
            if state.url is None:
                layer = state.layer
                plan = await self._client.chunk_plan(state.name, layer, self._chunk_size,
                                                      WHOLE_UP_TO)
                blob = self._blob(state)
                # (none: sealed or dropped meanwhile; the next read opens what it needs)
                if blob is not None and not resumes(blob.chunks, plan.chunks, layer.digest):
                    log.info("registry changed the chunk list of %s; starting it over",
                             layer.digest[:19])
                    self._cache.open_partial(layer.digest, layer.size, plan.chunks)
                state.url = plan.url
            return state.url

    # -- fetching: what the engine asks its requester (fetcher/engine.py) -------------------

    def _want(self, state: _BlobState, blob: PartialBlob, i: int, priority: int) -> None:
        """Make sure chunk `i` is on its way, at least at `priority`."""
        if not blob.ready(i):
            self.engine.want(self, state.layer.digest, i, priority)

    async def source(self, digest: str) -> ChunkSource:
        return OriginSource(self._client, await self._url(self._states[digest]))

    def defer(self, digest: str, i: int, priority: int) -> bool:
        """A background chunk too far ahead of a busy reader waits (`_pace` wants it again)."""
        state = self._states[digest]
        if priority != BACKGROUND or not self._too_far_ahead(state, i):
            return False
        state.deferred.add(i)
        if not state.pacing:
            state.pacing = True
            self._nursery.start_soon(self._pace, state)
        return True

    def fetched(self, blob: PartialBlob, i: int, buf: ChunkBuffer, priority: int) -> None:
        """Keep a chunk's bytes in memory when a reader is about to want them (the job was
        promoted to the window or a demand meanwhile); background chunks would only push
        those out. Only when verified on its own: a chunk of a blob without chunk digests is
        not servable before the seal (invariant 1), wherever it would be kept."""
        state = self._states[blob.digest]
        if (priority <= WINDOW or self._near_reader(state, i)) and blob.has_chunk_digests \
                and self._blob(state) is blob:
            self._keeper.keep(memory_key(blob, i), buf, publish=True)

    def recorded(self, blob: PartialBlob, i: int, error: Exception | None) -> None:
        state = self._states[blob.digest]
        if error is None and blob.complete and self._blob(state) is blob:
            self._seals.soon(blob)

    def _ahead_of_reader(self, state: _BlobState, i: int) -> int | None:
        """How far chunk `i` starts ahead of where its blob is being read right now; None
        when no reader is busy with it."""
        blob = self._blob(state)
        position = self._readers.position(state.layer.digest)
        if blob is None or position is None:
            return None
        return blob.chunks[i].start - position

    def _near_reader(self, state: _BlobState, i: int) -> bool:
        """Within the stretch just ahead of a busy reader (its bytes are kept for it)."""
        ahead = self._ahead_of_reader(state, i)
        return ahead is not None and 0 <= ahead < self._lead

    def _too_far_ahead(self, state: _BlobState, i: int) -> bool:
        """A background chunk beyond that stretch while a reader is busy: fetched now, it
        would go to disk and be read back from there a moment later. It waits instead."""
        ahead = self._ahead_of_reader(state, i)
        return ahead is not None and ahead >= self._lead

    async def _pace(self, state: _BlobState) -> None:
        """Queue the deferred background chunks again as the reader comes closer (or pauses);
        call them off if the background was. One task per blob, a few times a second."""
        try:
            while state.deferred:
                await trio.sleep(self._readers.quiet / 10)
                for i in sorted(state.deferred):
                    if state.background and self._too_far_ahead(state, i):
                        break  # (and so are the ones after it)
                    state.deferred.discard(i)
                    blob = self._blob(state)
                    if blob is None or blob.ready(i):
                        continue
                    if state.background:
                        self._want(state, blob, i, BACKGROUND)
                    else:
                        self.engine.call_off(state.layer.digest, i)  # nobody waits on it
        finally:
            state.pacing = False

    async def _wait_chunk(self, state: _BlobState, i: int,
                          deadline: ProgressDeadline | None) -> None:
        while True:
            blob = self._blob(state)
            if blob is None:
                raise BlobReset(f"blob {state.layer.digest[:19]} was reset while being read")
            if blob.ready(i):
                return
            # (queued, or promoted to a demand if it waits at a lower priority)
            flight = self.engine.want(self, state.layer.digest, i, DEMAND)
            if flight is None:
                await trio.sleep(0)  # nothing to fetch any more: look again
                continue
            await self.engine.wait(flight, deadline)
            current = self._blob(state)
            if current is None:  # sealed or dropped meanwhile: the read starts over
                raise BlobReset(f"blob {state.layer.digest[:19]} was reset while being read")
            if flight.error is not None and not current.ready(i):
                raise flight.error

    async def _fetch_whole(self, state: _BlobState, blob: PartialBlob,
                           deadline: ProgressDeadline | None) -> None:
        """Every chunk of a blob without chunk digests, then its seal: servable only then
        (invariant 1). Progress is the chunks' bytes as they arrive, then the sealer's."""
        cap = self._budget.cap
        if cap is not None and blob.size > cap:
            raise CacheFull(f"blob {blob.digest[:19]} has no chunk digests, so it is served "
                            f"only once whole, and it is larger than the cache cap")
        self._budget.pin(blob.digest)  # whole, at once: none of it may be evicted meanwhile
        try:
            for i in blob.missing():
                self._want(state, blob, i, DEMAND)
            for i in range(len(blob.chunks)):
                await self._wait_chunk(state, i, deadline)
            for i in range(len(blob.chunks)):  # durable and recorded (idempotent)
                await blob.commit_chunk(i)
            sealed = self._seals.soon(blob)  # pinned until sealed
            if deadline is None:
                await sealed.wait()
            else:
                await deadline.wait(sealed, lambda: ("seal", blob.seal_progress))
        finally:
            self._budget.unpin(blob.digest)
        if not blob.sealed:
            raise self._seals.error(blob.digest) or \
                BlobReset(f"blob {blob.digest[:19]} could not be sealed")
