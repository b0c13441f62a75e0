"""A worker thread at the lowest CPU priority, for the sealer's catch-up hashing.

Why: the whole-blob hash costs as much CPU as verifying the chunks. In a mount it runs when
readers pause (see cache/readers.py) and often while an engine computes with the model it
just loaded; at nice 19 it takes only the CPU nobody else wants. Linux applies nice per
thread, so this thread is ours alone: trio's worker threads are reused for other work and must
never be left at a low priority.

Concurrency contract: `run` is called on the trio thread; calls run one at a time, in order, in
the worker. A caller waits for its call even when cancelled (shielded): the function holds
buffers the caller owns, so each call must be short (one chunk's hash).
"""

from __future__ import annotations

import logging
import os
import queue
import threading

import trio

log = logging.getLogger(__name__)


class LowPriorityThread:
    def __init__(self, nice: int = 19, name: str = "modelfs-low"):
        self._nice, self._name = nice, name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def _main(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self._nice)
        except OSError as exc:
            log.info("cannot lower the priority of %s: %s", self._name, exc)
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, args, token, box, done = item
            try:
                box.append((True, fn(*args)))
            except BaseException as exc:  # handed to the caller
                box.append((False, exc))
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass

    async def run(self, fn, *args):
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name=self._name, daemon=True)
            self._thread.start()
        done, box = trio.Event(), []
        self._queue.put((fn, args, trio.lowlevel.current_trio_token(), box, done))
        with trio.CancelScope(shield=True):
            await done.wait()
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread = None
