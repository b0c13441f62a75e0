"""Every request that would change the mount is answered EROFS.

The kernel refuses most of them itself on a `ro` mount, before they reach us; these answers are
for whatever still arrives (and for the operations called without a kernel). pyfuse3's own
defaults would be ENOSYS, which Ollama's start-up prune (it removes blobs and empty manifest
directories) and other tools report as a broken filesystem rather than a read-only one.
"""

from __future__ import annotations

import errno

import pyfuse3


def _refuse() -> None:
    raise pyfuse3.FUSEError(errno.EROFS)


class ReadOnlyOps(pyfuse3.Operations):
    async def setattr(self, inode, attr, fields, fh, ctx):
        _refuse()

    async def write(self, fh, off, buf):
        _refuse()

    async def create(self, parent_inode, name, mode, flags, ctx):
        _refuse()

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        _refuse()

    async def mkdir(self, parent_inode, name, mode, ctx):
        _refuse()

    async def symlink(self, parent_inode, name, target, ctx):
        _refuse()

    async def link(self, inode, new_parent_inode, new_name, ctx):
        _refuse()

    async def unlink(self, parent_inode, name, ctx):
        _refuse()

    async def rmdir(self, parent_inode, name, ctx):
        _refuse()

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        _refuse()

    async def setxattr(self, inode, name, value, ctx):
        _refuse()

    async def removexattr(self, inode, name, ctx):
        _refuse()
