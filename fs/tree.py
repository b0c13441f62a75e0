"""The mount's name tree: which path is which model, layer or directory, and their inodes.

```
<mnt>/<model>:<tag>/                       default registry, namespace `library`
<mnt>/<namespace>/<model>:<tag>/           another namespace on the default registry
<mnt>/<host>/<namespace>/<model>:<tag>/    another registry host
<mnt>/manifests/<host>/<ns>/<model>/<tag>  the same models as an Ollama models directory
<mnt>/blobs/sha256-<hex>                   (fs/ollamaview.py)
<mnt>/registry.ollama.ai/<ns>/<model>:<tag>/   only for the namespaces `manifests` and `blobs`
                                           of the default registry, whose names the Ollama
                                           view takes at the root
```

The default host is always `registry.ollama.ai`, whatever `--registry` says (that is only where
its models are fetched from: fetcher/names.py). Which root entries are hosts: a name with a
'.', or `localhost`, optionally with an all-digit port (`example.com`, `localhost:8080`,
`127.0.0.1:5000`); other names with ':' are models (`qwen3:0.6b`), other names without are
namespaces. Known ambiguity: a library model whose name has a dot and whose tag is all digits
(`qwen2.5:7`) reads as a host at the root and cannot be reached there (it can through
`manifests/`). Every part is validated by the model name grammar before anything else
happens, so `..`, control characters and absurd lengths never reach the registry or the disk.

Each model has exactly one directory: `<mnt>/library/...` and `<mnt>/registry.ollama.ai/<ns>/`
for any other namespace are refused, as they would alias one.

Pure bookkeeping, no I/O: the filesystem operations ask this tree what a name is and resolve
models themselves. Inodes are never reused within a mount (the tree only grows).
"""

from __future__ import annotations

import dataclasses
import re

from modelfs.cache.errors import InvalidName
from modelfs.fetcher.manifest import Layer, Manifest
from modelfs.fetcher.names import DEFAULT_HOST, DEFAULT_NAMESPACE, ModelName, Registry, \
    validate_part

from .ollamaview import VIEW_ROOTS, OllamaView

ROOT_INODE = 1
_DIR_KINDS = ("root", "host", "namespace", "model", *OllamaView.DIR_KINDS)

_FILE_NAMES = {
    "application/vnd.ollama.image.model": ("model", ".gguf"),
    "application/vnd.ollama.image.projector": ("projector", ".gguf"),
    "application/vnd.ollama.image.adapter": ("adapter", ".gguf"),
    "application/vnd.ollama.image.draft": ("draft", ".gguf"),
    "application/vnd.ollama.image.template": ("template", ""),
    "application/vnd.ollama.image.prompt": ("template", ""),
    "application/vnd.ollama.image.system": ("system", ""),
    "application/vnd.ollama.image.license": ("license", ""),
    "application/vnd.ollama.image.params": ("params", ".json"),
    "application/vnd.ollama.image.messages": ("messages", ".json"),
}
# host:port at the root: a dotted name or localhost, then a port.
_HOST_PORT_RE = re.compile(r"(?:[^:]*\.[^:]*|localhost):\d{1,5}")


def layer_files(manifest: Manifest) -> list[tuple[str, Layer]]:
    """File names for the layers: `model.gguf`, then `model-2.gguf` for a second model layer,
    and so on, in manifest order. Layers of unknown kinds are not shown."""
    counts: dict[str, int] = {}
    files = []
    for layer in manifest.layers:
        base_ext = _FILE_NAMES.get(layer.media_type.split(";")[0].strip())
        if base_ext is None:
            continue
        base, ext = base_ext
        counts[base] = counts.get(base, 0) + 1
        n = counts[base]
        files.append((f"{base}{ext}" if n == 1 else f"{base}-{n}{ext}", layer))
    return files


@dataclasses.dataclass(eq=False)
class Node:
    inode: int
    parent: int
    name: str
    kind: str  # _DIR_KINDS, "file" (a blob), "data" (manifest bytes)
    host: str | None = None
    namespace: str | None = None
    model: ModelName | None = None
    layer: Layer | None = None  # kind "file"
    data: bytes | None = None  # kind "data": manifest.json
    mtime_ns: int = 0
    children: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def is_dir(self) -> bool:
        return self.kind in _DIR_KINDS

    @property
    def size(self) -> int:
        if self.layer is not None:
            return self.layer.size
        if self.data is not None:
            return len(self.data)
        return 0


@dataclasses.dataclass(frozen=True)
class ChildModel:
    """A lookup that names a model: resolve it, `add_model`, then classify the entry again."""
    name: ModelName


class Tree:
    def __init__(self, registry: Registry, mtime_ns: int = 0):
        self.registry = registry
        self.nodes: dict[int, Node] = {}
        self._next = ROOT_INODE
        self.root = self.new(ROOT_INODE, "", "root", mtime_ns=mtime_ns)
        self.root.host = DEFAULT_HOST
        self.ollama = OllamaView(self)

    def new(self, parent: int, name: str, kind: str, **fields) -> Node:
        """A new node (the only way inodes are made)."""
        node = Node(self._next, parent, name, kind, **fields)
        self._next += 1
        self.nodes[node.inode] = node
        if kind != "root":
            self.nodes[parent].children[name] = node.inode
        return node

    def get(self, inode: int) -> Node | None:
        return self.nodes.get(inode)

    def listing(self, node: Node) -> dict[str, int]:
        """What `readdir` shows of a directory: name -> inode."""
        return self.ollama.listing(node) if node.kind in OllamaView.DIR_KINDS else node.children

    def files_of(self, digest: str) -> list[int]:
        """Inodes of the files that show blob `digest` (one per model that has it)."""
        return [n.inode for n in self.nodes.values()
                if n.layer is not None and n.layer.digest == digest]

    def classify(self, parent: Node, name: str) -> Node | ChildModel:
        """What `name` in directory `parent` is. Existing children come back as they are;
        new directories of hosts and namespaces are made on the spot; a model is returned as
        ChildModel for the caller to resolve. Raises InvalidName before any I/O."""
        inode = parent.children.get(name)
        if inode is not None:
            return self.nodes[inode]
        if parent.kind in OllamaView.DIR_KINDS:
            found = self.ollama.classify(parent, name)
            return ChildModel(found) if isinstance(found, ModelName) else found
        if parent.kind == "root":
            if name == DEFAULT_NAMESPACE:
                # It would alias the root itself: the library of the default registry is it.
                raise InvalidName(f"{name} models are listed at the top of the mount")
            if ":" in name and not _HOST_PORT_RE.fullmatch(name):
                return ChildModel(self._model_name(DEFAULT_HOST, DEFAULT_NAMESPACE, name))
            if "." in name or ":" in name or name == "localhost":
                validate_part("host", name)
                return self.new(parent.inode, name, "host", host=name,
                                mtime_ns=parent.mtime_ns)
            validate_part("namespace", name)
            return self.new(parent.inode, name, "namespace", host=DEFAULT_HOST,
                            namespace=name, mtime_ns=parent.mtime_ns)
        if parent.kind == "host":
            if parent.host == DEFAULT_HOST and name not in VIEW_ROOTS:
                raise InvalidName(f"{name[:60]!r} of {DEFAULT_HOST} is at the top of the mount")
            validate_part("namespace", name)
            return self.new(parent.inode, name, "namespace", host=parent.host, namespace=name,
                             mtime_ns=parent.mtime_ns)
        if parent.kind == "namespace":
            return ChildModel(self._model_name(parent.host, parent.namespace, name))
        raise InvalidName(f"no entry {name[:60]!r}")

    def _model_name(self, host: str, namespace: str, entry: str) -> ModelName:
        model, sep, tag = entry.partition(":")
        if not sep:
            raise InvalidName(f"model directories are named <model>:<tag>, not {entry[:60]!r}")
        return self.registry.name(host, namespace, model, tag)

    def model_dir(self, name: ModelName) -> Node | None:
        """The directory of `name` if it is in the tree already."""
        node = self._parent_of(name, create=False)
        inode = node.children.get(self._entry(name)) if node else None
        return self.nodes[inode] if inode else None

    def add_model(self, name: ModelName, manifest: Manifest, mtime_ns: int) -> Node:
        """The directory of a resolved model, with its files (idempotent)."""
        existing = self.model_dir(name)
        if existing is not None:
            return existing
        parent = self._parent_of(name, create=True)
        node = self.new(parent.inode, self._entry(name), "model", host=name.host,
                         namespace=name.namespace, model=name, mtime_ns=mtime_ns)
        for file_name, layer in layer_files(manifest):
            self.new(node.inode, file_name, "file", model=name, layer=layer, mtime_ns=mtime_ns)
        self.new(node.inode, "manifest.json", "data", model=name, data=manifest.raw,
                 mtime_ns=mtime_ns)
        self.ollama.add(name, manifest, mtime_ns)
        return node

    @staticmethod
    def _entry(name: ModelName) -> str:
        return f"{name.model}:{name.tag}"

    def _parent_of(self, name: ModelName, *, create: bool) -> Node | None:
        node = self.root
        # a host directory for other hosts, and for the default host's namespaces that share
        # a name with the Ollama view's roots
        host_dir = name.host != DEFAULT_HOST or name.namespace in VIEW_ROOTS
        path = [name.host] if host_dir else []
        if path or name.namespace != DEFAULT_NAMESPACE:
            path.append(name.namespace)
        for depth, part in enumerate(path):
            inode = node.children.get(part)
            if inode is None:
                if not create:
                    return None
                kind = "host" if depth == 0 and host_dir else "namespace"
                node = self.new(node.inode, part, kind, host=name.host,
                                 namespace=part if kind == "namespace" else None,
                                 mtime_ns=node.mtime_ns)
            else:
                node = self.nodes[inode]
        return node
