"""The Ollama models directory at the mount root (fs/ollamaview.py), through the filesystem
operations called directly (tier b); tests/test_ollama.py does it through a real mount."""

import errno
import json

import pyfuse3
import pytest

from modelfs.fetcher.errors import NotFound
from modelfs.fetcher.manifest import parse_manifest
from modelfs.fetcher.names import Registry, parse_name
from modelfs.fs.ops import ModelOps
from modelfs.fs.tree import Tree

from . import test_ops

REGISTRY = Registry.from_url("http://127.0.0.1:5000")


def _layer(kind: str, fill: str, size: int) -> dict:
    return {"mediaType": f"application/vnd.ollama.image.{kind}",
            "digest": "sha256:" + fill * 64, "size": size}


MANIFEST = json.dumps({"schemaVersion": 2, "config": _layer("config", "c", 7),
                       "layers": [_layer("model", "1", 100), _layer("license", "2", 3)]}).encode()


class Resolver(test_ops.Resolver):
    async def resolve(self, name):
        self.asked.append(name)
        if name.model == "nosuch":
            raise NotFound(f"model {name} not found")
        return parse_manifest(MANIFEST)


class Materializer(test_ops.BrokenMaterializer):
    """Reads answer x's, and are remembered."""

    def __init__(self):
        self.reads = []

    async def read(self, name, layer, offset, size, **prefetch):
        self.reads.append((name, layer.digest, offset, size))
        return b"x" * min(size, layer.size - offset)


@pytest.fixture
def ops(tmp_path):
    return ModelOps(Tree(REGISTRY), Resolver(), Materializer(), cache_root=tmp_path)


async def _path(ops, *parts: str):
    inode = pyfuse3.ROOT_INODE
    for part in parts:
        inode = (await ops.lookup(inode, part.encode(), None)).st_ino
    return ops.tree.nodes[inode]


def _names(node) -> list[str]:
    return sorted(node.children)


async def test_a_tag_file_resolves_the_model_and_reads_as_its_manifest(ops):
    tag = await _path(ops, "manifests", "registry.ollama.ai", "library", "m", "q1")
    # resolved under Ollama's name, fetched through the registry's address
    name = parse_name("m:q1", REGISTRY)
    assert ops.resolver.asked == [name] and ops.resolver.asked[0].base_url == REGISTRY.url
    attrs = await ops.getattr(tag.inode, None)
    assert attrs.st_size == len(MANIFEST) and not tag.is_dir
    fi = await ops.open(tag.inode, 0, None)
    assert await ops.read(fi.fh, 0, 1 << 20) == MANIFEST
    # the model has its directory too, the same model: no second resolve
    model_dir = await _path(ops, "m:q1")
    assert "model.gguf" in _names(model_dir) and ops.resolver.asked == [name]
    # blobs/: every blob of the manifest, the config included, read through the materializer
    blobs = await _path(ops, "blobs")
    assert _names(blobs) == ["sha256-" + c * 64 for c in "12c"]
    config = await _path(ops, "blobs", "sha256-" + "c" * 64)
    fi = await ops.open(config.inode, 0, None)
    assert await ops.read(fi.fh, 0, 4096) == b"x" * 7
    assert ops.materializer.reads == [(name, "sha256:" + "c" * 64, 0, 4096)]
    # the same blob as model.gguf: the page cache is fed to both files (Tree.files_of)
    model = model_dir.children["model.gguf"]
    assert sorted(ops.tree.files_of("sha256:" + "1" * 64)) == sorted(
        [model, blobs.children["sha256-" + "1" * 64]])
    # four levels, as Ollama globs them
    assert _names(await _path(ops, "manifests")) == [".modelfs", "registry.ollama.ai"]
    assert _names(await _path(ops, "manifests", "registry.ollama.ai", "library", "m")) == ["q1"]


async def test_models_looked_up_elsewhere_are_in_the_view(ops):
    await _path(ops, "alice", "tiny:v1")
    await _path(ops, "127.0.0.1:5000", "bob", "x:1")
    host = await _path(ops, "manifests", "registry.ollama.ai")
    assert _names(host) == ["alice"]
    assert _names(await _path(ops, "manifests", "127.0.0.1:5000", "bob", "x")) == ["1"]
    assert [n.base_url for n in ops.resolver.asked] == [REGISTRY.url] * 2


async def test_namespaces_called_manifests_or_blobs_are_under_the_default_host(ops):
    node = await _path(ops, "registry.ollama.ai", "manifests", "m:q1")
    assert node.is_dir and "model.gguf" in node.children
    assert ops.resolver.asked == [parse_name("manifests/m:q1")]
    await _path(ops, "registry.ollama.ai", "blobs", "b:2")
    assert ops.resolver.asked[-1] == parse_name("blobs/b:2")
    # ... and in the Ollama view under their own names
    assert _names(await _path(ops, "manifests", "registry.ollama.ai")) == ["blobs", "manifests"]
    # any other namespace of the default host has one place only: the top of the mount
    for parts in (("registry.ollama.ai", "alice"), ("registry.ollama.ai", "library"),
                  ("library",)):
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await _path(ops, *parts)
        assert exc.value.errno == errno.ENOENT


async def test_what_is_not_there_is_enoent_before_any_request(ops):
    for parts in (("blobs", "sha256-" + "9" * 64), ("blobs", "nonsense"),
                  ("manifests", "..x"), ("manifests", "h.example", "bad.ns"),
                  ("manifests", "registry.ollama.ai", "library", "m", "bad tag"),
                  ("manifests", "a b")):
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await _path(ops, *parts)
        assert exc.value.errno == errno.ENOENT, parts
    assert ops.resolver.asked == []


async def test_removals_and_writes_are_erofs(ops):
    """What Ollama's prune does (remove blobs, rmdir empty manifest dirs), refused."""
    await _path(ops, "manifests", "registry.ollama.ai", "library", "m", "q1")
    blobs = await _path(ops, "blobs")
    before = dict(blobs.children)
    calls = [ops.unlink(blobs.inode, b"sha256-" + b"1" * 64, None),
             ops.rmdir(pyfuse3.ROOT_INODE, b"manifests", None),
             ops.rename(blobs.inode, b"sha256-" + b"1" * 64, blobs.inode, b"x", 0, None),
             ops.mkdir(pyfuse3.ROOT_INODE, b"new", 0o755, None),
             ops.create(blobs.inode, b"sha256-x-partial", 0o644, 0, None)]
    for call in calls:
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await call
        assert exc.value.errno == errno.EROFS
    assert blobs.children == before


async def test_directories_of_names_that_do_not_exist_are_not_listed(ops):
    """Ollama's prune removes empty manifest directories, and an error there (EROFS) ends
    `ollama serve`: a lookup that found nothing must not leave one to be listed."""
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await _path(ops, "manifests", "example.com", "alice", "nosuch", "latest")
    assert exc.value.errno == errno.ENOENT
    manifests = await _path(ops, "manifests")
    assert list(ops.tree.listing(manifests)) == [".modelfs"]  # (never empty: see ollamaview)
    await _path(ops, "manifests", "registry.ollama.ai", "library", "m", "q1")
    assert list(ops.tree.listing(manifests)) == [".modelfs", "registry.ollama.ai"]
    # (still there for lookups: the kernel may hold their inodes)
    assert (await _path(ops, "manifests", "example.com", "alice")).is_dir
    assert list(ops.tree.listing(ops.tree.root)) == ["manifests", "blobs", "m:q1"]
