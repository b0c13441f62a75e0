"""Seals of a mount's complete blobs: when to seal, once at a time, and what a failure means.

When the last chunk of a blob is recorded (or a blob is found complete but not sealed after a
restart), `soon(blob)` starts one seal task in the mount's nursery; asking again while it runs
gives the same event. The whole-blob hash waits while the blob is being read (cache/readers.py):
on a cold sequential read it took the CPU the reader waited for (measured: a 2 GiB cold read
4.9 s instead of 5.5 s, alternating runs). It catches up when the readers pause, in the cache's
low-priority thread, or after SEAL_PATIENCE whatever they do; a blob without chunk digests,
whose readers wait for this very seal, does not wait.

Failures:
- landed chunks found corrupt, or a chunk dropped meanwhile (LandedChunksBad,
  SealInterrupted): the blob is not complete any more; sealed again when it is.
- the chunk list lied (SealMismatch): the cache drops the blob; reads are refused for
  `quarantine_seconds` (`check`), then it is fetched again from scratch.
- anything else (an I/O error): logged, and tried again by the next `soon` after a backoff
  that doubles up to a minute, so a complete blob is not left unsealed for the mount's life.

Concurrency contract: trio thread only. One seal per blob object at a time: a seal is tied to
the blob object it seals (the cache owns which object is current), so a blob replaced
meanwhile gets a seal of its own. At unmount `finish` waits for the seals in progress.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import trio

from modelfs.cache.blobcache import BlobCache
from modelfs.cache.errors import LandedChunksBad, ModelfsError, SealInterrupted, SealMismatch
from modelfs.cache.partial import PartialBlob

from .memcache import MemoryCache

log = logging.getLogger(__name__)

# The sealer waits while a blob has been read from in the last `readers.quiet` seconds, but a
# complete blob is sealed after this many seconds whatever its readers do.
SEAL_PATIENCE = 30.0
RETRY_FIRST, RETRY_MAX = 1.0, 60.0  # backoff after a seal failed for another reason


class Quarantined(ModelfsError):
    """A blob whose seal failed recently; not served until it is fetched again."""


@dataclasses.dataclass(eq=False)
class _Seal:
    blob: PartialBlob
    done: trio.Event = dataclasses.field(default_factory=trio.Event)
    error: BaseException | None = None


@dataclasses.dataclass
class _Failures:
    quarantined_until: float = 0.0
    retry_at: float = 0.0  # after an error of another kind
    backoff: float = 0.0  # of the last retry (0: none yet)


class BlobSeals:
    def __init__(self, cache: BlobCache, nursery: trio.Nursery, memory: MemoryCache, *,
                 quarantine_seconds: float = 30.0,
                 on_sealed: Callable[[str], None] | None = None):
        self._cache, self._nursery, self._memory = cache, nursery, memory
        self._readers = cache.readers
        self._quarantine_seconds = quarantine_seconds
        self._on_sealed = on_sealed or (lambda digest: None)
        self._seals: dict[str, _Seal] = {}  # digest -> its last seal
        self._failures: dict[str, _Failures] = {}

    def check(self, digest: str) -> None:
        """Raise Quarantined while blob `digest` may not be served."""
        failures = self._failures.get(digest)
        if failures is not None and failures.quarantined_until > trio.current_time():
            raise Quarantined(f"blob {digest[:19]} failed its seal recently; not served until "
                              f"it is fetched again")

    def error(self, digest: str) -> BaseException | None:
        """Why the last seal of `digest` failed (None if it did not, or none ran)."""
        seal = self._seals.get(digest)
        return None if seal is None else seal.error

    def soon(self, blob: PartialBlob) -> trio.Event:
        """The seal of `blob` (complete), started now unless one runs for it or failed with an
        I/O error too recently; an event set when it ends."""
        seal = self._seals.get(blob.digest)
        if seal is not None and seal.blob is blob and (not seal.done.is_set() or blob.sealed):
            return seal.done
        failures = self._failures.get(blob.digest)
        if seal is not None and seal.blob is blob and failures is not None and \
                failures.retry_at > trio.current_time():
            return seal.done  # (ended, with that error)
        seal = self._seals[blob.digest] = _Seal(blob)
        self._nursery.start_soon(self._seal, seal)
        return seal.done

    async def finish(self) -> None:
        """Wait for the seals in progress (at unmount, so complete blobs are not left to be
        read back and hashed again by the next mount)."""
        for seal in list(self._seals.values()):
            await seal.done.wait()

    async def _seal(self, seal: _Seal) -> None:
        blob, digest = seal.blob, seal.blob.digest
        try:
            # The readers first, unless they wait for this very seal (a blob without chunk
            # digests is served only once sealed), and not for ever.
            patience = trio.current_time() + SEAL_PATIENCE
            while blob.has_chunk_digests and self._readers.active(digest) and \
                    trio.current_time() < patience:
                await trio.sleep(self._readers.quiet)
            await blob.seal()
            self._failures.pop(digest, None)
            self._memory.drop(digest)  # read from blobs/ from now on
            self._on_sealed(digest)
        except (LandedChunksBad, SealInterrupted) as exc:
            # chunks a stopped pull left unchecked were corrupt (dropped, fetched when wanted),
            # or a reader dropped one meanwhile: sealed when complete again
            seal.error = exc
            log.warning("sealing %s: %s", digest[:19], exc)
        except SealMismatch as exc:
            # The chunk list lied: distrust it, refuse reads for a while, then start over
            # (the next read asks the registry for the chunk list again).
            seal.error = exc
            self._cache.drop(blob)
            failures = self._failures.setdefault(digest, _Failures())
            failures.quarantined_until = trio.current_time() + self._quarantine_seconds
            self._memory.drop(digest)
        except Exception as exc:
            seal.error = exc
            failures = self._failures.setdefault(digest, _Failures())
            failures.backoff = min(failures.backoff * 2, RETRY_MAX) or RETRY_FIRST
            failures.retry_at = trio.current_time() + failures.backoff
            log.exception("sealing %s failed; tried again on a read after %.1f s", digest[:19],
                          failures.backoff)
        finally:
            seal.done.set()
