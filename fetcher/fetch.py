"""The one fetch path of a chunk, for a pull and a mount alike: a landed chunk is checked from
the file first; else a try receives the chunk from its source into a cache buffer and puts it
through the cache's verifying door (`write_chunk`); temporary failures (a reset, a stall, a bad
range answer, a chunk that fails its digest) are tried again under the one retry policy
(fetcher/retry.py).

Concurrency contract: trio thread; the receiving runs in a worker thread inside the source.
Single-flight is the caller's (the materializer's flights, a pull's one job per chunk).
"""

from __future__ import annotations

from typing import Callable

from modelfs.cache.partial import PartialBlob

from .retry import RetryPolicy, retrying
from .source import ChunkSource


async def fetch_chunk(source: ChunkSource, blob: PartialBlob, index: int, retry: RetryPolicy,
                      watch: Callable[[object], None] | None = None,
                      on_retry: Callable[[BaseException], None] | None = None):
    """Fetch chunk `index` into a buffer of the cache and put it through the cache's verifying
    door, with retries. The chunk is verified (or, in a blob checked as a whole, landed for the
    seal to check); the caller has it written and made durable (`blob.commit_chunk`), so
    readers can be answered before either. A chunk that landed earlier is checked from the
    file instead, and fetched only if it fails. Returns the buffer holding its bytes, with a
    ref the caller gives back (`blob.release_buffer`). `watch` is shown each try's receiver
    (its `arrived` bytes are the fetch's progress); `on_retry` each failed try that is tried
    again."""
    chunk = blob.chunks[index]
    # in the file already (a pull that stopped), never checked alone: checked from the file
    buf = await blob.verify_landed(index)
    if buf is not None:
        return buf

    async def once():
        receiver = blob.receiver(index)
        if watch is not None:
            watch(receiver)
        try:
            await source.fetch_into(chunk.start, chunk.end, blob.size, receiver)
            await blob.write_chunk(index, receiver)
        except BaseException:
            blob.release_buffer(receiver.buf)
            raise
        return receiver.buf

    return await retrying(once, retry, f"chunk {index} ({chunk.start}-{chunk.end - 1}) of "
                          f"{blob.digest[:19]} from {source.name}", on_retry)
