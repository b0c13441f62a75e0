"""The FUSE operations: translate (inode, handle, offset, size) into tree lookups and
materializer reads. No HTTP here, no file bytes of our own: see fetcher.materializer.

Concurrency contract: pyfuse3 runs every request as a trio task on one thread; handlers change
the tree and the handle table only between awaits, so those changes need no locks. Reads wait
for chunks until they made no progress for `read_timeout` (invariant 10); every handler is wrapped by `fuse_errors`.

Prefetch (`--prefetch`): `sequential` keeps a cursor per open handle and asks for a growing
window of chunks ahead of a sequential reader; `auto` also fetches the rest of a blob in the
background, at the lowest priority, from the first read of a handle until its last handle
closes (engines read a model whole); `none` fetches only what is read.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import logging
import os
import stat
import time

import pyfuse3
import trio

from modelfs.fetcher.deadline import progress_deadline
from modelfs.fetcher.materializer import Materializer
from modelfs.fetcher.prefetch import Cursor, PrefetchConfig
from modelfs.fetcher.resolver import ModelResolver

from .errors import fuse_errors
from .readonly import ReadOnlyOps
from .tree import Node, Tree

log = logging.getLogger("modelfs.fs")

XATTR_DIGEST = b"user.modelfs.digest"
XATTR_CACHED = b"user.modelfs.cached"
ENTRY_TIMEOUT = 60.0
ATTR_TIMEOUT = 1.0  # st_blocks changes as chunks arrive
BLOCK_SIZE = 128 << 10
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT


PREFETCH_MODES = ("auto", "sequential", "none")


@dataclasses.dataclass
class _Handle:
    node: Node
    cursor: Cursor


class ModelOps(ReadOnlyOps):
    def __init__(self, tree: Tree, resolver: ModelResolver, materializer: Materializer, *,
                 cache_root: os.PathLike, read_timeout: float = 60.0,
                 lookup_timeout: float = 30.0, prefetch: str = "auto",
                 prefetch_config: PrefetchConfig = PrefetchConfig()):
        super().__init__()
        if prefetch not in PREFETCH_MODES:
            raise ValueError(f"prefetch mode {prefetch!r} is not one of {PREFETCH_MODES}")
        self.prefetch = prefetch
        self.prefetch_config = prefetch_config
        self.cache_root = cache_root
        self.tree = tree
        self.resolver = resolver
        self.materializer = materializer
        self.read_timeout = read_timeout
        self.lookup_timeout = lookup_timeout
        self._handles: dict[int, _Handle] = {}
        self._fh = itertools.count(1)
        self._uid, self._gid = os.getuid(), os.getgid()

    # -- helpers ----------------------------------------------------------------------------

    def _node(self, inode: int) -> Node:
        node = self.tree.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = node.inode
        attrs.generation = 0
        attrs.entry_timeout = ENTRY_TIMEOUT
        attrs.attr_timeout = ATTR_TIMEOUT
        if node.is_dir:
            attrs.st_mode = stat.S_IFDIR | 0o555
            attrs.st_nlink = 2
            attrs.st_size = 0
            attrs.st_blocks = 0
        else:
            attrs.st_mode = stat.S_IFREG | 0o444
            attrs.st_nlink = 1
            attrs.st_size = node.size
            cached = (self.materializer.cached_bytes(node.layer) if node.layer is not None
                      else 0)
            attrs.st_blocks = (cached + 511) // 512  # what the file really uses on disk
        attrs.st_blksize = BLOCK_SIZE
        attrs.st_uid, attrs.st_gid = self._uid, self._gid
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = node.mtime_ns
        return attrs

    async def _child(self, parent: Node, name: str) -> Node:
        found = self.tree.classify(parent, name)
        if isinstance(found, Node):
            return found
        with trio.fail_after(self.lookup_timeout):
            manifest = await self.resolver.resolve(found.name)
        self.tree.add_model(found.name, manifest, time.time_ns())
        # the entry is there now: a model directory, or a tag file of the Ollama view
        found = self.tree.classify(parent, name)
        if not isinstance(found, Node):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return found

    # -- lookups and attributes --------------------------------------------------------------

    @fuse_errors
    async def lookup(self, parent_inode, name, ctx=None):
        parent = self._node(parent_inode)
        if not parent.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        try:
            text = name.decode("utf-8")
        except UnicodeDecodeError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        if text == ".":
            return self._attrs(parent)
        if text == "..":
            return self._attrs(self._node(parent.parent))
        return self._attrs(await self._child(parent, text))

    @fuse_errors
    async def getattr(self, inode, ctx=None):
        return self._attrs(self._node(inode))

    @fuse_errors
    async def opendir(self, inode, ctx):
        if not self._node(inode).is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @fuse_errors
    async def readdir(self, fh, start_id, token):
        node = self._node(fh)
        # Entries in inode order, the inode as the cookie: stable while the tree grows.
        children = sorted((inode, name) for name, inode in self.tree.listing(node).items())
        for inode, name in children:
            if inode <= start_id:
                continue
            if not pyfuse3.readdir_reply(token, name.encode(), self._attrs(self.tree.nodes[inode]),
                                         inode):
                break

    @fuse_errors
    async def releasedir(self, fh):
        return None

    @fuse_errors
    async def statfs(self, ctx):
        st = os.statvfs(self.cache_root)
        out = pyfuse3.StatvfsData()
        out.f_bsize, out.f_frsize = st.f_bsize, st.f_frsize
        out.f_blocks, out.f_bfree, out.f_bavail = st.f_blocks, st.f_bfree, st.f_bavail
        out.f_files, out.f_ffree, out.f_favail = len(self.tree.nodes), 0, 0
        out.f_namemax = 255
        return out

    # -- files ------------------------------------------------------------------------------

    @fuse_errors
    async def open(self, inode, flags, ctx):
        node = self._node(inode)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & _WRITE_FLAGS:
            raise pyfuse3.FUSEError(errno.EROFS)
        fh = next(self._fh)
        self._handles[fh] = _Handle(node, Cursor(self.prefetch_config))
        if node.layer is not None:
            self.materializer.opened(node.model, node.layer)
        # Content-addressed and immutable: the kernel may keep its page cache across opens
        # (without it, each open drops the pages an mmap'ed model was read into).
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @fuse_errors
    async def read(self, fh, off, size):
        handle = self._handles.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        node = handle.node
        if node.data is not None:
            return node.data[off:off + size]
        ahead = handle.cursor.advance(off, size) if self.prefetch != "none" else None
        whole = self.prefetch == "auto"
        # fails when what the read waits for made no progress for read_timeout (invariant 10)
        with progress_deadline(self.read_timeout) as deadline:
            return await self.materializer.read(node.model, node.layer, off, size,
                                                ahead=ahead, whole=whole, deadline=deadline)

    @fuse_errors
    async def release(self, fh):
        handle = self._handles.pop(fh, None)
        if handle is not None and handle.node.layer is not None:
            self.materializer.closed(handle.node.layer)

    # -- extended attributes ------------------------------------------------------------------

    @fuse_errors
    async def getxattr(self, inode, name, ctx):
        node = self._node(inode)
        if node.layer is not None:
            if name == XATTR_DIGEST:
                return node.layer.digest.encode()
            if name == XATTR_CACHED:
                return str(self.materializer.cached_bytes(node.layer)).encode()
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    @fuse_errors
    async def listxattr(self, inode, ctx):
        return [XATTR_DIGEST, XATTR_CACHED] if self._node(inode).layer is not None else []

    def forget(self, inode_list):
        # The tree is small and only grows within a mount: nothing to free.
        return None
