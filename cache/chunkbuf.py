"""Reusable page-aligned buffers for chunk bytes, and the receiver that fills one.

Why: a fetched chunk is received straight into one of these (`socket.recv_into`), hashed there
by the cache, written to the blob file with O_DIRECT from the same memory, and served to readers
as slices of it. No byte is copied in user space, and the cache file's page cache is not filled
(on this kind of VM, fresh page-cache pages cost more than the copy itself). The buffers are
reused, so the steady state allocates nothing and takes no page faults.

Ownership contract (trio thread only; a filling thread only writes into a buffer it was given):
- `ChunkBuffer.refs` counts the holders (the fetch in progress, the memory cache of the
  materializer, the sealer's queue). `take`/`release` are called on the trio thread only; a
  buffer goes back to the pool when its last holder releases it, and only then may it be
  handed to another fetch.
- A holder that hands a slice of the buffer to somebody else (a FUSE reply) must do so in the
  same trio step as it checked its hold, or take a ref of its own across any await.
- A buffer whose filling thread was abandoned (cancelled fetch) is `abandon`ed: it never goes
  back to the pool, since the thread may still write into it.
"""

from __future__ import annotations

import mmap

from .units import UnitHasher

PAGE = mmap.PAGESIZE
_GRAIN = 1 << 20  # capacities are whole MiB, so buffers of nearby sizes are interchangeable


class ChunkBuffer:
    __slots__ = ("mem", "length", "refs", "abandoned", "view")

    def __init__(self, capacity: int):
        # anonymous and private: page-aligned, zero until written, and eligible for huge pages
        self.mem = mmap.mmap(-1, capacity, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                self.mem.madvise(mmap.MADV_HUGEPAGE)  # fewer faults and TLB misses
            except OSError:
                pass
        self.length = 0
        self.refs = 0
        self.abandoned = False
        self.view = memoryview(self.mem)[:0]

    @property
    def capacity(self) -> int:
        return len(self.mem)

    def __len__(self) -> int:
        return self.length

    def slice(self, lo: int, hi: int) -> memoryview:
        return self.view[lo:hi]

    def abandon(self) -> None:
        self.abandoned = True


class BufferPool:
    """Free buffers kept for reuse, at most `keep` bytes of them."""

    def __init__(self, keep: int = 64 << 20):
        self.keep = keep
        self._free: list[ChunkBuffer] = []
        self._free_bytes = 0
        self.allocated = 0  # bytes of buffers alive (statistics and tests)
        self.created = 0  # buffers ever made (statistics: reuse keeps this small)

    def take(self, length: int) -> ChunkBuffer:
        best = None
        for buf in self._free:
            # not one much larger than asked for: a small layer would hold a chunk's memory
            if length <= buf.capacity <= max(2 * length, _GRAIN) and (
                    best is None or buf.capacity < best.capacity):
                best = buf
        if best is not None:
            self._free.remove(best)
            self._free_bytes -= best.capacity
        else:
            best = ChunkBuffer(max(_GRAIN, -(-length // _GRAIN) * _GRAIN))
            self.allocated += best.capacity
            self.created += 1
        best.length = length
        best.view = memoryview(best.mem)[:length]
        best.refs = 1
        return best

    def hold(self, buf: ChunkBuffer) -> ChunkBuffer:
        buf.refs += 1
        return buf

    def release(self, buf: ChunkBuffer) -> None:
        buf.refs -= 1
        if buf.refs > 0:
            return
        if buf.abandoned or self._free_bytes + buf.capacity > self.keep:
            self.allocated -= buf.capacity
            try:
                buf.view.release()
                buf.mem.close()
            except BufferError:
                pass  # a slice is still exported somewhere: the GC frees it later
            return
        self._free.append(buf)
        self._free_bytes += buf.capacity

    def close(self) -> None:
        for buf in self._free:
            buf.refs = 0
            buf.abandoned = True
            self.release(buf)
        self._free.clear()
        self._free_bytes = 0


class Receiver:
    """A chunk being received into `buf`: the fetcher writes bytes into `view` in order and
    calls `received(n)` after each piece; the cache's own hasher takes each piece while it is
    hot in the CPU cache. Called in the fetch thread; read by the cache once it returns."""

    __slots__ = ("buf", "view", "filled", "arrived", "_hasher", "_chunk")

    def __init__(self, buf: ChunkBuffer, hashed: bool = True, chunk=None):
        self.buf = buf
        self.view = buf.view
        self.filled = 0  # bytes taken in (hashed)
        # bytes received so far over all tries, counted by the fetch thread after each receive
        # (a mark of progress for readers' deadlines: fetcher/deadline.py), hashed or not yet
        self.arrived = 0
        # a fetch unit of several registry chunks is hashed chunk by chunk (units.py)
        self._chunk = chunk
        self._hasher = UnitHasher(chunk) if hashed else None

    def received(self, upto: int) -> None:
        if upto <= self.filled:
            return
        if self._hasher is not None:
            self._hasher.update(self.view[self.filled:upto])
        self.filled = upto

    def reset(self) -> None:
        """Start over (the fetcher retries on another connection)."""
        self.filled = 0  # (`arrived` only ever grows: a mark of progress)
        if self._hasher is not None:
            self._hasher = UnitHasher(self._chunk)

    def digest(self) -> str | None:
        return None if self._hasher is None else self._hasher.result()
