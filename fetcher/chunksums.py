"""The chunksums body (protocol.md §4): whitespace-separated pairs `sha256:<hex> <start>-<end>`,
inclusive ends. Parsed strictly, then checked to tile the blob exactly (invariant 4)."""

from __future__ import annotations

import re

from modelfs.cache.chunks import MAX_CHUNK_BYTES, BadChunkList, Chunk, check_coverage

MAX_CHUNKSUMS_BYTES = 32 << 20


# A list of small chunks is long (256 MiB in 4 KiB chunks: 65,536 lines), and a mount's first
# read waits for it: one pass of one pattern over the body, and no second pass over the
# digests, parse it in a few hundredths of a second.
_DIGEST_RE = re.compile(r"sha256[:-][0-9a-fA-F]{64}")  # (both forms, as parse_digest)
_RANGE_RE = re.compile(r"([0-9]+)-([0-9]+)")
# a whole pair of whole tokens (not a part of a longer one), found in one pass over the body
_PAIR_RE = re.compile(r"(?<!\S)sha256[:-]([0-9a-fA-F]{64})\s+([0-9]+)-([0-9]+)(?!\S)")


def _parse_range(text: str, digest: str) -> tuple[int, int]:
    m = _RANGE_RE.fullmatch(text)
    if m is None:
        raise BadChunkList(f"chunksums: invalid chunk range {text[:40]!r} for digest {digest}")
    start, end = int(m.group(1)), int(m.group(2))
    if start > end:
        raise BadChunkList(f"chunksums: reversed chunk range {text[:40]!r} for digest {digest}")
    return start, end + 1


def parse_chunksums(body: bytes, size: int) -> list[Chunk]:
    """The chunk list in `body` for a blob of `size` bytes, or BadChunkList."""
    if len(body) > MAX_CHUNKSUMS_BYTES:
        raise BadChunkList(f"chunksums body larger than {MAX_CHUNKSUMS_BYTES} bytes")
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:
        raise BadChunkList("chunksums: body is not ASCII text") from None
    tokens = text.split()
    if len(tokens) % 2:
        raise BadChunkList(f"chunksums: missing chunk range for digest {tokens[-1][:80]!r}")
    pairs = _PAIR_RE.findall(text)
    if 2 * len(pairs) != len(tokens):  # some token is not what it should be: say which
        _refuse_token(tokens)
    chunks = []
    for hexd, first, last in pairs:
        start, end = int(first), int(last) + 1
        if start >= end:
            raise BadChunkList(f"chunksums: reversed chunk range {first}-{last} for digest "
                               f"sha256:{hexd}")
        if end - start > MAX_CHUNK_BYTES:
            raise BadChunkList(f"chunksums: chunk {start}-{end - 1} is {end - start} bytes, "
                               f"more than the {MAX_CHUNK_BYTES} this client holds in memory")
        chunks.append(Chunk(start, end, "sha256:" + hexd.lower()))  # (parse_digest's form)
    return check_coverage(chunks, size, digests_checked=True)


def _refuse_token(tokens: list[str]) -> None:
    for i in range(0, len(tokens), 2):
        if _DIGEST_RE.fullmatch(tokens[i]) is None:
            raise BadChunkList(f"chunksums: invalid digest {tokens[i][:80]!r}")
        _parse_range(tokens[i + 1], tokens[i])
    raise BadChunkList("chunksums: not pairs of a digest and a range")
