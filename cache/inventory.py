"""What a cache holds, model by model (for `modelfs status`), and dropping it (`modelfs evict`).

Read-only inspection works beside a live mount (the index is opened read-only and nothing is
locked); eviction takes the cache's lock, so it is refused while a mount or pull uses it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib

from .digests import parse_digest
from .errors import InvalidName
from .index import ChunkIndex
from .partial import partial_name
from .store import ManifestParts, ModelsDir

log = logging.getLogger(__name__)


@dataclasses.dataclass
class BlobInfo:
    digest: str
    size: int
    cached: int  # bytes of it on local disk
    sealed: bool
    allocated: int  # what the filesystem really allocated for it (st_blocks)
    last_used: float


@dataclasses.dataclass
class ModelInfo:
    parts: ManifestParts
    blobs: list[BlobInfo]
    complete_manifest: bool  # in manifests/ (a complete Ollama model), not only resolved/

    @property
    def size(self) -> int:
        return sum(b.size for b in self.blobs)

    @property
    def cached(self) -> int:
        return sum(b.cached for b in self.blobs)

    @property
    def sealed(self) -> bool:
        return all(b.sealed for b in self.blobs)

    @property
    def last_used(self) -> float:
        return max((b.last_used for b in self.blobs), default=0.0)


def _layers(raw: bytes) -> list[tuple[str, int]]:
    """(digest, size) of the config and layers of a manifest; unusable entries skipped."""
    try:
        doc = json.loads(raw)
    except ValueError:
        return []
    out, seen = [], set()
    for layer in [doc.get("config")] + list(doc.get("layers") or []):
        if not isinstance(layer, dict):
            continue
        try:
            digest = parse_digest(layer.get("digest"))
        except InvalidName:
            continue
        size = layer.get("size")
        if type(size) is int and size >= 0 and digest not in seen:
            seen.add(digest)
            out.append((digest, size))
    return out


def _allocated(path: pathlib.Path) -> tuple[int, float]:
    try:
        st = path.stat()
    except FileNotFoundError:
        return 0, 0.0
    return st.st_blocks * 512, st.st_mtime


def inventory(root: os.PathLike | str) -> tuple[list[ModelInfo], dict]:
    """Every model the cache knows (complete or resolved by a mount) and the totals."""
    root = pathlib.Path(root)
    store, resolved = ModelsDir(root), ModelsDir(root / "resolved")
    index_path = root / "index.sqlite"
    summary, sealed, cap = {}, set(), None
    if index_path.exists():
        index = ChunkIndex(index_path, readonly=True)
        try:
            summary = index.blob_summary()
            sealed = {d for d in summary if index.sealed_as(d) is not None}
            cap = index.get_meta("cache_max")
        finally:
            index.close()
    models: dict[ManifestParts, ModelInfo] = {}
    for source, complete in ((store, True), (resolved, False)):
        for parts in source.list_manifests():
            if parts in models:
                continue
            raw = source.read_manifest(parts) or b""
            blobs = []
            for digest, size in _layers(raw):
                blob_path = store.blob_path(digest)
                if digest in sealed or (blob_path.exists() and digest not in summary):
                    allocated, mtime = _allocated(blob_path)
                    here = blob_path.exists()
                    info = BlobInfo(digest, size, size if here else 0, here, allocated,
                                    summary.get(digest, (0, 0, mtime))[2] or mtime)
                else:
                    allocated, mtime = _allocated(root / "partial" / partial_name(digest))
                    _, present, last = summary.get(digest, (size, 0, 0.0))
                    info = BlobInfo(digest, size, present, False, allocated, last or mtime)
                blobs.append(info)
            models[parts] = ModelInfo(parts, blobs, complete)
    unique = {b.digest: b for m in models.values() for b in m.blobs}
    totals = {"cached": sum(b.cached for b in unique.values()),
              "allocated": sum(b.allocated for b in unique.values()),
              "cap": int(cap) if cap else None}
    return sorted(models.values(), key=lambda m: m.parts), totals


def evict_blobs(cache, digests: list[str]) -> int:
    """Drop these blobs from `cache` (a BlobCache we hold the lock of); returns bytes freed."""
    freed = 0
    for digest in digests:
        for path in (cache.store.blob_path(digest), cache.partial_dir / partial_name(digest)):
            allocated, _ = _allocated(path)
            if path.exists():
                path.unlink()
                freed += allocated
        cache.index.forget(digest)
        cache.index.forget_sealed(digest)
    cache.budget.used = cache.index.usage()
    return freed
