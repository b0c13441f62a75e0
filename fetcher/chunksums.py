"""The chunksums body (protocol.md §4): whitespace-separated pairs `sha256:<hex> <start>-<end>`,
inclusive ends. Parsed strictly, then checked to tile the blob exactly (invariant 4)."""

from __future__ import annotations

from modelfs.cache.chunks import MAX_CHUNK_BYTES, BadChunkList, Chunk, check_coverage
from modelfs.cache.digests import parse_digest
from modelfs.cache.errors import InvalidName

MAX_CHUNKSUMS_BYTES = 32 << 20


def _parse_range(text: str, digest: str) -> tuple[int, int]:
    first, sep, last = text.partition("-")
    if not sep or not first.isdigit() or not last.isdigit():
        raise BadChunkList(f"chunksums: invalid chunk range {text[:40]!r} for digest {digest}")
    start, end = int(first), int(last)
    if start > end:
        raise BadChunkList(f"chunksums: reversed chunk range {text[:40]!r} for digest {digest}")
    return start, end + 1


def parse_chunksums(body: bytes, size: int) -> list[Chunk]:
    """The chunk list in `body` for a blob of `size` bytes, or BadChunkList."""
    if len(body) > MAX_CHUNKSUMS_BYTES:
        raise BadChunkList(f"chunksums body larger than {MAX_CHUNKSUMS_BYTES} bytes")
    try:
        tokens = body.decode("ascii").split()
    except UnicodeDecodeError:
        raise BadChunkList("chunksums: body is not ASCII text") from None
    if len(tokens) % 2:
        raise BadChunkList(f"chunksums: missing chunk range for digest {tokens[-1][:80]!r}")
    chunks = []
    for i in range(0, len(tokens), 2):
        try:
            digest = parse_digest(tokens[i])
        except InvalidName:
            raise BadChunkList(f"chunksums: invalid digest {tokens[i][:80]!r}") from None
        start, end = _parse_range(tokens[i + 1], digest)
        if end - start > MAX_CHUNK_BYTES:
            raise BadChunkList(f"chunksums: chunk {start}-{end - 1} is {end - start} bytes, "
                               f"more than the {MAX_CHUNK_BYTES} this client holds in memory")
        chunks.append(Chunk(start, end, digest))
    return check_coverage(chunks, size)
