"""Verified chunks put into the kernel's page cache of the files that show them
(FUSE_NOTIFY_STORE), from worker threads: the reader's next READs are answered by the kernel,
so the copy into fresh page-cache pages, the heaviest part of serving a cold read, leaves the
one FUSE thread.

The fetch engine calls `store` (a collaborator given to its constructor) with each chunk it
keeps for a reader. Which files show a blob is the tree's to say (`Tree.files_of`); an inode
the kernel does not know is answered ENOENT at once, before any byte is copied.

Concurrency contract: `store` runs as a task of the mount's nursery and holds the caller's
buffer reference until it returns; pyfuse3 sends the notification without the GIL, from a
thread of our own limiter (two at most: the copy is memory bound).
"""

from __future__ import annotations

import logging

import pyfuse3
import trio

from .tree import Tree

log = logging.getLogger("modelfs.fs")


class KernelPageCache:
    def __init__(self, tree: Tree, threads: int = 2):
        self._tree = tree
        self._limiter = trio.CapacityLimiter(threads)
        self._pushed: dict[str, int] = {}  # digest -> bytes put into the kernel's cache

    def pushed(self, digest: str) -> int:
        """Bytes of `digest` put into the kernel's page cache ahead of its readers (their
        reads of those pages are answered by the kernel and never reach the mount)."""
        return self._pushed.get(digest, 0)

    async def store(self, digest: str, offset: int, buf) -> None:
        stored = False
        for inode in self._tree.files_of(digest):
            try:
                await trio.to_thread.run_sync(pyfuse3.notify_store, inode, offset, buf.view,
                                              limiter=self._limiter)
                stored = True
            except OSError as exc:  # not in the kernel's cache: nothing to put pages into
                log.debug("notify_store of inode %d at %d: %s", inode, offset, exc)
        if stored:
            self._pushed[digest] = self._pushed.get(digest, 0) + len(buf.view)
