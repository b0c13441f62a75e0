"""What the fetch engine did, for `modelfs status` and the metrics page: bytes received per
blob (and their recent rate), and per source the fetches, bytes, retries, errors and chunks
that failed their digest.

The engine owns one `FetchStats` and tells it as things happen; readers of it (fs/status.py,
fetcher/metrics.py) only ask. A source is named by its origin (scheme://host:port), never by
its full URL: one label per registry or mirror, not one per blob.

Concurrency contract: trio thread only (the metrics page is generated on it too).
"""

from __future__ import annotations

import collections
import dataclasses
import urllib.parse

import trio

from modelfs.cache.errors import ChunkDigestMismatch

# The fetch rate is the bytes received over the last this many seconds.
RATE_WINDOW = 5.0


def source_label(url: str) -> str:
    """scheme://host[:port] of a URL: the name a source has in statistics."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.netloc else url


@dataclasses.dataclass
class SourceCounts:
    fetches: int = 0  # chunk fetches that succeeded from it
    bytes: int = 0  # bytes of those chunks
    retries: int = 0  # failed tries that were tried again
    errors: int = 0  # fetches that failed for good
    bad_chunks: int = 0  # tries whose chunk failed its digest (bytes damaged or a lie)


class FetchStats:
    def __init__(self) -> None:
        self.sources: dict[str, SourceCounts] = collections.defaultdict(SourceCounts)
        self.blob_bytes: dict[str, int] = collections.defaultdict(int)  # digest -> received
        self._recent: collections.deque[tuple[float, str, int]] = collections.deque()

    def fetched(self, source: str, digest: str, length: int) -> None:
        counts = self.sources[source]
        counts.fetches += 1
        counts.bytes += length
        self.blob_bytes[digest] += length
        now = trio.current_time()
        self._recent.append((now, digest, length))
        self._forget_before(now - RATE_WINDOW)

    def retried(self, source: str, exc: BaseException) -> None:
        counts = self.sources[source]
        counts.retries += 1
        counts.bad_chunks += isinstance(exc, ChunkDigestMismatch)

    def failed(self, source: str, exc: BaseException) -> None:
        counts = self.sources[source]
        counts.errors += 1
        counts.bad_chunks += isinstance(exc, ChunkDigestMismatch)

    def rate(self, digest: str | None = None) -> float:
        """Bytes per second received over the last RATE_WINDOW seconds (of one blob, or all)."""
        self._forget_before(trio.current_time() - RATE_WINDOW)
        total = sum(n for _, d, n in self._recent if digest is None or d == digest)
        return total / RATE_WINDOW

    def _forget_before(self, when: float) -> None:
        while self._recent and self._recent[0][0] < when:
            self._recent.popleft()
