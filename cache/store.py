"""The Ollama `OLLAMA_MODELS` layout: `blobs/sha256-<hex>` and
`manifests/<host>/<namespace>/<model>/<tag>`, same names and same bytes as Ollama, so a cache
written by modelfs is a models directory Ollama (and `modelfs serve`) can use as it is."""

from __future__ import annotations

import os
import pathlib
import tempfile

from .digests import blob_filename
from .errors import InvalidName

ManifestParts = tuple[str, str, str, str]  # host, namespace, model, tag


def _safe_component(part: str) -> str:
    # Names are validated by the fetcher's grammar already; this is the last line of defence
    # for anything that turns a name into a path (invariant 11).
    if not part or part in (".", "..") or "/" in part or "\0" in part or len(part) > 350:
        raise InvalidName(f"unsafe path component {part[:60]!r}")
    return part


def fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: pathlib.Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix="-" + path.name[:40])
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


class ModelsDir:
    """One models directory. Pure path logic plus small synchronous file operations."""

    def __init__(self, root: os.PathLike | str):
        self.root = pathlib.Path(root)
        self.blobs = self.root / "blobs"
        self.manifests = self.root / "manifests"

    def create(self) -> "ModelsDir":
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.manifests.mkdir(parents=True, exist_ok=True)
        return self

    def blob_path(self, digest: str) -> pathlib.Path:
        return self.blobs / blob_filename(digest)

    def has_blob(self, digest: str, size: int) -> bool:
        try:
            return self.blob_path(digest).stat().st_size == size
        except FileNotFoundError:
            return False

    def manifest_path(self, parts: ManifestParts) -> pathlib.Path:
        return self.manifests.joinpath(*(_safe_component(p) for p in parts))

    def read_manifest(self, parts: ManifestParts) -> bytes | None:
        try:
            return self.manifest_path(parts).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def write_manifest(self, parts: ManifestParts, raw: bytes) -> pathlib.Path:
        path = self.manifest_path(parts)
        atomic_write(path, raw)
        return path

    def list_manifests(self) -> list[ManifestParts]:
        """Every manifest, exactly four levels below `manifests/` (as Ollama globs them)."""
        found = []
        for path in sorted(self.manifests.glob("*/*/*/*")):
            if path.is_file() and not path.name.startswith(".tmp-"):
                found.append(tuple(path.relative_to(self.manifests).parts))
        return found
