"""The chunk list parsed as it arrives (fetcher/chunksums.py): the same result whatever the
pieces, every malformed list refused, and a list of a million chunks parsed in bounded memory."""

from __future__ import annotations

import hashlib
import json
import random
import struct
import time
import subprocess
import sys

import httpx
import pytest

from modelfs.cache.chunks import BadChunkList, Chunk, check_coverage
from modelfs.cache.units import PART_BYTES, UnitBuilder, group_units, part_lengths
from modelfs.fetcher.chunksums import ChunksumsParser, parse_chunksums
from modelfs.fetcher.client import ClientConfig, RegistryClient
from modelfs.fetcher.manifest import Layer
from modelfs.fetcher.names import parse_name

MiB = 1 << 20


def hexd(i: int) -> str:
    return hashlib.sha256(i.to_bytes(8, "big")).hexdigest()


def reference(body: bytes, size: int) -> list[Chunk]:
    """The chunk list by the protocol's own words (whitespace-separated pairs), one token at
    a time: what the fast parser must agree with."""
    tokens = body.decode("ascii").split()
    assert len(tokens) % 2 == 0
    chunks = []
    for digest, rng in zip(tokens[0::2], tokens[1::2]):
        assert digest[:7] in ("sha256:", "sha256-") and len(digest) == 71
        int(digest[7:], 16)
        first, last = rng.split("-")
        chunks.append(Chunk(int(first), int(last) + 1, "sha256:" + digest[7:].lower()))
    return check_coverage(chunks, size)


def random_list(rng: random.Random, count: int) -> tuple[bytes, int]:
    """A valid chunk list of `count` chunks of mixed sizes (a few as large as a unit), in
    both digest forms, either case, with odd whitespace between tokens."""
    lines, pos = [], 0
    spaces = [" ", "\t", "  ", " \t "]
    ends = ["\n", "\r\n", "\n\n", " ", "\t\n"]
    for i in range(count):
        length = rng.choice([1, 7, 4096, 4096, 65536, rng.randrange(1, 300_000), 4 * MiB,
                             5 * MiB])
        d = hexd(i)
        d = d.upper() if rng.random() < 0.1 else d
        sep = "-" if rng.random() < 0.2 else ":"
        lines.append(f"sha256{sep}{d}{rng.choice(spaces)}{pos}-{pos + length - 1}"
                     f"{rng.choice(ends)}")
        pos += length
    return "".join(lines).encode(), pos


def feed_in_pieces(body: bytes, size: int, unit: int, rng: random.Random) -> list[Chunk]:
    parser = ChunksumsParser(size, unit)
    pos = 0
    while pos < len(body):
        step = rng.choice([1, 2, 13, 71, 72, 100, 4096, 65536, len(body)])
        parser.feed(body[pos:pos + step])
        pos += step
    return parser.finish()


@pytest.mark.parametrize("seed", range(8))
def test_streaming_parse_equals_one_shot_parse(seed):
    rng = random.Random(seed)
    body, size = random_list(rng, rng.choice([1, 2, 50, 3000]))
    chunks = parse_chunksums(body, size)
    assert chunks == reference(body, size)
    for unit in (0, 64 << 10, 4 * MiB):
        one_shot = group_units(chunks, unit)
        assert parse_chunksums(body, size, unit) == one_shot
        assert feed_in_pieces(body, size, unit, rng) == one_shot
        assert feed_in_pieces(body, size, unit, rng) == one_shot


def test_units_built_in_runs_equal_units_grouped_at_once():
    rng = random.Random(5)
    body, size = random_list(rng, 4000)
    chunks = parse_chunksums(body, size)
    builder = UnitBuilder(4 * MiB)
    i = 0
    while i < len(chunks):
        run = chunks[i:i + rng.randrange(1, 300)]
        builder.add(run[0].start, [c.length for c in run],
                    [bytes.fromhex(c.digest[7:]) for c in run])
        i += len(run)
    units = builder.finish()
    assert units == group_units(chunks, 4 * MiB)
    assert sum(len(part_lengths(u)) for u in units) == len(chunks)
    check_coverage(units, size)


def three_lines() -> tuple[bytes, int]:
    lines = [f"sha256:{hexd(i)} {i * 4096}-{i * 4096 + 4095}\n" for i in range(3)]
    return "".join(lines).encode(), 3 * 4096


def test_a_list_cut_anywhere_is_refused():
    body, size = three_lines()
    for cut in range(len(body) - 1):  # (cutting only the final newline leaves it whole)
        for unit in (0, 4 * MiB):
            with pytest.raises(BadChunkList):
                parse_chunksums(body[:cut], size, unit)
            with pytest.raises(BadChunkList):
                feed_in_pieces(body[:cut], size, unit, random.Random(cut))
    assert len(parse_chunksums(body[:-1], size)) == 3


@pytest.mark.parametrize("cut, match", [
    (-30, "missing chunk range for digest 'sha256:"),  # in the middle of the last digest
    (-15, "missing chunk range"),  # right after it
    (-4, "reversed chunk range"),  # 8192-8 of 8192-12287
    (-1 - len("12287"), "invalid chunk range"),  # 8192-
])
def test_a_list_cut_mid_line_says_what_is_missing(cut, match):
    body, size = three_lines()
    body = body.rstrip()
    if cut == -15:
        body = body[:body.rindex(b" ")]
    else:
        body = body[:cut]
    with pytest.raises(BadChunkList, match=match):
        parse_chunksums(body, size)


def big_list(count: int, step: int = 4096) -> list[bytes]:
    lines = [f"sha256:{hexd(i)} {i * step}-{i * step + step - 1}\n" for i in range(count)]
    return [line.encode() for line in lines]


@pytest.mark.parametrize("where, line, match", [
    (30_000, b"sha256:" + b"g" * 64 + b" 0-1", "invalid digest 'sha256:ggg"),
    (30_000, None, "gap before chunk 30000"),
    (40_000, b"sha256:" + b"0" * 64 + b" 1-2-3", "invalid chunk range '1-2-3'"),
    (40_000, b"sha256:" + b"0" * 64 + b" 1_0-20", "invalid chunk range"),
    (40_000, b"sha256:" + b"0" * 64 + b" +5-20", "invalid chunk range"),
    (50_000, b"md5:" + b"0" * 32 + b" 0-1", "invalid digest 'md5"),
    (50_000, "sha256:" + hexd(0) + " 204800000-204804095 \xe9", "not ASCII"),
    (59_999, f"sha256:{hexd(0)} {59_999 * 4096}-{60_000 * 4096}", "past the blob size"),
])
def test_a_bad_line_deep_in_a_long_list_is_named(where, line, match):
    """(A piece that fails the column-wise checks is gone through token by token, to say
    which token or chunk is wrong: the index counts from the start of the whole list.)"""
    lines = big_list(60_000)
    if line is None:
        del lines[where]
    else:
        lines[where] = (line.encode("latin-1") if isinstance(line, str) else line) + b"\n"
    with pytest.raises(BadChunkList, match=match):
        parse_chunksums(b"".join(lines), 60_000 * 4096, 4 * MiB)


def test_too_many_chunks_are_refused_as_soon_as_seen():
    lines = big_list(5000, step=1)
    parser = ChunksumsParser(5000, 4 * MiB, max_chunks=4096)
    with pytest.raises(BadChunkList, match="more than 4096 chunks for a blob of 5000 bytes"):
        for line in lines:  # (long before the end of the list)
            parser.feed(line)
    assert parser.chunks <= 4096 and parser.received < 5000 * len(lines[0])


def test_a_body_without_end_is_refused_in_bounded_memory():
    parser = ChunksumsParser(4096, 4 * MiB, max_chunks=1000)
    with pytest.raises(BadChunkList, match="body larger than"):
        while True:  # whitespace without end
            parser.feed(b" " * 65536)
    assert parser.received <= parser.max_bytes + 65536
    parser = ChunksumsParser(4096)
    with pytest.raises(BadChunkList, match="invalid digest 'aaaa"):
        parser.feed(b"a" * 1000)  # a token longer than any valid one, before it ends
    parser = ChunksumsParser(4096)
    parser.feed(f"sha256:{hexd(0)} ".encode())
    with pytest.raises(BadChunkList, match="invalid chunk range '0000"):
        parser.feed(b"0" * 1000)


MILLION = 1 << 20
MILLION_PEAK = 48 * MiB  # what the parse of a million chunks may add to the RSS (36 MiB parts)

_MILLION_SCRIPT = """
import hashlib, json, sys, time
from modelfs.fetcher.chunksums import ChunksumsParser
MILLION, step = 1 << 20, 4096
digests = [hashlib.sha256(i.to_bytes(8, "big")).hexdigest() for i in range(1024)]

def pieces():  # the text, 8,192 lines at a time: no blob, no whole body
    for first in range(0, MILLION, 8192):
        yield "".join(f"sha256:{digests[i % 1024]} {i * step}-{i * step + step - 1}\\n"
                      for i in range(first, first + 8192)).encode()

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith(key))

parser = ChunksumsParser(MILLION * step, 4 << 20)
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak RSS starts again from here
except OSError:
    pass
before, t = status("VmRSS:"), time.perf_counter()
for piece in pieces():
    parser.feed(piece)
units = parser.finish()
elapsed, peak = time.perf_counter() - t, status("VmHWM:")
json.dump({"seconds": elapsed, "added": peak - before, "chunks": parser.chunks,
           "received": parser.received, "units": [[u.start, u.end, u.parts.hex()]
                                                  for u in units[776:778]],
           "count": len(units), "lengths": sorted({u.length for u in units}),
           "covered": units[-1].end}, sys.stdout)
"""


def test_a_million_chunk_list_is_parsed_streaming_in_bounded_memory():
    """A 4 GiB blob in 4 KiB chunks: 1,048,576 lines (98 MB of text), generated a piece at a
    time; the parse holds 36 bytes per chunk, packed in the parts of 1,024 units, and one
    piece of text. Measured in a process of its own: what the parse adds to its peak RSS."""
    out = subprocess.run([sys.executable, "-c", _MILLION_SCRIPT], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    print(f"a million chunks: parsed in {got['seconds']:.2f} s, "
          f"{got['added'] / MiB:.1f} MiB added to the peak RSS")
    assert got["chunks"] == MILLION and got["received"] > 90_000_000
    assert got["count"] == 1024 and got["lengths"] == [4 * MiB]
    assert got["covered"] == MILLION * 4096
    start, end, parts = got["units"][1]
    assert (start, end) == (777 * 4 * MiB, 778 * 4 * MiB)
    parts = bytes.fromhex(parts)
    assert len(parts) == 1024 * PART_BYTES
    length, raw = struct.unpack_from(">I32s", parts, 5 * PART_BYTES)
    assert (length, raw.hex()) == (4096, hexd(5))
    assert got["added"] < MILLION_PEAK


def test_a_list_over_the_chunk_limit_is_refused():
    """The error path of the same bound: a list of one chunk more than the configured
    number, for a blob of that many bytes."""
    limit = 1 << 16
    body = b"".join(big_list(limit + 1, step=1))
    with pytest.raises(BadChunkList, match=f"more than {limit} chunks"):
        parse_chunksums(body, limit + 1, 4 * MiB, max_chunks=limit)
    assert len(parse_chunksums(body, limit + 1, 4 * MiB, max_chunks=limit + 1)) == 1


class Streamed(httpx.AsyncByteStream):
    def __init__(self, pieces: list[bytes]):
        self.pieces = pieces

    async def __aiter__(self):
        for piece in self.pieces:
            yield piece


def chunksums_server(pieces: list[bytes]):
    def handler(request):
        if "/chunksums/" in request.url.path:
            return httpx.Response(200, stream=Streamed(pieces))  # piece by piece
        raise AssertionError(request.url)
    return handler


async def plan_of(pieces: list[bytes], size: int, **config):
    async with RegistryClient(ClientConfig(**config),
                              transport=httpx.MockTransport(chunksums_server(pieces))) as client:
        layer = Layer("application/vnd.ollama.image.model", "sha256:" + "1" * 64, size)
        return await client.chunk_plan(parse_name("m"), layer, chunk_size=4096)


async def test_the_client_parses_a_streamed_list_as_it_comes():
    lines = big_list(70_000)  # 6.4 MB: several pieces parsed in a worker thread
    size = 70_000 * 4096
    body = b"".join(lines)
    cuts = sorted(random.Random(1).sample(range(1, len(body)), 300))
    pieces = [body[a:b] for a, b in zip([0] + cuts, cuts + [len(body)])]
    plan = await plan_of(pieces, size)
    assert plan.chunks == group_units(parse_chunksums(body, size), 4 * MiB)
    assert len(plan.chunks) == -(-size // (4 * MiB))
    with pytest.raises(BadChunkList, match="reversed chunk range '286715904-2867199'"):
        await plan_of(lines[:-1] + [lines[-1][:-3]], size)  # cut in its last line
    with pytest.raises(BadChunkList, match="covers 286715904 of 286720000"):
        await plan_of(lines[:-1], size)
    with pytest.raises(BadChunkList, match="more than 60000 chunks"):
        await plan_of(pieces, size, max_chunks=60_000)
    with pytest.raises(BadChunkList, match="body larger than 193536 bytes"):
        await plan_of(pieces, size, max_chunks=1000)  # (told by the text's length first)
