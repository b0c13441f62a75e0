"""Fetch units: the registry's chunks, grouped to a size we choose.

The registry chooses its chunks, and they are what a byte is verified against (one sha256 per
range). What we fetch, and keep state, buffers and index rows for, is ours to choose: adjacent
chunks smaller than FETCH_UNIT are grouped into units of up to that many bytes, fetched with one
range GET; a chunk of that size or more is a unit alone, exactly as the registry gave it (so the
common lists of 8 MiB chunks are what they always were). Work and memory per byte then stay the
same whatever size the registry picked: before units, 256 MiB in 4 KiB chunks took 45,000 range
GETs, a 1 MiB buffer per 4 KiB chunk in flight (12.9 GB) and over two minutes.

A unit of several chunks carries their lengths and raw digests packed (`Chunk.parts`) and a
digest of its own: the sha256 of that packing. `UnitHasher` hashes a unit's bytes chunk by chunk,
cut at the chunks' boundaries, and gives the same kind of digest, so a unit's bytes match its
digest exactly when every chunk in it matches its own (and everything that compares a chunk's
digest with the bytes' works for units unchanged). Invariant 1 holds per registry chunk: no
byte of a unit is served before the whole unit matched.

`UnitBuilder` groups a chunk list as it is read (fetcher/chunksums.py parses the registry's list
piece by piece): until its unit is complete a chunk is held only as its 36 packed bytes, so a
list of a million 4 KiB chunks costs some 36 MiB, not a Python object per chunk.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import itertools
import struct
import threading

from .chunks import Chunk

# Bytes of registry chunks fetched together at most. Large enough that the per-request and
# per-unit costs are small against the transfer (1 MiB units spent a fifth of a core on them
# at loopback speed), small enough that a reader's first miss does not wait long for bytes it
# does not want yet.
FETCH_UNIT = 4 << 20

_PART = struct.Struct(">I32s")  # a chunk's length and raw sha256
PART_BYTES = _PART.size  # what a registry chunk in a unit costs in memory and in the index
_DOMAIN = b"modelfs fetch unit 1\n"  # a unit's digest is never a digest of plain bytes

# Units of chunks smaller than this are hashed by one thread at a time. hashlib lets go of the
# GIL for every call on 2 KiB or more, and a 4 KiB chunk is hashed in a few microseconds: with
# four fetch threads each hashing its unit, most of the time went to handing the GIL back and
# forth (256 MiB in 4 KiB chunks, four threads on two cores: 0.27-0.40 s and 0.43-0.63 s of
# CPU, against 0.24 s and 0.24 s one at a time, 0.16 s for the same bytes as whole chunks).
# Larger chunks hash faster in parallel (64 KiB: 0.09 s against 0.17 s one at a time).
SERIAL_PART_BYTES = 16 << 10
_SERIAL = threading.Lock()


def _unit_digest(parts: bytes) -> str:
    return "sha256:" + hashlib.sha256(_DOMAIN + parts).hexdigest()


class UnitBuilder:
    """Fetch units of up to `unit` bytes made from a checked chunk list as it is read: `add`
    the chunks in runs, in order, then `finish`. Chunks of `unit` bytes or more, and all of
    them with `unit` 0, stay as they are; so do chunks without digests (`add_plain`)."""

    def __init__(self, unit: int = FETCH_UNIT):
        self.unit = unit
        self.units: list[Chunk] = []
        self._start = 0  # where the run of chunks being grouped starts
        self._lengths: list[int] = []
        self._raws: list[bytes] = []  # their raw digests
        self._bytes = 0

    def add(self, start: int, lengths: list[int], raws: list[bytes]) -> None:
        """Chunks that follow those added before: the first at `start`, their `lengths` and
        their raw sha256 digests (32 bytes each)."""
        unit, i, n = self.unit, 0, len(lengths)
        ends = list(itertools.accumulate(lengths, initial=start))  # ends[i]: where chunk i starts
        while i < n:
            # the chunks from i on that fit in the unit being made
            j = bisect.bisect_right(ends, ends[i] + unit - self._bytes, i) - 1
            if j > i:
                if not self._lengths:
                    self._start = ends[i]
                self._lengths += lengths[i:j]
                self._raws += raws[i:j]
                self._bytes += ends[j] - ends[i]
                i = j
            if i < n:  # chunk i does not fit in the unit being made
                if self._lengths:
                    self._flush()
                else:  # a unit alone
                    self.units.append(Chunk(ends[i], ends[i + 1], "sha256:" + raws[i].hex()))
                    i += 1

    def add_plain(self, chunk: Chunk) -> None:
        self._flush()
        self.units.append(chunk)

    def finish(self) -> list[Chunk]:
        self._flush()
        return self.units

    def _flush(self) -> None:
        lengths, raws = self._lengths, self._raws
        end = self._start + self._bytes
        if len(lengths) == 1:
            self.units.append(Chunk(self._start, end, "sha256:" + raws[0].hex()))
        elif lengths:
            parts = b"".join(map(_PART.pack, lengths, raws))
            self.units.append(Chunk(self._start, end, _unit_digest(parts), parts))
        self._lengths, self._raws, self._bytes = [], [], 0


def group_units(chunks: list[Chunk], unit: int = FETCH_UNIT) -> list[Chunk]:
    """`chunks` (a checked chunk list) as fetch units of up to `unit` bytes. Chunks without
    digests (client-chosen ranges) and chunks of `unit` bytes or more stay as they are; with
    `unit` 0 all of them do."""
    if unit <= 0:
        return chunks
    builder = UnitBuilder(unit)
    for chunk in chunks:
        if chunk.digest is None:
            builder.add_plain(chunk)
        else:
            builder.add(chunk.start, [chunk.length], [bytes.fromhex(chunk.digest[7:])])
    return builder.finish()


def _registry_chunks(units: list[Chunk]):
    """(start, length, raw digest or None) of each registry chunk under `units`."""
    for unit in units:
        if unit.parts is None:
            raw = bytes.fromhex(unit.digest[7:]) if unit.digest is not None else None
            yield unit.start, unit.length, raw
            continue
        start = unit.start
        for length, raw in _PART.iter_unpack(unit.parts):
            yield start, length, raw
            start += length


def same_registry_chunks(a: list[Chunk], b: list[Chunk]) -> bool:
    """Whether two unit lists group the same registry chunks (the same list, fetched with
    another --fetch-unit, or stored before units): then cached units of one are as good as
    the other's, and nothing needs to start over."""
    if a == b:
        return True
    if a[-1].end != b[-1].end if a and b else a != b:
        return False
    return all(x == y for x, y in itertools.zip_longest(_registry_chunks(a),
                                                        _registry_chunks(b)))


def part_lengths(chunk: Chunk) -> list[int]:
    """The lengths of the registry chunks in a unit (one, the whole, for a plain chunk)."""
    if chunk.parts is None:
        return [chunk.length]
    return [length for length, _ in _PART.iter_unpack(chunk.parts)]


def bad_part(chunk: Chunk, actual: bytes) -> int | None:
    """Which registry chunk of unit `chunk` failed, given UnitHasher.parts() of its bytes."""
    if chunk.parts is None:
        return None
    for k, ((_, want), (_, got)) in enumerate(zip(_PART.iter_unpack(chunk.parts),
                                                  _PART.iter_unpack(actual))):
        if want != got:
            return k
    return None


class UnitHasher:
    """sha256 of a chunk's bytes fed in pieces (`update`, as hashlib's); for a unit, one
    sha256 per registry chunk in it. Not thread-safe: one feeder at a time."""

    __slots__ = ("_lengths", "_offs", "_k", "_fed", "_h", "_parts", "_over", "_serial")

    def __init__(self, chunk: Chunk | None = None):
        self._h = hashlib.sha256()
        self._lengths = None if chunk is None or chunk.parts is None else part_lengths(chunk)
        if self._lengths is not None:
            # where each registry chunk starts in the unit, and (last) the unit's length
            self._offs = list(itertools.accumulate(self._lengths, initial=0))
            small = self._offs[-1] < SERIAL_PART_BYTES * len(self._lengths)
            self._serial = _SERIAL if small else None
        self._k = 0  # the registry chunk being hashed
        self._fed = 0  # bytes of the unit fed so far
        self._parts: list[bytes] = []
        self._over = False  # fed more bytes than the unit has

    def update(self, data) -> None:
        if self._lengths is None:
            self._h.update(data)
            return
        view = memoryview(data).cast("B")
        offs, k, fed = self._offs, self._k, self._fed
        end = fed + len(view)
        if end > offs[-1]:  # past the unit's end: never matches
            self._over = True
            end = offs[-1]
            view = view[:end - fed]
        if end <= fed:
            return
        if fed > offs[k]:  # the rest of a chunk begun in an earlier piece
            stop = min(offs[k + 1], end)
            self._h.update(view[:stop - fed])
            if stop < offs[k + 1]:
                self._fed = end
                return
            self._parts.append(self._h.digest())
            self._h = hashlib.sha256()
            k += 1
        whole = bisect.bisect_right(offs, end, k) - 1  # chunks k .. whole-1 are in this piece
        if whole > k:
            sha = hashlib.sha256
            with self._serial or contextlib.nullcontext():
                self._parts += [sha(view[a - fed:b - fed]).digest()
                                for a, b in zip(offs[k:whole], offs[k + 1:whole + 1])]
            k = whole
        if k < len(self._lengths) and offs[k] < end:  # a chunk whose rest comes later
            self._h.update(view[offs[k] - fed:])
        self._k, self._fed = k, end

    def parts(self) -> bytes:
        return b"".join(map(_PART.pack, self._lengths or (), self._parts))

    def result(self) -> str:
        """`sha256:<hex>`: of the bytes, or for a unit of the packing of its chunks' digests
        (a unit fed too few or too many bytes never matches)."""
        if self._lengths is None:
            return "sha256:" + self._h.hexdigest()
        whole = len(self._parts) == len(self._lengths) and not self._over
        return _unit_digest(self.parts() + (b"" if whole else b"\0not the unit's length"))


def digest_of(chunk: Chunk | None, data) -> str:
    """UnitHasher's result for `data` (bytes-like or anything `buffers.feed` takes)."""
    from .buffers import feed
    h = UnitHasher(chunk)
    feed(h, data)
    return h.result()
