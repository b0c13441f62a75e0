"""Live status of a mount, for `modelfs status` beside it and for the metrics page.

`MountStatus.snapshot()` asks each owner for its facts at that moment: the resolver which
models the mount knows, the cache what of each blob is cached, verified and sealed, the reader
activity what readers asked for, the kernel page cache what was pushed into it ahead of
them, the fetch engine what it received (and how fast) and how each
source behaved, the disk budget what it evicted. Nothing is copied or kept here.

A mount answers it on a Unix socket in its cache directory (`status.sock`, mode 0600; one mount
per cache, so one socket): each connection gets one JSON document and is closed. A socket path
longer than the kernel allows is reached through /proc/self/fd of the cache directory.

Concurrency contract: the snapshot is made on the trio thread (between awaits, so it is
consistent); the server is one task of the mount's nursery, each connection a task of its own.
The client side (`query`) is plain blocking code for the CLI.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import socket
import time

import trio

log = logging.getLogger("modelfs.fs")

SOCKET_NAME = "status.sock"
ANSWER_TIMEOUT = 5.0  # seconds a client may take to read its answer
_MAX_UNIX_PATH = 100  # sun_path is 108 bytes; keep a margin


class MountStatus:
    def __init__(self, *, mountpoint, resolver, cache, engine, readers, page_cache):
        self._mountpoint = str(mountpoint)
        self._resolver, self._cache, self._engine, self._readers = \
            resolver, cache, engine, readers
        self._page_cache = page_cache
        self._started = time.time()

    def snapshot(self) -> dict:
        stats = self._engine.stats
        models = []
        for name, manifest in sorted(self._resolver.known().items(), key=lambda kv: str(kv[0])):
            blobs = manifest.blobs()
            size = sum(b.size for b in blobs)
            cached = sum(self._cache.cached_bytes(b.digest, b.size) for b in blobs)
            verified = sum(self._cache.verified_bytes(b.digest, b.size) for b in blobs)
            rate = sum(stats.rate(b.digest) for b in blobs)
            models.append({
                "name": name.short(), "size": size, "cached": cached, "verified": verified,
                "read": sum(self._readers.served(b.digest) for b in blobs),
                "pushed": sum(self._page_cache.pushed(b.digest) for b in blobs),
                "fetched": sum(stats.blob_bytes.get(b.digest, 0) for b in blobs),
                "rate": rate, "eta": (size - cached) / rate if rate > 0 and cached < size
                else None,
                "sealed": all(self._cache.is_sealed(b.digest, b.size) for b in blobs),
            })
        return {
            "pid": os.getpid(), "mountpoint": self._mountpoint, "started": self._started,
            "models": models, "rate": stats.rate(),
            "sources": {label: vars(counts) for label, counts in stats.sources.items()},
            "evicted_bytes": self._cache.budget.evicted_bytes,
        }


def socket_path(cache_dir: os.PathLike) -> pathlib.Path:
    return pathlib.Path(cache_dir) / SOCKET_NAME


@contextlib.contextmanager
def _reachable(path: pathlib.Path):
    """A name under which a Unix socket at `path` can be bound or reached: the path itself,
    or, when it is too long for sun_path, the same file through /proc/self/fd of its
    directory."""
    if len(os.fsencode(path)) <= _MAX_UNIX_PATH:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


async def serve_status(cache_dir: os.PathLike, status: MountStatus, *,
                       task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Answer `status.snapshot()` on the cache's status socket until cancelled; the socket
    file goes with it."""
    path = socket_path(cache_dir)
    path.unlink(missing_ok=True)  # a mount that died left it (the cache lock says we own it)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            with _reachable(path) as name:
                await sock.bind(name)
            os.chmod(path, 0o600)
            sock.listen(16)
        except OSError as exc:  # the mount works without it; `status` shows the cache only
            log.warning("no live status for `modelfs status`: %s: %s", path, exc)
            task_status.started()
            return
        task_status.started()

        async def answer(stream: trio.SocketStream) -> None:
            # A convenience: whatever goes wrong here (an index or stat error in the snapshot,
            # a client that never reads) must not reach the mount's nursery and unmount it.
            try:
                with trio.move_on_after(ANSWER_TIMEOUT):
                    await stream.send_all(json.dumps(status.snapshot()).encode())
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the client went away
            except Exception:
                log.exception("answering `modelfs status` failed")
            finally:
                await stream.aclose()

        await trio.serve_listeners(answer, [trio.SocketListener(sock)])
    finally:
        sock.close()
        path.unlink(missing_ok=True)


def query(cache_dir: os.PathLike, timeout: float = 2.0) -> dict | None:
    """The live status of the mount that uses `cache_dir`, or None when none answers."""
    path = socket_path(cache_dir)
    if not path.exists():
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            with _reachable(path) as name:
                sock.connect(name)
            parts = []
            while piece := sock.recv(1 << 16):
                parts.append(piece)
        except OSError:  # (refused: a socket file left by a mount that died)
            return None
    try:
        return json.loads(b"".join(parts))
    except ValueError:
        return None
