"""`modelfs serve --export DIR`: a models directory written out as a static registry tree.

Any static web server, object store or CDN that answers `Range: bytes=a-b` with 206 can then act
as a chunksums registry (protocol.md §3-§4):

    DEST/v2/<ns>/<model>/manifests/<tag>            the manifest bytes exactly as stored
    DEST/v2/<ns>/<model>/blobs/sha256:<hex>         a hard link to `blobs/sha256-<hex>` of the
                                                    models dir (a copy across filesystems)
    DEST/v2/<ns>/<model>/chunksums/sha256:<hex>     `sha256:<hex> <start>-<end>` lines (inclusive
                                                    end), the same list `modelfs serve` gives

A static tree cannot send `Content-Location`, so a client fetches the chunks from the registry's
own blob URL, which is what `RegistryClient.chunk_plan` does when the header is absent. When a
tag exists under several host directories, the one under `registry.ollama.ai` wins, then the
first other host in sorted order (as `modelfs serve` looks them up).

Guarantees:
- A blob is placed only after `ChunksumStore` has hashed it whole and found that it matches its
  digest (or has a remembered list for the unchanged file), so the tree never vouches for a
  corrupt blob. A model's manifest is written only after all its blobs and chunk lists are in
  place: a client that finds the manifest finds everything it names.
- Every file appears atomically (temp name in the same directory + rename); an interrupted export
  leaves at most `.tmp-*` files, which the next export does not mind.
- Re-exporting is cheap and idempotent: chunk lists come from the store's state directory, blob
  entries already linked to the same inode (or copies with the source's size and mtime) are left
  alone, and files whose bytes are already right are not rewritten.
- A model that cannot be exported whole (a missing, short or corrupt blob, an unparsable manifest,
  a name that is not a valid registry path) is skipped with a warning; the others are exported,
  then `ExportIncomplete` names what was skipped. Entries of models no longer in the models dir
  are not deleted.
- The trio loop never blocks on file I/O: every stat, read, link, rename and copy runs in
  `trio.to_thread.run_sync`; large copies go in 64 MiB pieces so cancellation is prompt.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import pathlib
import secrets
import stat

import trio

from modelfs.cache.chunks import DEFAULT_CHUNK_SIZE, MAX_CHUNK_BYTES
from modelfs.cache.digests import parse_digest
from modelfs.cache.errors import InvalidName, ModelfsError
from modelfs.cache.store import ModelsDir, atomic_write, fsync_dir

from .chunksum_store import (MIN_CHUNK_SIZE, BlobChanged, BlobCorrupt, ChunksumStore,
                             chunksums_text, default_state_dir)
from .errors import BadManifest
from .groups import first_error
from .manifest import Layer, parse_manifest
from .names import DEFAULT_HOST, validate_part

log = logging.getLogger("modelfs.export")

_COPY_PIECE = 64 << 20  # bytes copied per thread call: bounds how long a cancel waits
_LINK_FALLBACK_ERRNOS = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP,
                         errno.EOPNOTSUPP, errno.EACCES}
_CFR_FALLBACK_ERRNOS = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.ENOTSUP,
                        errno.EOPNOTSUPP, errno.EBADF}
_MAX_PARALLEL_BLOBS = 4


class ExportError(ModelfsError):
    """The export cannot start (bad destination, chunk size or state directory)."""


class ExportIncomplete(ExportError):
    """Some models were skipped; every other model was exported. `stats` says what was done."""

    def __init__(self, message: str, stats: "ExportStats"):
        super().__init__(message)
        self.stats = stats


@dataclasses.dataclass
class ExportStats:
    manifests: int = 0      # manifests in the tree after this export
    blobs: int = 0          # blob entries in the tree (one per repository that names the blob)
    linked: int = 0         # blob entries hard-linked by this export
    copied: int = 0         # blob entries copied by this export (no hard link possible)
    unchanged: int = 0      # blob entries that were already right
    bytes: int = 0          # total size of the blob entries
    copied_bytes: int = 0   # bytes copied by this export
    chunksums: int = 0      # chunk list files in the tree
    written: int = 0        # manifest and chunk list files (re)written by this export
    skipped: list[str] = dataclasses.field(default_factory=list)  # "<ns>/<model>:<tag>: why"


class _Skip(Exception):
    """This model cannot be exported; the message says why."""


# --- blocking helpers (run in threads) --------------------------------------------------------


def _inside(path: pathlib.Path, root: pathlib.Path) -> bool:
    return path == root or root in path.parents


def _choose_manifests(models: ModelsDir) -> tuple[dict[tuple[str, str, str], str], list[str]]:
    """(ns, model, tag) -> host to export it from; plus names refused as unsafe."""
    if not models.manifests.is_dir():
        return {}, []
    hosts: dict[tuple[str, str, str], list[str]] = {}
    refused = []
    for host, namespace, model, tag in models.list_manifests():
        try:
            validate_part("host", host)
            validate_part("namespace", namespace)
            validate_part("model", model)
            validate_part("tag", tag)
        except InvalidName as exc:
            refused.append(f"{host}/{namespace}/{model}:{tag}: {exc}")
            continue
        hosts.setdefault((namespace, model, tag), []).append(host)
    chosen = {key: (DEFAULT_HOST if DEFAULT_HOST in found else sorted(found)[0])
              for key, found in hosts.items()}
    return dict(sorted(chosen.items())), refused


def _read_if_exists(path: pathlib.Path) -> bytes | None:
    try:
        return path.read_bytes()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None


def _write_if_changed(path: pathlib.Path, data: bytes) -> bool:
    """Atomically give `path` the bytes `data`; False if it already had them."""
    if _read_if_exists(path) == data:
        return False
    atomic_write(path, data)
    return True


def _stat_source(path: pathlib.Path) -> os.stat_result | None:
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return st if stat.S_ISREG(st.st_mode) else None


def _tmp_name(target: pathlib.Path) -> pathlib.Path:
    return target.with_name(f".tmp-{secrets.token_hex(6)}-{target.name[:40]}")


def _entry_is_current(target: pathlib.Path, src: os.stat_result) -> bool:
    """The tree entry is the source file itself, or a copy with its size and mtime."""
    try:
        st = os.lstat(target)
    except (FileNotFoundError, NotADirectoryError):
        return False
    if not stat.S_ISREG(st.st_mode):
        return False
    if (st.st_dev, st.st_ino) == (src.st_dev, src.st_ino):
        return True
    return (st.st_size, st.st_mtime_ns) == (src.st_size, src.st_mtime_ns)


def _try_link(source: pathlib.Path, target: pathlib.Path) -> bool:
    """Hard-link `source` at `target` (atomically replacing it); False if linking is impossible."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(target)
    try:
        os.link(source, tmp)
    except OSError as exc:
        if exc.errno in _LINK_FALLBACK_ERRNOS:
            return False
        raise
    try:
        os.replace(tmp, target)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    fsync_dir(target.parent)
    return True


def _unlink_quietly(path: pathlib.Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _open_copy(source: pathlib.Path, target: pathlib.Path) -> tuple[int, int, pathlib.Path,
                                                                      os.stat_result]:
    target.parent.mkdir(parents=True, exist_ok=True)
    src_fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        tmp = _tmp_name(target)
        dst_fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except BaseException:
        os.close(src_fd)
        raise
    return src_fd, dst_fd, tmp, os.fstat(src_fd)


class _Copier:
    """Copies byte ranges between two fds: copy_file_range, else pread/pwrite."""

    def __init__(self, src_fd: int, dst_fd: int):
        self.src_fd, self.dst_fd = src_fd, dst_fd
        self.in_kernel = hasattr(os, "copy_file_range")

    def copy(self, offset: int, count: int) -> None:
        done = 0
        while done < count:
            n = self._step(offset + done, count - done)
            if n == 0:
                raise BlobChanged("the source blob shrank while it was being copied")
            done += n

    def _step(self, offset: int, count: int) -> int:
        if self.in_kernel:
            try:
                return os.copy_file_range(self.src_fd, self.dst_fd, count, offset, offset)
            except OSError as exc:
                if exc.errno not in _CFR_FALLBACK_ERRNOS:
                    raise
                self.in_kernel = False
        data = os.pread(self.src_fd, min(count, 1 << 20), offset)
        view, written = memoryview(data), 0
        while written < len(data):
            written += os.pwrite(self.dst_fd, view[written:], offset + written)
        return len(data)


def _finish_copy(src_fd: int, dst_fd: int, tmp: pathlib.Path, target: pathlib.Path,
                 src: os.stat_result) -> None:
    after = os.fstat(src_fd)
    if (after.st_size, after.st_mtime_ns) != (src.st_size, src.st_mtime_ns):
        raise BlobChanged("the source blob changed while it was being copied")
    os.fsync(dst_fd)
    # The source's mtime marks the copy as current for the next export.
    os.utime(dst_fd, ns=(src.st_atime_ns, src.st_mtime_ns))
    os.replace(tmp, target)
    fsync_dir(target.parent)


def _close_copy(src_fd: int, dst_fd: int, tmp: pathlib.Path, done: bool) -> None:
    os.close(src_fd)
    os.close(dst_fd)
    if not done:
        _unlink_quietly(tmp)


# --- the export (trio side) -------------------------------------------------------------------


class _Exporter:
    def __init__(self, models: ModelsDir, v2: pathlib.Path, store: ChunksumStore,
                 chunk_size: int):
        self.models, self.v2, self.store, self.chunk_size = models, v2, store, chunk_size
        self.stats = ExportStats()
        self._lists: dict[str, bytes] = {}  # digest -> chunk list text, computed this run
        self._limiter = trio.CapacityLimiter(_MAX_PARALLEL_BLOBS)

    async def run(self) -> ExportStats:
        chosen, refused = await trio.to_thread.run_sync(_choose_manifests, self.models)
        for why in refused:
            log.warning("not exporting %s", why)
            self.stats.skipped.append(why)
        for (namespace, model, tag), host in chosen.items():
            label = f"{namespace}/{model}:{tag}"
            try:
                await self._model(host, namespace, model, tag)
            except _Skip as exc:
                log.warning("not exporting %s (from %s): %s", label, host, exc)
                self.stats.skipped.append(f"{label}: {exc}")
        return self.stats

    async def _model(self, host: str, namespace: str, model: str, tag: str) -> None:
        raw = await trio.to_thread.run_sync(
            self.models.read_manifest, (host, namespace, model, tag))
        if raw is None:
            raise _Skip("the manifest disappeared")
        try:
            manifest = parse_manifest(raw)
        except BadManifest as exc:
            raise _Skip(str(exc)) from None
        repo = self.v2 / namespace / model
        problems: list[str] = []
        blob_stats: list[tuple[str, int]] = []

        async def one(layer: Layer) -> None:
            async with self._limiter:
                try:
                    blob_stats.append((await self._blob(repo, layer), layer.size))
                except _Skip as exc:
                    problems.append(str(exc))

        with first_error():  # an OSError writing the tree stops the export as itself
            async with trio.open_nursery() as nursery:
                for layer in manifest.blobs():
                    nursery.start_soon(one, layer)
        if problems:
            raise _Skip("; ".join(sorted(problems)))
        for outcome, size in blob_stats:
            setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)
            self.stats.blobs += 1
            self.stats.chunksums += 1
            self.stats.bytes += size
            if outcome == "copied":
                self.stats.copied_bytes += size
        # Last: a client that sees the manifest finds every blob it names.
        if await trio.to_thread.run_sync(_write_if_changed, repo / "manifests" / tag, raw):
            self.stats.written += 1
        self.stats.manifests += 1

    async def _blob(self, repo: pathlib.Path, layer: Layer) -> str:
        """Chunk list, then blob entry, for one layer; 'linked', 'copied' or 'unchanged'."""
        digest = parse_digest(layer.digest)
        source = self.models.blob_path(digest)
        src = await trio.to_thread.run_sync(_stat_source, source)
        if src is None:
            raise _Skip(f"blob {digest} is not in the models directory")
        if src.st_size != layer.size:
            raise _Skip(f"blob {digest} is {src.st_size} bytes, the manifest says {layer.size}")
        text = self._lists.get(digest)
        if text is None:
            try:
                chunks = await self.store.chunks(digest, source, self.chunk_size)
            except BlobCorrupt as exc:
                raise _Skip(str(exc)) from None
            except (BlobChanged, OSError) as exc:
                raise _Skip(f"blob {digest} cannot be hashed: {exc}") from None
            text = self._lists[digest] = chunksums_text(chunks)
        if await trio.to_thread.run_sync(_write_if_changed, repo / "chunksums" / digest, text):
            self.stats.written += 1
        try:
            return await self._place(source, repo / "blobs" / digest, src)
        except (BlobChanged, OSError) as exc:
            raise _Skip(f"blob {digest} cannot be placed: {exc}") from None

    async def _place(self, source: pathlib.Path, target: pathlib.Path,
                     src: os.stat_result) -> str:
        if await trio.to_thread.run_sync(_entry_is_current, target, src):
            return "unchanged"
        if await trio.to_thread.run_sync(_try_link, source, target):
            return "linked"
        await self._copy(source, target)
        return "copied"

    async def _copy(self, source: pathlib.Path, target: pathlib.Path) -> None:
        src_fd, dst_fd, tmp, st = await trio.to_thread.run_sync(_open_copy, source, target)
        done = False
        try:
            copier = _Copier(src_fd, dst_fd)
            for offset in range(0, st.st_size, _COPY_PIECE):
                await trio.to_thread.run_sync(
                    copier.copy, offset, min(_COPY_PIECE, st.st_size - offset))
            await trio.to_thread.run_sync(_finish_copy, src_fd, dst_fd, tmp, target, st)
            done = True
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_close_copy, src_fd, dst_fd, tmp, done)


def _check_paths(models_root: pathlib.Path, dest: pathlib.Path, state_dir: pathlib.Path,
                 chunk_size: int) -> None:
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_BYTES:
        raise ExportError(f"chunk size must be between {MIN_CHUNK_SIZE >> 10}K and "
                          f"{MAX_CHUNK_BYTES >> 20}M, got {chunk_size}")
    if not models_root.is_dir():
        raise ExportError(f"models directory {models_root} does not exist")
    root = models_root.resolve()
    if _inside(dest.resolve(), root):
        raise ExportError(f"the export directory {dest} must be outside the models directory "
                          f"{models_root}")
    if _inside(state_dir.resolve(), root):
        raise ExportError(f"the chunksums state directory {state_dir} must be outside the "
                          f"models directory {models_root}")
    if dest.exists() and not dest.is_dir():
        raise ExportError(f"the export directory {dest} exists and is not a directory")


async def export_tree(models_root: os.PathLike | str, dest: os.PathLike | str, *,
                      chunk_size: int = DEFAULT_CHUNK_SIZE,
                      state_dir: os.PathLike | str | None = None) -> ExportStats:
    """Write `models_root` as a static registry tree under `dest` (see the module docstring).

    Raises ExportError before writing anything if the paths or chunk size are unusable, and
    ExportIncomplete after exporting everything else if some models had to be skipped."""
    models_root, dest = pathlib.Path(models_root), pathlib.Path(dest)
    state = pathlib.Path(state_dir) if state_dir is not None else default_state_dir()
    await trio.to_thread.run_sync(_check_paths, models_root, dest, state, chunk_size)
    exporter = _Exporter(ModelsDir(models_root), dest / "v2", ChunksumStore(state), chunk_size)
    stats = await exporter.run()
    if stats.skipped:
        raise ExportIncomplete(
            f"exported {stats.manifests} manifests and {stats.blobs} blobs to {dest}, but "
            f"skipped {len(stats.skipped)}: " + "; ".join(stats.skipped[:5])
            + (" ..." if len(stats.skipped) > 5 else ""), stats)
    return stats

