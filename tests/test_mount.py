"""Real mounts: `modelfs mount` over a temporary directory against `modelfs serve`."""

from __future__ import annotations

import concurrent.futures
import errno
import hashlib
import json
import mmap
import os
import random
import signal
import subprocess
import threading
import time

import numpy as np
import pytest

from .gguf_factory import make_gguf_of_size
from .helpers import MODELFS, import_model, sha256_file
from .mounting import Mount, Server, chunk_range, fuse_available, mounted

pytestmark = fuse_available
MiB = 1 << 20
CHUNK = 1 * MiB


@pytest.fixture
def world(tmp_path):
    """A models dir with two models, served on 127.0.0.1 with 1 MiB chunks."""
    models = tmp_path / "models"
    src = tmp_path / "src"
    src.mkdir()
    sources = {}
    for name, size, seed, extra in [
        ("tiny:q1", 6 * MiB + 12345, 1, ["--template", "{{ .System }} {{ .Prompt }}",
                                         "--system", "Be brief.", "--params",
                                         '{"temperature": 0.5}', "--license", "MIT"]),
        ("alice/other:v2", 3 * MiB, 2, []),
    ]:
        path = make_gguf_of_size(src / f"{seed}.gguf", size, seed=seed)
        import_model(path, name, models, *extra)
        sources[name] = path
    server = Server(models, tmp_path / "state", tmp_path / "serve.log").start()
    mounts = []

    def mount(*extra, cache=None, check=True):
        m = Mount(tmp_path / f"mnt{len(mounts)}", cache or tmp_path / "cache", server.url,
                  *extra)
        mounts.append(m)
        m.start(check=check)
        return m

    try:
        yield {"server": server, "models": models, "sources": sources, "mount": mount,
               "tmp": tmp_path}
    finally:
        for m in mounts:
            m.cleanup()
        server.stop()


def manifest(world, name="tiny:q1"):
    model, tag = name.split(":")
    ns, _, model = model.rpartition("/")
    path = world["models"] / "manifests" / "registry.ollama.ai" / (ns or "library") / model / tag
    return path.read_bytes(), json.loads(path.read_bytes())


def digest_of(world, name="tiny:q1", media="model"):
    _, doc = manifest(world, name)
    return next(layer for layer in doc["layers"] if layer["mediaType"].endswith(media))


def test_tree_sizes_and_bytes(world):
    m = world["mount"]("--model", "tiny:q1")
    # pinned at mount time; beside it the Ollama models directory (tests/test_ollama.py)
    assert sorted(os.listdir(m.path)) == ["blobs", "manifests", "tiny:q1"]
    model_dir = m.path / "tiny:q1"
    assert sorted(os.listdir(model_dir)) == ["license", "manifest.json", "model.gguf",
                                             "params.json", "system", "template"]
    raw, doc = manifest(world)
    before = len(world["server"].requests())
    sizes = {p.name: p.stat().st_size for p in model_dir.iterdir()}
    assert len(world["server"].requests()) == before  # stat never fetches
    by_file = {"model.gguf": "model", "template": "template", "system": "system",
               "params.json": "params", "license": "license"}
    for file_name, kind in by_file.items():
        layer = digest_of(world, media=kind)
        assert sizes[file_name] == layer["size"]
        assert sha256_file(model_dir / file_name) == layer["digest"]
        assert os.getxattr(model_dir / file_name, "user.modelfs.digest").decode() == \
            layer["digest"]
    assert (model_dir / "template").read_text() == "{{ .System }} {{ .Prompt }}"
    assert json.loads((model_dir / "params.json").read_text()) == {"temperature": 0.5}
    assert (model_dir / "manifest.json").read_bytes() == raw
    assert sha256_file(model_dir / "model.gguf") == sha256_file(world["sources"]["tiny:q1"])
    # another namespace, resolved on first lookup
    other = m.path / "alice" / "other:v2" / "model.gguf"
    assert sha256_file(other) == sha256_file(world["sources"]["alice/other:v2"])
    assert "alice" in os.listdir(m.path)
    # read-only
    with pytest.raises(OSError) as exc:
        open(model_dir / "template", "w")
    assert exc.value.errno in (errno.EROFS, errno.EACCES)
    with pytest.raises(OSError) as exc:
        os.setxattr(model_dir / "template", "user.x", b"1")
    assert exc.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTSUP)
    # all blobs in: the cache is a complete Ollama model, manifest promoted
    deadline = time.monotonic() + 10
    # (under Ollama's name for it, not the address it came from)
    promoted = m.cache / "manifests" / "registry.ollama.ai" / "library" / "tiny" / "q1"
    while not promoted.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert promoted.read_bytes() == raw


@pytest.mark.parametrize("unit", [0, 4 * MiB])
def test_cold_read_fetches_only_covering_chunks(world, unit):
    """A read fetches the chunk under it; with fetch units (the default), the unit of the
    registry's chunks it falls in, in one request."""
    m = world["mount"]("--prefetch", "none", "--fetch-unit", str(unit))
    model = digest_of(world)
    covering = CHUNK if unit == 0 else unit
    path = m.path / "tiny:q1" / "model.gguf"
    with open(path, "rb") as f:
        f.seek(3 * MiB + 100)
        data = f.read(1000)
    with open(world["sources"]["tiny:q1"], "rb") as f:
        f.seek(3 * MiB + 100)
        assert data == f.read(1000)
    fetched = set(world["server"].ranges(model["digest"]))
    assert chunk_range((3 * MiB) // covering, covering, model["size"]) in fetched
    assert len(fetched) <= 2  # the covering chunk (and at most the kernel's readahead)
    time.sleep(1.1)  # attributes are cached for a second
    assert path.stat().st_blocks * 512 == int(os.getxattr(path, "user.modelfs.cached"))
    assert covering <= path.stat().st_blocks * 512 <= 2 * covering


def test_cold_first_mib_of_a_1gib_model(tmp_path):
    models = tmp_path / "models"
    source = make_gguf_of_size(tmp_path / "big.gguf", 1 << 30, seed=9)
    subprocess.run(MODELFS + ["import", str(source), "big:1g", "--models", str(models)],
                   check=True, capture_output=True)
    os.unlink(source)
    server = Server(models, tmp_path / "state", tmp_path / "serve.log", chunk_size="8M").start()
    m = Mount(tmp_path / "mnt", tmp_path / "cache", server.url, "--prefetch", "sequential")
    try:
        m.start()
        path = m.path / "big:1g" / "model.gguf"
        assert path.stat().st_size > 1000 * MiB
        with open(path, "rb") as f:
            assert len(f.read(MiB)) == MiB
        digest = os.getxattr(path, "user.modelfs.digest").decode()
        time.sleep(1.1)  # let the prefetch window land; attributes are cached for a second
        fetched = set(server.ranges(digest))
        assert chunk_range(0, 8 * MiB, path.stat().st_size) in fetched
        # the covering chunk plus the sequential window (8 MiB after a read at 0, doubled once)
        assert len(fetched) <= 4, fetched
        cached = int(os.getxattr(path, "user.modelfs.cached"))
        assert cached == 8 * MiB * len(fetched)
        assert path.stat().st_blocks * 512 == cached
        du = subprocess.run(["du", "-k", str(path)], capture_output=True, text=True)
        assert int(du.stdout.split()[0]) * 1024 == cached
    finally:
        m.cleanup()
        server.stop()


def test_gguf_reader_preads_and_mmap(world):
    import gguf
    m = world["mount"]()
    path = m.path / "tiny:q1" / "model.gguf"
    source = world["sources"]["tiny:q1"]
    via_mount, local = gguf.GGUFReader(path), gguf.GGUFReader(source)
    assert [f.name for f in via_mount.fields.values()] == [f.name for f in local.fields.values()]
    for name, field in local.fields.items():
        assert via_mount.fields[name].contents() == field.contents()
    assert len(via_mount.tensors) == len(local.tensors) > 0
    for a, b in zip(via_mount.tensors, local.tensors):
        assert a.name == b.name and a.tensor_type == b.tensor_type
        assert np.array_equal(a.data, b.data)
    del via_mount, local

    size = path.stat().st_size
    rng = random.Random(5)
    with open(source, "rb") as s:
        expected = s.read()
    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in range(200):
            off = rng.randrange(0, size)
            n = rng.randrange(1, 300_000)
            assert os.pread(fd, n, off) == expected[off:off + n]
        assert os.pread(fd, 100, size - 10) == expected[-10:]
        with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as mm:
            assert hashlib.sha256(mm).digest() == hashlib.sha256(expected).digest()
    finally:
        os.close(fd)


def test_concurrent_readers_of_one_cold_chunk_fetch_it_once(world):
    m = world["mount"]("--prefetch", "none", "--fetch-unit", "0")
    model = digest_of(world)
    path = m.path / "tiny:q1" / "model.gguf"
    path.stat()
    offset = 4 * MiB + 4096
    barrier = threading.Barrier(16)

    def reader(i):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT) if i % 2 else os.open(path, os.O_RDONLY)
        try:
            barrier.wait()
            return os.pread(fd, 4096, offset + (i % 4) * 8192)
        finally:
            os.close(fd)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(reader, range(16)))
    with open(world["sources"]["tiny:q1"], "rb") as f:
        for i, data in enumerate(results):
            f.seek(offset + (i % 4) * 8192)
            assert data == f.read(4096)
    assert world["server"].ranges(model["digest"]).count(
        chunk_range(4, CHUNK, model["size"])) == 1


def test_unknown_and_invalid_names(world):
    m = world["mount"]()
    before = len(world["server"].requests())
    started = time.monotonic()
    with pytest.raises(FileNotFoundError):
        os.listdir(m.path / "nosuch:latest")
    assert time.monotonic() - started < 1.0
    assert len(world["server"].requests()) == before + 1  # one manifest request
    with pytest.raises(FileNotFoundError):  # remembered: no second request
        os.stat(m.path / "nosuch:latest")
    assert len(world["server"].requests()) == before + 1
    before = len(world["server"].requests())
    for bad in ["..x:latest", "a\x01b:latest", "-x:latest", "x:" + "t" * 200, "tiny:q1:x",
                "sp ace:latest", "alice/..:latest", "%2e%2e:latest", "library",
                "alice/a\nb:latest"]:
        with pytest.raises(OSError) as exc:
            os.stat(m.path / bad)
        assert exc.value.errno in (errno.ENOENT, errno.ENAMETOOLONG), bad
    with pytest.raises(OSError) as exc:
        os.stat(m.path / ("x" * 10_000))
    assert exc.value.errno in (errno.ENOENT, errno.ENAMETOOLONG)
    assert len(world["server"].requests()) == before  # refused without a request


def test_registry_down_cold_read_fails_in_time_cached_reads_work(world):
    m = world["mount"]("--read-timeout", "3", "--model", "tiny:q1", "--prefetch", "none")
    path = m.path / "tiny:q1" / "model.gguf"
    with open(world["sources"]["tiny:q1"], "rb") as f:
        expected = f.read()
    with open(path, "rb") as f:
        assert f.read(4096) == expected[:4096]  # chunk 0 cached
    world["server"].stop()
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        started = time.monotonic()
        with pytest.raises(OSError) as exc:
            os.pread(fd, 4096, 5 * MiB)
        assert exc.value.errno == errno.EIO
        assert time.monotonic() - started < 3 + 2
        assert os.pread(fd, 4096, 0) == expected[:4096]  # cached chunk, registry or not
        world["server"].start()
        assert os.pread(fd, 4096, 5 * MiB) == expected[5 * MiB:5 * MiB + 4096]
    finally:
        os.close(fd)
    assert mounted(m.path)


def test_wrong_bytes_are_never_served(world):
    m = world["mount"]("--read-timeout", "20", "--prefetch", "none", "--fetch-unit", "0")
    model = digest_of(world)
    blob = world["models"] / "blobs" / ("sha256-" + model["digest"][7:])
    path = m.path / "tiny:q1" / "model.gguf"
    with open(path, "rb") as f:  # the server computes its chunk list from the good blob
        f.read(4096)
    offset = 2 * MiB + 777
    st = blob.stat()
    with open(blob, "r+b") as f:  # same size and mtime: the server keeps its list
        f.seek(offset)
        good = f.read(1)
        f.seek(offset)
        f.write(bytes([good[0] ^ 0x55]))
    os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns))
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        with pytest.raises(OSError) as exc:
            os.pread(fd, 4096, 2 * MiB)
        assert exc.value.errno == errno.EIO
        assert world["server"].ranges(model["digest"]).count(
            chunk_range(2, CHUNK, model["size"])) >= 2  # retried before giving up
        with open(blob, "r+b") as f:
            f.seek(offset)
            f.write(good)
        os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns))
        with open(world["sources"]["tiny:q1"], "rb") as f:
            f.seek(2 * MiB)
            assert os.pread(fd, 4096, 2 * MiB) == f.read(4096)
    finally:
        os.close(fd)


def test_unmount_sigterm_and_stale_mount_after_sigkill(world):
    cache = world["tmp"] / "cache"
    m = world["mount"]()
    r = subprocess.run(MODELFS + ["unmount", str(m.path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not mounted(m.path) and m.wait_gone()

    m.start()
    assert mounted(m.path)
    os.kill(m.pid, signal.SIGTERM)
    assert m.wait_gone()
    assert not mounted(m.path)

    m.start()
    os.listdir(m.path / "tiny:q1")
    os.kill(m.pid, signal.SIGKILL)
    assert m.wait_gone()
    with pytest.raises(OSError) as exc:
        os.statvfs(m.path)
    # stale: the kernel mount outlived the daemon
    assert exc.value.errno in (errno.ENOTCONN, errno.ECONNABORTED), errno.errorcode.get(
        exc.value.errno, exc.value.errno)
    again = m.start()  # clears the stale mount and mounts again
    assert "stale mount" in again.stderr
    assert sha256_file(m.path / "tiny:q1" / "template") == digest_of(world, media="template")[
        "digest"]
    r = subprocess.run(MODELFS + ["unmount", str(m.path)], capture_output=True, text=True)
    assert r.returncode == 0 and not mounted(m.path) and m.wait_gone()
    assert cache.exists()


def test_cached_chunks_survive_a_remount(world):
    m = world["mount"]("--model", "tiny:q1", "--fetch-unit", "0")
    model = digest_of(world)
    path = m.path / "tiny:q1" / "model.gguf"
    with open(path, "rb") as f:
        first = f.read(CHUNK)
    m.unmount()
    world["server"].stop()  # everything below must come from the cache
    m.start()
    with open(path, "rb") as f:
        assert f.read(CHUNK) == first
    assert world["server"].ranges(model["digest"]).count(
        chunk_range(0, CHUNK, model["size"])) == 1


def test_foreground_mount_logs_to_stderr_and_stops_on_sigint(world):
    mnt = world["tmp"] / "fg"
    mnt.mkdir()
    proc = subprocess.Popen(MODELFS + ["mount", str(mnt), "--foreground", "--registry",
                                       world["server"].url, "--cache",
                                       str(world["tmp"] / "fg-cache"), "--model", "tiny:q1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("mounted")
        assert (mnt / "tiny:q1" / "template").read_text() == "{{ .System }} {{ .Prompt }}"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0
        assert "unmounted" in err and "modelfs.mount" in err  # its log went to stderr
        assert not mounted(mnt)
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_mount_errors_are_one_line(world):
    m = world["mount"]("--model", "nosuch:latest", check=False)
    result = m.start(check=False)
    assert result.returncode == 1
    assert "not found" in result.stderr and "Traceback" not in result.stderr
    assert not mounted(m.path)
    busy = world["mount"]()
    second = subprocess.run(MODELFS + ["mount", str(busy.path), "--registry",
                                       world["server"].url, "--cache", str(busy.cache)],
                            capture_output=True, text=True)
    assert second.returncode == 1 and "already a mount point" in second.stderr


def test_o_direct_opens_and_aligned_reads(world):
    """What llama.cpp's `dio` load mode does (tests/test_llama.py runs it): O_DIRECT opens,
    page-aligned buffers, aligned offsets, the last block short. A cold mount."""
    m = world["mount"]()
    source = world["sources"]["tiny:q1"].read_bytes()
    size = len(source)
    assert size % 4096  # the last block is partial
    fd = os.open(m.path / "tiny:q1" / "model.gguf", os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 1 << 20)  # page-aligned
    try:
        for off in (3 * MiB + 4096, 0, size - size % 4096, size - (size % 4096) - (1 << 19)):
            n = os.preadv(fd, [buf], off)
            assert n == min(1 << 20, size - off), off
            assert buf[:n] == source[off:off + n], off
        assert os.preadv(fd, [buf], size + 4096 - size % 4096) == 0  # past the end
    finally:
        os.close(fd)
        buf.close()
