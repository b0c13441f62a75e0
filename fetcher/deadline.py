"""Progress deadlines (invariant 10): a read fails when what it waits for made no progress for
`timeout` seconds, not when a wall clock since the read began runs out. A reader waiting on a
download that moves is never failed, however slow or large the download; one waiting on a
stalled or dead source is failed `timeout` seconds after the last byte arrived.

`progress_deadline(timeout)` is a cancel scope whose deadline moves forward whenever a waiter
inside it reports progress (`moved(mark)` with a mark other than the last one: a count of bytes
received, of chunks done, of bytes hashed by the sealer). Everything inside the scope is
bounded, also the waits that report nothing (a chunk list request, a lock): they count against
the time since the last progress. `wait(event, mark)` waits for an event and samples the mark
every `tick` seconds meanwhile.

Concurrency contract: trio thread only. A mark may be read from counters that fetch threads
write (`Receiver.arrived`: plain ints written by one thread); a stale value only delays the next
move by a tick.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import trio


class ProgressDeadline:
    def __init__(self, timeout: float, scope: trio.CancelScope):
        self.timeout = timeout
        # how often a waiter looks at its mark: the read fails at most a tick late
        self.tick = max(min(timeout / 8, 1.0), 0.01)
        self._scope = scope
        self._mark: object = object()

    def moved(self, mark: object) -> None:
        """Report where what we wait for stands now; a new mark gives `timeout` more."""
        if mark != self._mark:
            self._mark = mark
            self._scope.deadline = trio.current_time() + self.timeout

    async def wait(self, event: trio.Event, mark: Callable[[], object]) -> None:
        """Wait for `event`, reporting `mark()` every tick (and before waiting)."""
        while not event.is_set():
            self.moved(mark())
            with trio.move_on_after(self.tick):
                await event.wait()


@contextlib.contextmanager
def progress_deadline(timeout: float) -> Iterator[ProgressDeadline]:
    """Raise trio.TooSlowError when nothing inside reported progress for `timeout` s."""
    with trio.CancelScope(deadline=trio.current_time() + timeout) as scope:
        yield ProgressDeadline(timeout, scope)
    if scope.cancelled_caught:
        raise trio.TooSlowError(f"no progress for {timeout:g} s")
