"""Progress of `pull`: a bar on a terminal (tqdm), plain lines for logs and pipes."""

from __future__ import annotations

import sys
import time

from .sizes import format_size


class LogProgress:
    """Plain progress lines for logs and pipes: at most one every few seconds."""

    def __init__(self, label: str, interval: float = 2.0):
        self.label, self.interval = label, interval
        self.total = self.done = 0
        self.start = self.last = time.monotonic()

    def begin(self, total: int) -> None:
        self.total = total

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.interval or self.done >= self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-6)
            print(f"{self.label}: {format_size(self.done)} / {format_size(self.total)} "
                  f"({format_size(rate)}/s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


class BarProgress:
    def __init__(self, label: str):
        self.label, self.bar = label, None

    def begin(self, total: int) -> None:
        from tqdm import tqdm
        self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                        desc=self.label, file=sys.stderr, dynamic_ncols=True)

    def __call__(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
