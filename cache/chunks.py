"""Chunk lists: the byte ranges a blob is fetched and verified in.

A chunk list is accepted only if its ranges are in order, contiguous, non-overlapping and cover
exactly [0, size) (invariant 4). `Chunk.end` is exclusive here; the wire format's inclusive end
is converted at the protocol boundary.
"""

from __future__ import annotations

from typing import NamedTuple

from .digests import parse_digest
from .errors import ModelfsError


# A chunk is held in memory while it is verified: the largest we accept bounds that memory.
MAX_CHUNK_BYTES = 64 << 20
DEFAULT_CHUNK_SIZE = 8 << 20


class BadChunkList(ModelfsError):
    """A chunk list that does not describe the blob exactly."""


class Chunk(NamedTuple):
    """(A named tuple, not a dataclass: a list of small chunks has tens of thousands, and a
    mount's first read waits for them to be made; a tuple is made three times as fast.)"""

    start: int
    end: int  # exclusive
    digest: str | None  # sha256:<hex>, or None when the registry gave no chunk digests
    # A fetch unit of several registry chunks: their lengths and digests, packed (units.py)
    parts: bytes | None = None

    @property
    def length(self) -> int:
        return self.end - self.start


def check_coverage(chunks: list[Chunk], size: int, digests_checked: bool = False) -> list[Chunk]:
    """Raise BadChunkList unless `chunks` tile [0, size) exactly, in order (and their digests
    are well formed, unless the caller checked them already)."""
    covered = check_run(chunks, size, digests_checked=digests_checked)
    if covered != size:
        raise BadChunkList(f"chunk list covers {covered} of {size} bytes")
    return chunks


def check_run(chunks: list[Chunk], size: int, expected: int = 0, first: int = 0,
              digests_checked: bool = False) -> int:
    """Where the chunks tile to: raise BadChunkList unless `chunks`, the chunks `first`,
    `first + 1`, ... of a list, follow one another from `expected` on, within [0, size) (a
    list read piece by piece is checked a run at a time: fetcher/chunksums.py)."""
    for i, chunk in enumerate(chunks, first):
        if chunk.start < expected:
            raise BadChunkList(
                f"chunk {i} ({chunk.start}-{chunk.end - 1}) overlaps or is out of order: "
                f"expected it to start at {expected}")
        if chunk.start > expected:
            raise BadChunkList(f"gap before chunk {i}: bytes {expected}-{chunk.start - 1} missing")
        if chunk.end <= chunk.start:
            raise BadChunkList(f"chunk {i} is empty or reversed ({chunk.start}-{chunk.end - 1})")
        if chunk.end > size:
            raise BadChunkList(f"chunk {i} ends at {chunk.end - 1}, past the blob size {size}")
        if chunk.digest is not None and not digests_checked:
            parse_digest(chunk.digest)
        expected = chunk.end
    return expected


def fixed_chunks(size: int, chunk_size: int) -> list[Chunk]:
    """Client-chosen ranges without digests, for registries that have no chunksums endpoint."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    return [Chunk(start, min(start + chunk_size, size), None) for start in range(0, size, chunk_size)]
