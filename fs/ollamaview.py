"""The mount root as an Ollama models directory (`OLLAMA_MODELS=<mnt>`, protocol.md §6.1).

```
<mnt>/manifests/<host>/<namespace>/<model>/<tag>   the manifest bytes, as served
<mnt>/blobs/sha256-<hex>                           the blobs of the models the mount knows
```

A tag file is resolved from the registry on lookup, as `<mnt>/<model>:<tag>/` is; the model
then has both its directory and its place here. Listing `manifests/` (four levels, as Ollama
globs it) shows the models the mount knows; `blobs/` shows their blobs, the config blob
included. A blob file is the same data path as `model.gguf` and friends (same layer, same
Materializer reads), another inode that shows the same bytes. A blob no known model names is
not there (ENOENT): Ollama reads a manifest before its blobs.

Ollama's start-up prune lists `blobs/` and removes what no manifest names: every blob listed
here is named by a manifest listed here, and the mount is read-only, so a removal is EROFS.
It then removes empty directories under `manifests/`, `manifests/` itself included, and an
error there ends `ollama serve` (server/routes.go: PruneDirectory's error is returned from
Serve): so a directory made by the lookup of a name that does not exist is not listed, and
`manifests/` always holds a small file, `.modelfs` (PruneDirectory leaves files alone, and
a directory with an entry is not empty), for a mount that knows no model yet. Ollama's own
listing globs four levels, `manifests/*/*/*/*`, which a file at the first level never is.

Pure bookkeeping, no I/O, like the tree whose nodes these are (fs/tree.py owns the inodes).
"""

from __future__ import annotations

from modelfs.cache.digests import blob_filename
from modelfs.cache.errors import InvalidName
from modelfs.fetcher.manifest import Manifest
from modelfs.fetcher.names import ModelName, validate_part

VIEW_ROOTS = ("manifests", "blobs")
PLACEHOLDER = ".modelfs"
_PLACEHOLDER_TEXT = (b"The models a modelfs mount knows, as an Ollama models directory: "
                     b"manifests/<host>/<namespace>/<model>/<tag>. (This file keeps the "
                     b"directory from being empty, which Ollama's start-up prune would try "
                     b"to remove.)\n")
# manifests/, manifests/<host>/, .../<namespace>/, .../<model>/ (whose entries are tags)
_LEVELS = ("manifests", "manifests-host", "manifests-namespace", "manifests-model")


class OllamaView:
    DIR_KINDS = (*_LEVELS, "blobs")

    def __init__(self, tree):
        self._tree = tree
        root = tree.root
        self.manifests = tree.new(root.inode, "manifests", "manifests", mtime_ns=root.mtime_ns)
        tree.new(self.manifests.inode, PLACEHOLDER, "data", data=_PLACEHOLDER_TEXT,
                 mtime_ns=root.mtime_ns)
        self.blobs = tree.new(root.inode, "blobs", "blobs", mtime_ns=root.mtime_ns)

    def classify(self, parent, name: str):
        """An existing entry (Node), a new directory of the manifests tree (Node), or the
        ModelName a tag file stands for (the caller resolves it). InvalidName: not here."""
        inode = parent.children.get(name)
        if inode is not None:
            return self._tree.nodes[inode]
        if parent.kind == "blobs":
            raise InvalidName(f"no blob {name[:80]!r} among the models the mount knows")
        level = _LEVELS.index(parent.kind)
        if level == 3:
            return self._tree.registry.name(parent.host, parent.namespace, parent.name,
                                            validate_part("tag", name))
        validate_part(("host", "namespace", "model")[level], name)
        fields = ({"host": name} if level == 0 else
                  {"host": parent.host, "namespace": name if level == 1 else parent.namespace})
        return self._tree.new(parent.inode, name, _LEVELS[level + 1], mtime_ns=parent.mtime_ns,
                              **fields)

    def listing(self, node) -> dict[str, int]:
        """The entries `readdir` shows: below `manifests/`, only directories with a tag in."""
        if node.kind == "blobs":
            return node.children
        return {name: inode for name, inode in node.children.items()
                if self._has_tag(self._tree.nodes[inode])}

    def _has_tag(self, node) -> bool:
        return not node.is_dir or any(self._has_tag(self._tree.nodes[i])
                                      for i in node.children.values())

    def add(self, name: ModelName, manifest: Manifest, mtime_ns: int) -> None:
        """Show a resolved model here: its tag file and its blobs (each digest once)."""
        node = self.manifests
        for part, kind in zip((name.host, name.namespace, name.model), _LEVELS[1:]):
            inode = node.children.get(part)
            if inode is None:
                fields = {"host": name.host}
                if kind != "manifests-host":
                    fields["namespace"] = name.namespace
                node = self._tree.new(node.inode, part, kind, mtime_ns=mtime_ns, **fields)
            else:
                node = self._tree.nodes[inode]
        if name.tag not in node.children:
            self._tree.new(node.inode, name.tag, "data", model=name, data=manifest.raw,
                           mtime_ns=mtime_ns)
        for layer in manifest.blobs():
            file_name = blob_filename(layer.digest)
            if file_name not in self.blobs.children:
                self._tree.new(self.blobs.inode, file_name, "file", model=name, layer=layer,
                               mtime_ns=mtime_ns)
