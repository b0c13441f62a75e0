"""The filesystem operations called directly, without a kernel mount (tier b)."""

import errno

import pyfuse3
import pytest

from modelfs.fetcher.manifest import parse_manifest
from modelfs.fetcher.names import Registry, parse_name
from modelfs.fs.ops import ModelOps
from modelfs.fs.tree import Tree

MANIFEST = (b'{"schemaVersion":2,"layers":['
            b'{"mediaType":"application/vnd.ollama.image.model","digest":"sha256:' + b"1" * 64 +
            b'","size":100},{"mediaType":"application/vnd.ollama.image.license","digest":'
            b'"sha256:' + b"2" * 64 + b'","size":3},{"mediaType":'
            b'"application/vnd.ollama.image.license","digest":"sha256:' + b"3" * 64 +
            b'","size":4}]}')


class Resolver:
    def __init__(self):
        self.asked = []

    async def resolve(self, name):
        self.asked.append(name)
        if name.model == "boom":
            raise RuntimeError("a bug somewhere below")
        return parse_manifest(MANIFEST)


class BrokenMaterializer:
    def cached_bytes(self, layer):
        return 0

    def opened(self, name, layer):
        pass

    def closed(self, layer):
        pass

    async def read(self, name, layer, offset, size, **prefetch):
        raise KeyError("unexpected")


@pytest.fixture
def ops(tmp_path):
    return ModelOps(Tree(Registry()), Resolver(), BrokenMaterializer(), cache_root=tmp_path)


async def test_unexpected_errors_become_eio_and_are_logged(ops, caplog):
    entry = await ops.lookup(pyfuse3.ROOT_INODE, b"m:q1", None)
    names = sorted(ops.tree.nodes[entry.st_ino].children)
    assert names == ["license", "license-2", "manifest.json", "model.gguf"]
    model = ops.tree.nodes[entry.st_ino].children["model.gguf"]
    fi = await ops.open(model, 0, None)
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await ops.read(fi.fh, 0, 10)
    assert exc.value.errno == errno.EIO
    assert "unexpected error" in caplog.text and "KeyError" in caplog.text
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await ops.lookup(pyfuse3.ROOT_INODE, b"boom:q1", None)
    assert exc.value.errno == errno.EIO


async def test_names_are_refused_before_any_lookup(ops):
    for bad in [b"..x:1", b"\xff:1", b"a b:1", b"x" * 300 + b":1", b"library", b"a:b:c"]:
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await ops.lookup(pyfuse3.ROOT_INODE, bad, None)
        assert exc.value.errno == errno.ENOENT, bad
    assert ops.resolver.asked == []
    # hosts and namespaces are directories; their models resolve with the right name
    host = await ops.lookup(pyfuse3.ROOT_INODE, b"127.0.0.1:5000", None)
    ns = await ops.lookup(host.st_ino, b"alice", None)
    await ops.lookup(ns.st_ino, b"m:2", None)
    await ops.lookup(pyfuse3.ROOT_INODE, b"tiny:7", None)
    assert ops.resolver.asked == [parse_name("127.0.0.1:5000/alice/m:2"), parse_name("tiny:7")]


async def test_writes_are_refused(ops):
    entry = await ops.lookup(pyfuse3.ROOT_INODE, b"m:q1", None)
    model = ops.tree.nodes[entry.st_ino].children["model.gguf"]
    import os
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await ops.open(model, os.O_RDWR, None)
    assert exc.value.errno == errno.EROFS
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await ops.setxattr(model, b"user.x", b"1", None)
    assert exc.value.errno == errno.EROFS
