"""Who is reading which blob right now: when each blob was last read, and where (and how much
was asked for in all, for `modelfs status`).

One owner for a fact that two parts of a mount need. The sealer of a blob waits while its
readers are being served: its whole-blob hash would take the CPU they need (a 2 GiB cold read
took 5.5 s instead of 4.9 s), and it catches up when they pause. The fetch engine keeps a blob's
background fetches near where it is being read, so that what it fetches is read from memory,
not written and read back. A pull has no readers (`BlobCache(readers=None)`): its blobs are
sealed as fast as their chunks come.

Concurrency contract: trio thread only.
"""

from __future__ import annotations

import trio

# A blob read from in the last this many seconds is being read.
READERS_QUIET = 0.5


class ReaderActivity:
    def __init__(self, quiet: float = READERS_QUIET):
        self.quiet = quiet
        self._last: dict[str, tuple[float, int]] = {}  # digest -> (trio time, offset)
        self._served: dict[str, int] = {}  # digest -> bytes readers asked for, all reads

    def read(self, digest: str, offset: int, size: int = 0) -> None:
        """A reader asked for `size` bytes of `digest` at `offset` just now."""
        self._last[digest] = (trio.current_time(), offset)
        self._served[digest] = self._served.get(digest, 0) + size

    def served(self, digest: str) -> int:
        """Bytes of `digest` readers asked the mount for (reads the kernel answered from its
        page cache, or from pages pushed into it, never reach us)."""
        return self._served.get(digest, 0)

    def active(self, digest: str) -> bool:
        return self.position(digest) is not None

    def position(self, digest: str) -> int | None:
        """Where `digest` is being read right now; None when no reader is busy with it."""
        last = self._last.get(digest)
        if last is None or trio.current_time() - last[0] >= self.quiet:
            return None
        return last[1]
