"""`modelfs pull`: every layer of a model into the cache, chunks concurrently, resumable.

Structure: one nursery per pull. A producer walks the missing chunks of every layer in file
order and feeds a bounded channel; `concurrency` workers each fetch a chunk (retrying temporary
failures) and hand it to the cache's single door (`PartialBlob.write_chunk`); a separate task
per chunk makes it durable and records it (`commit_chunk`, batched fsyncs). Chunks are taken in
file order so the sealer hashes them from the buffers they were received into. Any final error
cancels the whole pull; what was recorded stays in the cache for the next run. The manifest is
written last.

Each byte is hashed once. Nobody reads a blob before a pull has sealed it, so its chunks are
checked by the seal alone (`check_whole`, cache/partial.py), not also one by one as a mount's
must be: on a fast link the hashing is what limits a pull, and a second sha256 of every byte
would halve its speed. Only when the seal does not match is each chunk checked on its own; the
corrupt ones are fetched again (checked on their own) and the blob sealed again.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import trio

from modelfs.cache.blobcache import BlobCache
from modelfs.cache.errors import CacheFull, LandedChunksBad
from modelfs.cache.partial import PartialBlob

from .client import DEFAULT_CHUNK_SIZE, ChunkPlan, RegistryClient
from .fetch import fetch_chunk
from .groups import first_error
from .manifest import Manifest
from .names import ModelName
from .source import OriginSource

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
class _Job:
    blob: PartialBlob
    plan: ChunkPlan
    index: int


async def pull(name: ModelName, client: RegistryClient, cache: BlobCache, *,
               concurrency: int = 4, chunk_size: int = DEFAULT_CHUNK_SIZE,
               progress: Progress | None = None,
               on_start: Callable[[int], None] | None = None) -> PullResult:
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

    partials: list[tuple[PartialBlob, ChunkPlan]] = []
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
            result.cached_bytes += blob.cached_bytes()
            result.unverified_layers += not plan.chunk_digests
            partials.append((blob, plan))
        progress(result.cached_bytes)

        jobs = [_Job(blob, plan, i) for blob, plan in partials for i in blob.missing()]
        if jobs:
            log.info("pulling %s: %d chunks to fetch, %d bytes already cached",
                     name, len(jobs), result.cached_bytes)
            await _fetch_all(jobs, client, concurrency, progress, result)
        for blob, plan in partials:
            try:
                await blob.seal()
            except LandedChunksBad as exc:  # fetched again, each checked on its own (logged)
                await cache.budget.resync()  # their room was given back
                await _fetch_all([_Job(blob, plan, i) for i in exc.indexes], client,
                                 concurrency, progress, result)
                await blob.seal()
        missing = [layer.digest for layer in layers if not cache.is_sealed(layer.digest,
                                                                           layer.size)]
        if missing:
            raise CacheFull(f"blob {missing[0]} is not complete in the cache; not writing the "
                            f"manifest")
    finally:
        for digest in pinned:
            cache.budget.unpin(digest)
        for blob, _ in partials:
            cache.release(blob)
    # last, atomically, and off the loop (it fsyncs)
    await trio.to_thread.run_sync(cache.store.write_manifest, name.store_parts, manifest.raw)
    return result


async def _fetch_all(jobs: list[_Job], client: RegistryClient, concurrency: int,
                     progress: Progress, result: PullResult) -> None:
    send, receive = trio.open_memory_channel[_Job](0)

    async def produce():
        async with send:
            for job in jobs:
                await send.send(job)

    working = max(1, concurrency)

    async def work(receive, nursery):
        nonlocal working
        async with receive:
            async for job in receive:
                buf = await fetch_chunk(OriginSource(client, job.plan.url), job.blob,
                                        job.index, client.config.retry)
                job.blob.release_buffer(buf)
                # written and made durable in batches while this worker fetches the next chunk
                nursery.start_soon(job.blob.commit_chunk, job.index)
                length = job.blob.chunks[job.index].length
                result.fetched_bytes += length
                result.fetched_chunks += 1
                progress(length)
        working -= 1
        if working == 0:  # every chunk is fetched: make the last ones durable now
            for blob in {id(job.blob): job.blob for job in jobs}.values():
                blob.hurry()

    with first_error():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce)
            async with receive:
                for _ in range(working):
                    nursery.start_soon(work, receive.clone(), nursery)
