"""Where a chunk's bytes come from: the seam between the fetch path and the network.

The fetch path (fetcher/fetch.py) asks a `ChunkSource` for a byte range of a blob, received
into a cache buffer, and has the cache verify it (cache/partial.py `write_chunk`): no source
is trusted, a chunk is right wherever its bytes came from. What a source must do is answer
the range or raise one of the fetcher's errors (fetcher/errors.py), already classified:
temporary ones are retried by the one retry policy, the rest end the fetch.

Today the one source is the origin registry (`OriginSource`: its blob URL, received by the
data plane or httpx, each answer checked by fetcher/answer.py). Mirrors (a CDN, an nginx
edge, Dragonfly or Spegel, another host's `modelfs serve`) fit here as more sources for the
same registry paths, tried before the origin and demoted when they fail, without a change to
cache/.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

from .client import RegistryClient


class ChunkSource(Protocol):
    """What the fetch path relies on a source for, beyond the bytes:
    - it writes the bytes into `receiver.view` in order and calls `receiver.received(n)` as
      they come (that is what hashes them: a chunk never `received` never verifies);
    - it counts them into `receiver.arrived` as they come, at least every MiB (the readers'
      progress deadline sees nothing else);
    - when it receives in a thread that may outlive a cancelled fetch, it `abandon`s the
      buffer before raising, so the buffer is never handed to another fetch while the thread
      may still write into it (fetcher/client.py does, for the data plane)."""

    name: str  # for logs and errors: where the bytes came from

    async def fetch_into(self, start: int, end: int, blob_size: int, receiver) -> None:
        """Bytes [start, end) of the blob into `receiver` (cache/chunkbuf.py), or an error.
        One attempt; the caller retries."""


@dataclasses.dataclass(frozen=True)
class OriginSource:
    client: RegistryClient
    url: str  # the blob's URL at the registry (or where its chunk list said it is)

    @property
    def name(self) -> str:
        return self.url

    async def fetch_into(self, start: int, end: int, blob_size: int, receiver) -> None:
        await self.client.fetch_range_into(self.url, start, end, blob_size, receiver)
