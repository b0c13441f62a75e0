"""`modelfs pull`: every layer of a model into the cache, chunks concurrently, resumable.

A pull is a client of the fetch engine (fetcher/engine.py), the same one a mount's readers use:
the same queue, single-flight, retry policy, error classification and answer checks. It wants
its model's missing chunks in file order, at most `concurrency` of them at once (so the
sealer hashes them from the buffers they were received into, and a list of many chunks does
not fill the queue), at its own priority. Any final error of a chunk ends the whole pull; what
was recorded stays in the cache for the next run. The manifest is written last.

Without an engine given, a pull runs its own in a nursery of its own, with `concurrency`
workers and in-flight bytes for that many of its largest chunks.

Each byte is hashed once. Nobody reads a blob before a pull has sealed it, so its chunks are
checked by the seal alone (`check_whole`, cache/partial.py), not also one by one as a mount's
must be: on a fast link the hashing is what limits a pull, and a second sha256 of every byte
would halve its speed. Only when the seal does not match is each chunk checked on its own; the
corrupt ones are fetched again (checked on their own) and the blob sealed again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Callable

import trio

from modelfs.cache.blobcache import BlobCache
from modelfs.cache.chunkbuf import ChunkBuffer
from modelfs.cache.errors import CacheFull, LandedChunksBad
from modelfs.cache.partial import PartialBlob

from .client import DEFAULT_CHUNK_SIZE, RegistryClient
from .engine import FetchEngine
from .groups import first_error
from .manifest import Manifest
from .names import ModelName
from .scheduler import BACKGROUND
from .source import ChunkSource, OriginSource

log = logging.getLogger(__name__)

Progress = Callable[[int], None]  # called with a number of bytes now done


@dataclasses.dataclass
class PullResult:
    name: ModelName
    manifest: Manifest
    total_bytes: int = 0
    fetched_bytes: int = 0
    fetched_chunks: int = 0
    cached_bytes: int = 0  # already in the cache before this pull
    unverified_layers: int = 0  # layers read without chunk digests (sealed as a whole)


@dataclasses.dataclass
class _Sources:
    """The pull as a requester of the engine: where each of its blobs comes from."""
    client: RegistryClient
    urls: dict[str, str] = dataclasses.field(default_factory=dict)  # blob digest -> URL
    error: Exception | None = None  # the first chunk that could not be recorded

    async def source(self, digest: str) -> ChunkSource:
        return OriginSource(self.client, self.urls[digest])

    def defer(self, digest: str, index: int, priority: int) -> bool:
        return False

    def fetched(self, blob: PartialBlob, index: int, buf: ChunkBuffer, priority: int) -> None:
        pass  # nobody reads it before the seal

    def recorded(self, blob: PartialBlob, index: int, error: Exception | None) -> None:
        # (sealed by the pull once every chunk is in)
        if self.error is None:
            self.error = error


async def pull(name: ModelName, client: RegistryClient, cache: BlobCache, *,
               concurrency: int = 4, chunk_size: int = DEFAULT_CHUNK_SIZE,
               progress: Progress | None = None,
               on_start: Callable[[int], None] | None = None,
               engine: FetchEngine | None = None, priority: int = BACKGROUND) -> PullResult:
    """Pull `name` into `cache`. `engine`: the process's fetch engine, if it has one (else the
    pull runs its own); `priority`: the pull's chunks' place in its queue."""
    progress = progress or (lambda n: None)
    manifest = await client.fetch_manifest(name)
    result = PullResult(name, manifest)
    layers = manifest.blobs()
    result.total_bytes = sum(layer.size for layer in layers)
    cap = cache.budget.cap
    if cap is not None and result.total_bytes > cap:
        raise CacheFull(f"{name} is {result.total_bytes} bytes, more than the cache cap of "
                        f"{cap}; mount it instead (a mount streams models larger than its cap)")
    if on_start:
        on_start(result.total_bytes)

    sources = _Sources(client)
    partials: list[PartialBlob] = []
    pinned: list[str] = []
    try:
        for layer in layers:
            cache.budget.pin(layer.digest)  # no layer of ours is evicted to make room
            pinned.append(layer.digest)
            if await cache.adopt_sealed(layer.digest, layer.size):
                result.cached_bytes += layer.size
                continue
            plan = await client.chunk_plan(name, layer, chunk_size)
            blob = cache.open_partial(layer.digest, layer.size, plan.chunks, check_whole=True)
            sources.urls[layer.digest] = plan.url
            result.cached_bytes += blob.cached_bytes()
            result.unverified_layers += not plan.chunk_digests
            partials.append(blob)
        progress(result.cached_bytes)

        async with _engine(engine, cache, client, concurrency, partials) as engine:
            fetch = _Fetch(engine, sources, concurrency, priority, progress, result)
            wanted = [(blob, i) for blob in partials for i in blob.missing()]
            if wanted:
                log.info("pulling %s: %d chunks to fetch, %d bytes already cached",
                         name, len(wanted), result.cached_bytes)
                await fetch.all(wanted)
            for blob in partials:
                try:
                    await blob.seal()
                except LandedChunksBad as exc:  # fetched again, each checked on its own (logged)
                    await cache.budget.resync()  # their room was given back
                    await fetch.all([(blob, i) for i in exc.indexes])
                    await blob.seal()
        missing = [layer.digest for layer in layers if not cache.is_sealed(layer.digest,
                                                                           layer.size)]
        if missing:
            raise CacheFull(f"blob {missing[0]} is not complete in the cache; not writing the "
                            f"manifest")
    finally:
        for digest in pinned:
            cache.budget.unpin(digest)
        for blob in partials:
            cache.release(blob)
    # last, atomically, and off the loop (it fsyncs)
    await trio.to_thread.run_sync(cache.store.write_manifest, name.store_parts, manifest.raw)
    return result


@contextlib.asynccontextmanager
async def _engine(engine: FetchEngine | None, cache: BlobCache, client: RegistryClient,
                  concurrency: int, partials: list[PartialBlob]):
    """The engine given, or one of the pull's own for as long as the pull fetches: its
    workers are its concurrency, its in-flight bytes that many of its largest chunks."""
    if engine is not None:
        yield engine
        return
    largest = max((c.length for blob in partials for c in blob.chunks), default=1)
    with first_error():
        async with trio.open_nursery() as nursery:
            yield FetchEngine(cache, nursery, retry=client.config.retry, workers=concurrency,
                              max_inflight=max(1, concurrency) * largest)
            nursery.cancel_scope.cancel()  # its workers (what it fetched is recorded)


@dataclasses.dataclass
class _Fetch:
    engine: FetchEngine
    sources: _Sources
    concurrency: int
    priority: int
    progress: Progress
    result: PullResult

    async def all(self, wanted: list[tuple[PartialBlob, int]]) -> None:
        """Every chunk of `wanted` fetched, in order, `concurrency` at a time; then durable
        and recorded. The first chunk that fails for good ends the pull with its error."""
        slots = trio.Semaphore(max(1, self.concurrency))

        async def watch(blob: PartialBlob, i: int, flight) -> None:
            await self.engine.wait(flight)
            if flight.error is not None and not blob.fetched(i):
                # (its slot is not given back: the next chunk is not wanted before the
                # error has cancelled the pull; --concurrency 1 made one request too many)
                raise flight.error
            slots.release()
            length = blob.chunks[i].length
            self.result.fetched_bytes += length
            self.result.fetched_chunks += 1
            self.progress(length)

        try:
            with first_error():
                async with trio.open_nursery() as nursery:
                    for blob, i in wanted:
                        await slots.acquire()
                        flight = self.engine.want(self.sources, blob.digest, i, self.priority)
                        if flight is None:  # (in already)
                            slots.release()
                            continue
                        nursery.start_soon(watch, blob, i, flight)
        except BaseException:
            for blob, i in wanted:  # a shared engine does not go on with them
                self.engine.call_off(blob.digest, i)
            raise
        blobs = {id(blob): blob for blob, _ in wanted}.values()
        for blob in blobs:  # every chunk is fetched: make the last ones durable now
            blob.hurry()
        for blob, i in wanted:
            await blob.commit_chunk(i)  # (the engine's commit task does it; this waits)
            if self.sources.error is not None:
                raise self.sources.error
