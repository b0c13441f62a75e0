"""Chunk bytes as the network delivered them: a list of buffers, never joined into one copy
unless something needs a contiguous object. Hashing and writing take the pieces as they are
(`hashlib.update` per piece, one `pwritev`), which saves a full copy of every byte fetched."""

from __future__ import annotations

import ctypes
import os

from .chunkbuf import ChunkBuffer


class Pieces:
    __slots__ = ("parts", "length")

    def __init__(self, parts):
        self.parts = [p for p in parts if len(p)]
        self.length = sum(len(p) for p in self.parts)

    def __len__(self) -> int:
        return self.length

    def __bytes__(self) -> bytes:
        return b"".join(self.parts)


def parts_of(data) -> list:
    if isinstance(data, Pieces):
        return data.parts
    return [data.view if isinstance(data, ChunkBuffer) else data]


def feed(hasher, data) -> None:
    for part in parts_of(data):
        hasher.update(part)


def pwrite_all(fd: int, data, offset: int) -> None:
    """Write every byte of `data` (bytes-like or Pieces) at `offset`."""
    views = [memoryview(p) for p in parts_of(data)]
    while views:
        n = os.pwritev(fd, views[:1024], offset)  # IOV_MAX
        offset += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if n:
            views[0] = views[0][n:]


_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
_libc = None


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free the disk blocks of [offset, offset+length) in a sparse file; reads there return
    zeros (and we never serve them: the chunk is marked absent first)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
