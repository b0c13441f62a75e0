"""Byte ranges of blobs on demand, for the mount: the read path below fs/.

`Materializer.read(name, layer, offset, size)` returns exactly the bytes asked for (clamped at
EOF), fetching the chunks that cover them if they are missing, and only bytes whose chunk was
verified (invariant 1). Reads of sealed blobs come straight from `blobs/`.

Concurrency contract (trio thread only; file I/O goes through the cache's thread limiter):
- Per blob, a `_BlobState` holds the partial blob, the URL to fetch from, and the chunks in
  flight. One flight per chunk at a time, however many readers wait (single-flight,
  invariant 5). A flight is a task in the mount's nursery, not in the reader's task: a reader
  that gives up at its deadline does not cancel a fetch other readers wait for, and the fetch
  finishes (or fails after its retries) on its own.
- A failed flight hands its error to the readers waiting on it; the next read starts a new one.
- Chunk lists come from the index when the blob was seen before (no network needed to read
  cached chunks); the registry is asked for the URL and list only when a chunk must be fetched.
- When the last chunk lands, the blob is sealed once (`_seal`); a seal mismatch quarantines the
  blob: reads fail for `quarantine_seconds`, then it is fetched again from scratch.
- Blobs the registry gives no chunk digests for are fetched whole and sealed before any byte
  is served.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Callable

import trio

from modelfs.cache.blobcache import BlobCache
from modelfs.cache.errors import ModelfsError, SealMismatch
from modelfs.cache.partial import PartialBlob, _pread_exact

from .client import DEFAULT_CHUNK_SIZE, RegistryClient
from .manifest import Layer
from .names import ModelName
from .pull import fetch_chunk

log = logging.getLogger(__name__)

# Layers up to this size (templates, params, licenses) are fetched whole on first read; larger
# ones by the registry's chunks, so a read touches only the chunks under it.
WHOLE_UP_TO = 1 << 20


class Quarantined(ModelfsError):
    """A blob whose seal failed recently; not served until it is fetched again."""


@dataclasses.dataclass
class _Flight:
    done: trio.Event = dataclasses.field(default_factory=trio.Event)
    error: BaseException | None = None


@dataclasses.dataclass
class _BlobState:
    name: ModelName  # a model that has this blob: where to fetch it from
    layer: Layer
    partial: PartialBlob | None = None
    url: str | None = None
    plan_lock: trio.Lock = dataclasses.field(default_factory=trio.Lock)
    flights: dict[int, _Flight] = dataclasses.field(default_factory=dict)
    sealing: trio.Event | None = None
    sealed_fd: int = -1
    quarantined_until: float = 0.0
    seal_error: BaseException | None = None


class Materializer:
    def __init__(self, client: RegistryClient, cache: BlobCache, nursery: trio.Nursery, *,
                 max_fetches: int = 8, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 quarantine_seconds: float = 30.0,
                 on_sealed: Callable[[str], None] | None = None):
        self._client, self._cache, self._nursery = client, cache, nursery
        self._limiter = trio.CapacityLimiter(max_fetches)
        self._chunk_size = chunk_size
        self._quarantine_seconds = quarantine_seconds
        self._on_sealed = on_sealed or (lambda digest: None)
        self.cache_root = cache.root
        self._states: dict[str, _BlobState] = {}
        self.fetches = 0  # chunk fetches started (statistics)

    def close(self) -> None:
        for state in self._states.values():
            if state.sealed_fd >= 0:
                os.close(state.sealed_fd)
                state.sealed_fd = -1

    def cached_bytes(self, layer: Layer) -> int:
        return self._cache.cached_bytes(layer.digest, layer.size)

    def _state(self, name: ModelName, layer: Layer) -> _BlobState:
        state = self._states.get(layer.digest)
        if state is None:
            state = self._states[layer.digest] = _BlobState(name, layer)
        return state

    # -- reading ----------------------------------------------------------------------------

    async def read(self, name: ModelName, layer: Layer, offset: int, size: int) -> bytes:
        if offset >= layer.size or size <= 0:
            return b""
        size = min(size, layer.size - offset)
        state = self._state(name, layer)
        while True:
            if state.quarantined_until > trio.current_time():
                raise Quarantined(f"blob {layer.digest[:19]} failed its seal recently; "
                                  f"not served until it is fetched again")
            if await self._is_sealed(state):
                return await self._read_sealed(state, offset, size)
            blob = await self._partial(state)
            if not blob.has_chunk_digests:
                await self._fetch_whole(state, blob)  # servable only once sealed
                continue
            chunks = blob.chunk_range(offset, size)
            for i in chunks:
                self._start(state, blob, i)
            for i in chunks:
                await self._wait_chunk(state, i)
            if state.partial is blob:  # not replaced by a new chunk list meanwhile
                return await blob.read(offset, size)

    async def _is_sealed(self, state: _BlobState) -> bool:
        if state.sealed_fd >= 0:
            return True
        if state.sealing is not None and not state.sealing.is_set():
            return False  # being renamed into blobs/ right now
        layer = state.layer
        if not await self._cache.adopt_sealed(layer.digest, layer.size):
            return False
        try:
            state.sealed_fd = os.open(self._cache.store.blob_path(layer.digest), os.O_RDONLY)
        except FileNotFoundError:
            return False
        return True

    async def _read_sealed(self, state: _BlobState, offset: int, size: int) -> bytes:
        return await trio.to_thread.run_sync(_pread_exact, state.sealed_fd, size, offset,
                                             limiter=self._cache.limiter)

    async def _partial(self, state: _BlobState) -> PartialBlob:
        if state.partial is not None:
            return state.partial
        async with state.plan_lock:
            if state.partial is None:
                layer = state.layer
                blob = self._cache.open_stored(layer.digest, layer.size)
                if blob is None:
                    plan = await self._client.chunk_plan(state.name, layer, self._chunk_size,
                                                         WHOLE_UP_TO)
                    blob = self._cache.open_partial(layer.digest, layer.size, plan.chunks)
                    state.url = plan.url
                state.partial = blob
            return state.partial

    async def _url(self, state: _BlobState) -> str:
        """The URL to fetch chunks from; asks the registry (once) if we only had the index."""
        async with state.plan_lock:
            if state.url is None:
                layer = state.layer
                plan = await self._client.chunk_plan(state.name, layer, self._chunk_size,
                                                         WHOLE_UP_TO)
                if state.partial is None or plan.chunks != state.partial.chunks:
                    log.info("registry changed the chunk list of %s; starting it over",
                             layer.digest[:19])
                    state.partial = self._cache.open_partial(layer.digest, layer.size,
                                                             plan.chunks)
                state.url = plan.url
            return state.url

    # -- fetching ---------------------------------------------------------------------------

    def _start(self, state: _BlobState, blob: PartialBlob, i: int) -> None:
        if blob.present[i] or i in state.flights:
            return
        flight = state.flights[i] = _Flight()
        self._nursery.start_soon(self._fetch, state, i, flight)

    async def _fetch(self, state: _BlobState, i: int, flight: _Flight) -> None:
        try:
            async with self._limiter:
                url = await self._url(state)
                blob = state.partial
                if blob is None:
                    raise Quarantined(f"blob {state.layer.digest[:19]} was discarded")
                if not blob.present[i]:
                    self.fetches += 1
                    await fetch_chunk(self._client, blob, url, i)
            if blob.complete:
                self._seal_soon(state, blob)
        except Exception as exc:  # handed to the readers waiting on this flight
            flight.error = exc
            log.warning("fetching chunk %d of %s failed: %s", i, state.layer.digest[:19], exc)
        finally:
            if state.flights.get(i) is flight:
                del state.flights[i]
            flight.done.set()

    async def _wait_chunk(self, state: _BlobState, i: int) -> None:
        while True:
            blob = state.partial
            if blob is None:
                raise Quarantined(f"blob {state.layer.digest[:19]} was discarded")
            if blob.present[i]:
                return
            flight = state.flights.get(i)
            if flight is None:
                self._start(state, blob, i)
                continue
            await flight.done.wait()
            if flight.error is not None and not (state.partial and state.partial.present[i]):
                raise flight.error

    async def _fetch_whole(self, state: _BlobState, blob: PartialBlob) -> None:
        for i in blob.missing():
            self._start(state, blob, i)
        for i in range(len(blob.chunks)):
            await self._wait_chunk(state, i)
        done = self._seal_soon(state, blob)
        await done.wait()
        if not blob.sealed:
            raise state.seal_error or Quarantined(f"blob {state.layer.digest[:19]} not sealed")

    def _seal_soon(self, state: _BlobState, blob: PartialBlob) -> trio.Event:
        if state.sealing is None:
            state.sealing = trio.Event()
            state.seal_error = None
            self._nursery.start_soon(self._seal, state, blob, state.sealing)
        return state.sealing

    async def _seal(self, state: _BlobState, blob: PartialBlob, done: trio.Event) -> None:
        try:
            await blob.seal()
            self._on_sealed(state.layer.digest)
        except SealMismatch as exc:
            # The chunk list lied: distrust it, refuse reads for a while, then start over.
            state.seal_error = exc
            state.partial, state.url = None, None
            state.quarantined_until = trio.current_time() + self._quarantine_seconds
        except Exception as exc:
            state.seal_error = exc
            log.exception("sealing %s failed", state.layer.digest[:19])
        finally:
            if not blob.sealed:
                state.sealing = None  # a later completion may try again
            done.set()
