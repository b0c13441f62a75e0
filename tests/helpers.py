"""Helpers the tests (and the bench) share: file digests, the `modelfs` command as users run
it, importing a model into a models dir, free ports, and stopping processes we started."""

from __future__ import annotations

import contextlib
import hashlib
import pathlib
import socket
import subprocess
import sys

MODELFS = [sys.executable, "-m", "modelfs.fs.cli"]


def sha256_file(path) -> str:
    """`sha256:<hex>` of a file's bytes, read a MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(1 << 20):
            h.update(piece)
    return "sha256:" + h.hexdigest()


@contextlib.contextmanager
def small_filesystem(path: pathlib.Path, size: str):
    """A tmpfs of `size` (e.g. "32m") mounted on `path` (made here) for the block, unmounted
    after it whatever happens; skips the test where no tmpfs can be mounted."""
    import pytest

    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def modelfs(*args, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """`modelfs ARGS...` as a process, its output captured as text."""
    return subprocess.run(MODELFS + [str(a) for a in args], capture_output=True, text=True,
                          timeout=timeout, **kw)


def import_model(source, name: str, models, *extra) -> None:
    """`modelfs import SOURCE NAME --models MODELS EXTRA...`, which must succeed."""
    r = modelfs("import", source, name, "--models", models, *extra)
    assert r.returncode == 0, r.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen | None) -> None:
    """Terminate a process we started (by its handle), killing it if it lingers."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def receive_bytes(blob, i: int, data: bytes) -> bool:
    """Chunk `i` of `blob` through the cache's one door, exactly as a source delivers it: a
    receiver of the blob (`blob.receiver`) filled piece by piece, each piece taken in as it
    comes (as fetcher/client.py `_fill` does), then `write_chunk`; the buffer is given back as
    a pull does. Returns what `write_chunk` returns. Not committed: the chunk is readable, its
    write is pending (written behind by `commit_chunk`, or by a read of it)."""
    receiver = blob.receiver(i)
    try:
        view, pos = receiver.view, 0
        if len(data) > len(view):
            raise ValueError(f"{len(data)} bytes for a chunk of {len(view)}")
        for lo in range(0, len(data), 64 << 10):
            part = data[lo:lo + (64 << 10)]
            view[pos:pos + len(part)] = part
            pos += len(part)
            receiver.received(pos)
        return await blob.write_chunk(i, receiver)
    finally:
        blob.release_buffer(receiver.buf)


async def put_bytes(blob, i: int, data: bytes) -> None:
    """Chunk `i` of `blob` received, verified (`receive_bytes`), written, made durable and
    recorded (`commit_chunk`), as a pull does it."""
    await receive_bytes(blob, i, data)
    await blob.commit_chunk(i)
