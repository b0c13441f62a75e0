"""Caches left by a pull that stopped halfway: chunks recorded as LANDED (written by a pull
that checks the blob as a whole, never checked on their own), one of them damaged on disk."""

import functools
import os

import trio

from modelfs.cache.blobcache import BlobCache
from modelfs.cache.index import LANDED
from modelfs.fetcher.pull import pull

from . import faults as F


async def stopped_pull(reg, root, client, name: str, digest: str, landed: int = 8,
                       concurrency: int = 4, readers=None) -> BlobCache:
    """Pull `name` into a cache at `root`, stopped once `landed` chunks of `digest` are
    recorded as LANDED; returns that cache opened afresh (as after a restart), for a mount
    with `readers` (cache/readers.py), else for a pull.

    The server answers the first `landed` range requests of `digest` and holds the ones after
    them unanswered; the pull is stopped once those chunks are recorded and each of its
    `concurrency` workers waits on a held request. So every request it made has reached the
    server (is in `reg.faults.seen`) before this returns. (Stopped at some other moment, a
    request it had just sent could reach the app only later, and a test that counts the
    requests made after this returns would count it as one of its own.)"""
    cache = BlobCache(root, sync_interval=0.01)
    path = "/blobs/" + digest
    hold = F.Hold()
    rules = [reg.faults.add("GET", path, F.answer(), times=landed),
             reg.faults.add("GET", path, hold)]
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(pull, reg.name(name), client, cache,
                                                 concurrency=concurrency,
                                                 chunk_size=64 << 10))
            with trio.fail_after(30):
                while True:
                    stored = cache.index.load(digest)
                    if hold.held == concurrency and stored is not None and \
                            stored[2].count(LANDED) == landed:
                        break
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    finally:
        for rule in rules:
            reg.faults.rules.remove(rule)
        cache.close()
    # each range it asked for reached the server: the ones answered, the ones held
    assert len(reg.faults.ranges(digest)) == landed + concurrency
    return BlobCache(root, sync_interval=0.01, readers=readers)


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
