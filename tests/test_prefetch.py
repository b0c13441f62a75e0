"""Prefetch through a real mount: the window runs ahead of a sequential reader, background
fetch completes an open model, and one byte budget bounds every fetch in flight."""

import ctypes
import mmap
import os
import re
import sqlite3
import time

import trio

from .helpers import sha256_file
from .mounting import Mount, fuse_available

pytestmark = fuse_available
CHUNK = 64 << 10


async def _mount(reg, tmp_path, *extra) -> Mount:
    m = Mount(tmp_path / "mnt", tmp_path / "cache", reg.url, *extra)
    await trio.to_thread.run_sync(m.start)
    return m


async def test_sequential_reader_finds_next_chunk_already_requested(live_registry, tmp_path):
    reg = await live_registry(chunk_size=CHUNK)
    _, imported = reg.add_model("seq", 64 * CHUNK - 5000)
    d = imported.model.digest
    n_chunks = -(-imported.model.size // CHUNK)
    assert n_chunks == 64
    reg.faults.delay = 0.02  # every range answer takes a while: the reader must not wait for all
    # Eight fetches may be in flight (the default is four): the reader here takes each chunk
    # the moment it lands, so with four the next request races the reader's next read, and the
    # recording server (in this process, under the suite's load) can see it a moment late.
    m = await _mount(reg, tmp_path, "--prefetch", "sequential", "--max-fetches", "8",
                     "--fetch-unit", "0")  # the window in chunks, one request each
    try:
        path = m.path / "seq:latest" / "model.gguf"
        fd = await trio.to_thread.run_sync(os.open, path, os.O_RDONLY | os.O_DIRECT)
        late = []
        try:
            for k in range(n_chunks):
                requested = set(reg.faults.ranges(d))
                nxt = f"bytes={(k + 1) * CHUNK}-"
                if 1 <= k < n_chunks - 1 and not any(r.startswith(nxt) for r in requested):
                    late.append(k)
                # an aligned O_DIRECT read reaches the daemon as it is, chunk by chunk
                data = await trio.to_thread.run_sync(os.pread, fd, CHUNK, k * CHUNK)
                assert len(data) == min(CHUNK, imported.model.size - k * CHUNK)
        finally:
            os.close(fd)
        assert late == []
        ranges = reg.faults.ranges(d)
        assert len(ranges) == len(set(ranges)) == n_chunks  # each chunk fetched once
    finally:
        await trio.to_thread.run_sync(m.cleanup)


async def test_open_model_is_completed_in_the_background(live_registry, tmp_path):
    reg = await live_registry(chunk_size=CHUNK)
    source, imported = reg.add_model("bg", 40 * CHUNK)
    m = await _mount(reg, tmp_path, "--fetch-unit", "0")  # --prefetch auto, a GET a chunk
    try:
        path = m.path / "bg:latest" / "model.gguf"

        def read_first_then_wait():
            with open(path, "rb") as f:
                f.read(4096)
                deadline = time.monotonic() + 20
                while int(os.getxattr(path, "user.modelfs.cached")) < imported.model.size:
                    assert time.monotonic() < deadline, "background fetch did not finish"
                    time.sleep(0.05)

        await trio.to_thread.run_sync(read_first_then_wait)
        assert len(reg.faults.ranges(imported.model.digest)) == 40
        blob = m.cache / "blobs" / ("sha256-" + imported.model.digest[7:])
        for _ in range(100):
            if blob.exists():
                break
            await trio.sleep(0.05)
        assert sha256_file(blob) == sha256_file(source)
    finally:
        await trio.to_thread.run_sync(m.cleanup)


async def test_one_budget_bounds_fetches_in_flight(live_registry, tmp_path):
    reg = await live_registry(chunk_size=CHUNK)
    models = [reg.add_model(f"m{i}", 48 * CHUNK, seed=i)[1] for i in range(3)]
    reg.faults.delay = 0.01
    m = await _mount(reg, tmp_path, "--max-inflight", str(4 * CHUNK), "--max-fetches", "16")
    try:
        def read_all(i):
            path = m.path / f"m{i}:latest" / "model.gguf"
            return sha256_file(path)

        async with trio.open_nursery() as nursery:
            results = {}

            async def one(i):
                results[i] = await trio.to_thread.run_sync(read_all, i)
            for i in range(3):
                nursery.start_soon(one, i)
        for i, imported in enumerate(models):
            assert results[i] == imported.model.digest
        blob_ranges = [s for s in reg.faults.seen if s.range]
        assert len(blob_ranges) >= 3 * 48
        # 16 workers and 3 readers, but never more than 4 chunks of bytes in flight, as the
        # daemon counts them ...
        await trio.to_thread.run_sync(m.unmount)
        peak = re.search(r"peak (\d+) bytes in flight", m.log())
        assert peak and CHUNK <= int(peak.group(1)) <= 4 * CHUNK, m.log()[-500:]
        # ... and as the server sees them (+2: it counts a request until its handler
        # returns, a moment after the client has the whole answer and has started the next)
        assert 2 <= reg.faults.max_ranges_in_flight <= 4 + 2
    finally:
        await trio.to_thread.run_sync(m.cleanup)


def test_a_running_job_remembers_that_a_reader_wants_it_now():
    """A chunk fetched in the background that the window then asks for is kept in memory by
    the worker (materializer._run reads the job's priority when the bytes are in)."""
    from modelfs.fetcher.scheduler import BACKGROUND, WINDOW, FetchQueue
    q = FetchQueue()
    job = q.push(("d", 0), BACKGROUND, None)
    job.running = True
    assert q.push(("d", 0), WINDOW, None) is job and job.priority == WINDOW
    q.push(("d", 0), BACKGROUND, None)
    assert job.priority == WINDOW  # never demoted


def _resident_bytes(path) -> int:
    """Bytes of `path` in the page cache (mmap + mincore, which fault nothing in)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr != ctypes.c_void_p(-1).value, os.strerror(ctypes.get_errno())
        try:
            pages = (ctypes.c_ubyte * -(-size // mmap.PAGESIZE))()
            assert libc.mincore(addr, size, pages) == 0, os.strerror(ctypes.get_errno())
            return sum(p & 1 for p in pages) * mmap.PAGESIZE
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


async def test_chunks_fetched_ahead_are_put_into_the_page_cache(live_registry, tmp_path):
    """A reader that bypasses the page cache (O_DIRECT) reads the first chunk; the window
    fetched ahead of it lands in the kernel's page cache all the same (pushed by the daemon),
    with the right bytes."""
    reg = await live_registry(chunk_size=CHUNK)
    source, imported = reg.add_model("push", 40 * CHUNK)
    m = await _mount(reg, tmp_path, "--prefetch", "sequential")
    try:
        path = m.path / "push:latest" / "model.gguf"

        def read_first_chunk_then_look():
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            try:
                assert os.pread(fd, CHUNK, 0) == source.read_bytes()[:CHUNK]
                deadline = time.monotonic() + 10
                while _resident_bytes(path) < 8 * CHUNK:
                    assert time.monotonic() < deadline, _resident_bytes(path)
                    time.sleep(0.05)
            finally:
                os.close(fd)
            with open(path, "rb") as f:  # served from those pages: still the right bytes
                assert f.read() == source.read_bytes()

        await trio.to_thread.run_sync(read_first_chunk_then_look)
    finally:
        await trio.to_thread.run_sync(m.cleanup)


async def test_sealed_blob_is_served_without_its_own_page_cache(live_registry, tmp_path):
    """A sealed blob is read with direct I/O: reading a model through the mount does not put
    it into the page cache a second time (the cache file's pages), sequential or not, and the
    bytes are right at any offset, up to the unaligned end."""
    reg = await live_registry(chunk_size=1 << 20)
    source, imported = reg.add_model("warm", (20 << 20) + 12345)
    expected = source.read_bytes()
    blob = tmp_path / "cache" / "blobs" / ("sha256-" + imported.model.digest[7:])
    m = await _mount(reg, tmp_path)
    try:
        path = m.path / "warm:latest" / "model.gguf"
        assert await trio.to_thread.run_sync(sha256_file, path) == imported.model.digest
        with trio.fail_after(30):  # sealed once its reader is quiet
            while not blob.exists():
                await trio.sleep(0.05)
        await trio.to_thread.run_sync(m.unmount)
        fd = os.open(blob, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        assert _resident_bytes(blob) == 0
        before_read = time.time()
        await trio.to_thread.run_sync(m.start)

        def read_back():
            with open(path, "rb", buffering=0) as f:
                got = bytearray()
                while piece := f.read(1 << 20):
                    got += piece
            assert got == expected
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            try:  # reads that are not a stream, at odd places, one across the end
                for off in (len(expected) - 4096, 3 << 20, 4096 * 7, 0, 17 << 20):
                    want = expected[off:off + (1 << 20)]
                    assert os.pread(fd, 1 << 20, off) == want, off
            finally:
                os.close(fd)

        await trio.to_thread.run_sync(read_back)
        assert _resident_bytes(blob) <= 2 * mmap.PAGESIZE  # the unaligned last page at most
        assert "Traceback" not in m.log()
        await trio.to_thread.run_sync(m.unmount)
        # every chunk counts as just used (LRU eviction), also those the kernel served itself
        with sqlite3.connect(tmp_path / "cache" / "index.sqlite") as db:
            stale = db.execute("SELECT count(*) FROM chunks WHERE digest=? AND last_access<?",
                               (imported.model.digest, before_read)).fetchone()[0]
        assert stale == 0
    finally:
        await trio.to_thread.run_sync(m.cleanup)
