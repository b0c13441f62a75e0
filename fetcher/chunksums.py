"""The chunksums body (protocol.md §4): whitespace-separated pairs `sha256:<hex> <start>-<end>`,
inclusive ends. Parsed strictly, then checked to tile the blob exactly (invariant 4).

The body is parsed as it arrives (`ChunksumsParser.feed`), a piece at a time, and grouped into
fetch units on the way (cache/units.py): nothing holds the whole body, nor a Python object per
registry chunk. What a chunk list costs in memory is then bounded by its number of chunks, and
that is bounded by configuration: at most `max_chunks` (MAX_CHUNKS, 2**21, by default), each
held as its 36 packed bytes (PART_BYTES) until the list is done: 72 MiB at most, 36 MiB for a
4 GiB blob in 4 KiB chunks, plus one piece of the body in flight (PARSE_STEP and below). With
fetch units off (`--fetch-unit 0`) every chunk is a Chunk of its own, some 250 bytes each.
A longer list is refused with BadChunkList as soon as it is seen to be longer; so is a body of
more than LINE_BYTES per chunk allowed (whitespace without end), or a token longer than any
valid one (a body without whitespace).

Speed: a mount's first read waits for the list. Each piece is split once into tokens, and the
tokens are checked and converted a column at a time (C-level maps over the digests and the
ranges of a piece, one regex match over all its ranges), with a token-by-token pass only to say
what is wrong with a piece that fails: 256 MiB in 4 KiB chunks (65,536 lines, 5.7 MiB) is
parsed and grouped in about 50 ms, where a regex over the whole body and a Chunk per line
took 190 ms.
"""

from __future__ import annotations

import binascii
import operator
import re

from modelfs.cache.chunks import MAX_CHUNK_BYTES, BadChunkList, Chunk, check_run
from modelfs.cache.units import PART_BYTES, UnitBuilder

MAX_CHUNKS = 1 << 21
LINE_BYTES = 128  # a line is some 90 bytes (at most 112 without extra whitespace)
_MAX_TOKEN = 80  # the longest valid token: 71 (a digest), 39 (a range of two 19-digit ints)
PARSE_STEP = 1 << 20  # bytes of body parsed at a time (by the client, in a worker thread)


def max_body_bytes(max_chunks: int = MAX_CHUNKS) -> int:
    return max_chunks * LINE_BYTES + (64 << 10)


_DIGEST_RE = re.compile(r"sha256[:-][0-9a-fA-F]{64}")  # (both forms, as parse_digest)
_RANGE_RE = re.compile(r"([0-9]+)-([0-9]+)")
_RANGES_RE = re.compile(rb"[0-9]+-[0-9]+(?: [0-9]+-[0-9]+)*")  # range tokens, joined by spaces
_PREFIXES = {b"sha256:", b"sha256-"}
_PREFIX, _HEX = operator.itemgetter(slice(0, 7)), operator.itemgetter(slice(7, None))
_PLUS_ONE = (1).__add__


class ChunksumsParser:
    """A chunksums body for a blob of `size` bytes, fed in pieces of any size (`feed`), as
    fetch units of up to `unit` bytes (0: the registry's chunks as they are) at the end
    (`finish`). Any error is a BadChunkList, raised as soon as the piece that shows it is fed
    (or by `finish`, for a list that ends too soon)."""

    def __init__(self, size: int, unit: int = 0, max_chunks: int = MAX_CHUNKS):
        self.size = size
        self.max_chunks = max_chunks
        self.max_bytes = max_body_bytes(max_chunks)
        self.chunks = 0  # registry chunks taken so far
        self.received = 0  # bytes of body fed so far
        self._units = UnitBuilder(unit)
        self._tail = b""  # the body after its last whitespace: a token that may go on
        self._digest: bytes | None = None  # a digest token whose range is still to come
        self._next = 0  # where the next chunk must start

    def feed(self, data) -> None:
        self.received += len(data)
        if self.received > self.max_bytes:
            raise BadChunkList(f"chunksums: body larger than {self.max_bytes} bytes (at most "
                               f"{self.max_chunks} chunks of {LINE_BYTES} bytes of text)")
        data = self._tail + bytes(data)
        if not data.isascii():
            raise BadChunkList("chunksums: body is not ASCII text")
        tokens = data.split()
        self._tail = tokens.pop() if tokens and not data[-1:].isspace() else b""
        if len(self._tail) > _MAX_TOKEN:
            tokens.append(self._tail)  # (refused below, with what it should have been)
            self._tail = b""
        self._take(tokens)

    def finish(self) -> list[Chunk]:
        """The fetch units, once the whole body was fed."""
        self._take([self._tail] if self._tail else [])
        self._tail = b""
        if self._digest is not None:
            raise BadChunkList(f"chunksums: missing chunk range for digest "
                               f"{self._digest[:80].decode()!r}")
        if self._next != self.size:
            raise BadChunkList(f"chunk list covers {self._next} of {self.size} bytes")
        return self._units.finish()

    def _take(self, tokens: list[bytes]) -> None:
        if self._digest is not None:
            tokens = [self._digest] + tokens
        self._digest = tokens.pop() if len(tokens) % 2 else None
        if self._digest is not None and len(self._digest) > _MAX_TOKEN:
            _refuse_digest(self._digest)
        digests, ranges = tokens[0::2], tokens[1::2]
        n = len(digests)
        if not n:
            return
        if self.chunks + n > self.max_chunks:
            raise BadChunkList(
                f"chunksums: more than {self.max_chunks} chunks for a blob of {self.size} "
                f"bytes; this client holds at most {self.max_chunks} ({PART_BYTES} bytes of "
                f"digests each in memory)")
        got = self._columns(digests, ranges)
        if got is None:
            got = self._one_by_one(digests, ranges)
        lengths, raws = got
        self._units.add(self._next, lengths, raws)
        self._next += sum(lengths)
        self.chunks += n

    def _columns(self, digests: list[bytes], ranges: list[bytes]):
        """(lengths, raw digests) of the pairs, if all of them are well formed chunks that
        follow one another from `_next` within the blob; None if any is not. (No Python
        code runs per pair here: C-level maps over each column.)"""
        if set(map(len, digests)) != {71} or not set(map(_PREFIX, digests)) <= _PREFIXES:
            return None
        try:
            raws = list(map(binascii.unhexlify, map(_HEX, digests)))
        except ValueError:  # (binascii.Error)
            return None
        joined = b" ".join(ranges)
        if _RANGES_RE.fullmatch(joined) is None:
            return None
        bounds = joined.replace(b"-", b" ").split()
        starts, nexts = list(map(int, bounds[0::2])), list(map(_PLUS_ONE, map(int, bounds[1::2])))
        if starts[0] != self._next or starts[1:] != nexts[:-1] or nexts[-1] > self.size:
            return None
        lengths = list(map(operator.sub, nexts, starts))
        if min(lengths) < 1 or max(lengths) > MAX_CHUNK_BYTES:
            return None
        return lengths, raws

    def _one_by_one(self, digests: list[bytes], ranges: list[bytes]):
        """As `_columns`, token by token: raises what is wrong, as the first wrong token or
        chunk in the body shows it."""
        chunks = []
        for token, text in zip(digests, ranges):
            digest = token.decode()
            if _DIGEST_RE.fullmatch(digest) is None:
                _refuse_digest(token)
            start, end = _parse_range(text.decode(), digest)
            if end - start > MAX_CHUNK_BYTES:
                raise BadChunkList(f"chunksums: chunk {start}-{end - 1} is {end - start} bytes, "
                                   f"more than the {MAX_CHUNK_BYTES} this client holds in memory")
            chunks.append(Chunk(start, end, "sha256:" + digest[7:].lower()))
        check_run(chunks, self.size, self._next, self.chunks, digests_checked=True)
        return [c.length for c in chunks], [bytes.fromhex(c.digest[7:]) for c in chunks]


def _refuse_digest(token: bytes) -> None:
    raise BadChunkList(f"chunksums: invalid digest {token[:80].decode()!r}")


def _parse_range(text: str, digest: str) -> tuple[int, int]:
    m = _RANGE_RE.fullmatch(text)
    if m is None:
        raise BadChunkList(f"chunksums: invalid chunk range {text[:40]!r} for digest {digest}")
    start, end = int(m.group(1)), int(m.group(2))
    if start > end:
        raise BadChunkList(f"chunksums: reversed chunk range {text[:40]!r} for digest {digest}")
    return start, end + 1


def parse_chunksums(body: bytes, size: int, unit: int = 0,
                    max_chunks: int = MAX_CHUNKS) -> list[Chunk]:
    """The chunk list in `body` for a blob of `size` bytes (as fetch units of up to `unit`
    bytes, if given), or BadChunkList."""
    parser = ChunksumsParser(size, unit, max_chunks)
    view = memoryview(body)
    for pos in range(0, len(body), PARSE_STEP):
        parser.feed(view[pos:pos + PARSE_STEP])
    return parser.finish()
