"""Caches left by a pull that stopped halfway: chunks recorded as LANDED (written by a pull
that checks the blob as a whole, never checked on their own), one of them damaged on disk."""

import functools
import os

import trio

from modelfs.cache.blobcache import BlobCache
from modelfs.cache.index import LANDED
from modelfs.fetcher.pull import pull


async def stopped_pull(reg, root, client, name: str, digest: str, landed: int = 8) -> BlobCache:
    """Pull `name` into a cache at `root`, stopped once `landed` chunks of `digest` are
    recorded as LANDED; returns that cache opened afresh (as after a restart)."""
    cache = BlobCache(root, sync_interval=0.01)
    reg.faults.delay = 0.02
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(pull, reg.name(name), client, cache,
                                                 chunk_size=64 << 10))
            with trio.fail_after(30):
                while True:
                    stored = cache.index.load(digest)
                    if stored is not None and stored[2].count(LANDED) >= landed:
                        break
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    finally:
        reg.faults.delay = 0
        cache.close()
    return BlobCache(root, sync_interval=0.01)


def corrupt_a_landed_chunk(cache: BlobCache, digest: str):
    """Damage one LANDED chunk of `digest` in its partial file (as a disk or a crash may).
    Returns (chunks, presence as the index had it, index of the damaged chunk)."""
    _, chunks, present = cache.index.load(digest)
    landed = [i for i, p in enumerate(present) if p == LANDED]
    assert len(landed) >= 2 and 0 in present  # stopped halfway
    bad = landed[len(landed) // 2]
    path = cache.partial_dir / ("sha256-" + digest[7:] + ".partial")
    with open(path, "r+b") as f:
        f.seek(chunks[bad].start + 100)
        f.write(b"\xff" * 64)
        f.flush()
        os.fsync(f.fileno())
    return chunks, present, bad
