"""Sequential-read detection per open file handle (pure logic, no I/O).

A handle's cursor remembers where its last read ended. A read that starts near there (a small
jump forward or back: the kernel's readahead and mmap faults arrive slightly out of order) is
sequential and doubles the prefetch window, up to `max_window`; a read far away resets the
window. After each read the materializer fetches [end, end + window) ahead of the reader.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class PrefetchConfig:
    initial_window: int = 8 << 20
    max_window: int = 64 << 20
    forward_slack: int = 16 << 20  # a jump ahead of this much still counts as sequential
    backward_slack: int = 1 << 20


@dataclasses.dataclass
class Cursor:
    config: PrefetchConfig = dataclasses.field(default_factory=PrefetchConfig)
    next_offset: int | None = 0  # a first read at offset 0 is the start of a sequential run
    window: int = 0
    sequential_bytes: int = 0

    def advance(self, offset: int, size: int) -> tuple[int, int]:
        """Record a read of [offset, offset+size); return the byte range to prefetch."""
        c = self.config
        near = self.next_offset is not None and \
            self.next_offset - c.backward_slack <= offset <= self.next_offset + c.forward_slack
        if near:
            self.sequential_bytes += size
            if self.window == 0:
                self.window = c.initial_window
            elif self.sequential_bytes >= self.window:
                self.window = min(self.window * 2, c.max_window)
        else:
            self.window, self.sequential_bytes = 0, 0
        end = offset + size
        self.next_offset = max(end, self.next_offset or 0) if near else end
        return end, end + self.window
