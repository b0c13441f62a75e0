"""Read deadlines count from the last progress, not from the start of a read (invariant 10):
a real mount over the real registry app, whose blobs come slowly or stop coming."""

from __future__ import annotations

import errno
import os
import time

import pytest
import trio

from . import faults as F
from .helpers import sha256_file
from .mounting import Mount, fuse_available

pytestmark = fuse_available
MiB = 1 << 20


@pytest.mark.parametrize("plane", ["direct", "httpx"])
async def test_a_slow_whole_blob_is_waited_for_and_a_stalled_one_fails_soon(live_registry,
                                                                           tmp_path,
                                                                           monkeypatch, plane):
    """No chunk digests (the blob is fetched whole and sealed before any byte is served), at
    2 MiB/s, with a read timeout of 1 s: the first read waits the 3 s the download takes and
    gets the right bytes. Another blob whose answer stops after 2 MiB fails with EIO about
    1 s after its last byte, not at the data plane's own 30 s stall timeout. Either HTTP stack
    counts the bytes as they come."""
    monkeypatch.setenv("MODELFS_DATA_PLANE", plane)  # (the mount inherits it)
    reg = await live_registry(chunk_size=64 << 10)
    slow_src, slow = reg.add_model("slow", 6 * MiB, seed=1)
    _, stuck = reg.add_model("stuck", 6 * MiB, seed=2)
    reg.faults.add("GET", "/chunksums/", F.reply(404, b"404 page not found"))
    reg.faults.add("GET", "/blobs/" + slow.model.digest, F.throttled(2 * MiB))
    reg.faults.add("GET", "/blobs/" + stuck.model.digest,
                   F.throttled(2 * MiB, stall_after=2 * MiB))
    m = Mount(tmp_path / "mnt", tmp_path / "cache", reg.url, "--read-timeout", "1",
              "--prefetch", "none")
    try:
        await trio.to_thread.run_sync(m.start)

        def first_mib(name: str) -> tuple[bytes | int, float]:
            started = time.monotonic()
            fd = os.open(m.path / f"{name}:latest" / "model.gguf", os.O_RDONLY | os.O_DIRECT)
            try:
                return os.pread(fd, MiB, 0), time.monotonic() - started
            except OSError as exc:
                return exc.errno, time.monotonic() - started
            finally:
                os.close(fd)

        got, took = await trio.to_thread.run_sync(first_mib, "slow")
        assert got == slow_src.read_bytes()[:MiB]
        assert took > 2.5  # it really waited for the whole download, well past the timeout
        path = m.path / "slow:latest" / "model.gguf"
        assert await trio.to_thread.run_sync(sha256_file, path) == slow.model.digest

        got, took = await trio.to_thread.run_sync(first_mib, "stuck")
        assert got == errno.EIO
        # 1 s to the stall, then the 1 s timeout (plus a tick of its watch and some slack)
        assert 1.8 < took < 3.5, took
        assert m.alive()
    finally:
        await trio.to_thread.run_sync(m.cleanup)


async def test_progress_deadline_moves_with_progress_and_fires_after_a_stall(autojump_clock):
    """Under a virtual clock: a wait whose mark moves every half second outlives its 1 s
    timeout many times over; once the mark stops, it fails one timeout (and at most a tick)
    later. Waits that report nothing count against the same timeout."""
    from modelfs.fetcher.deadline import progress_deadline

    done, count = trio.Event(), [0]

    async def download(stall_after: float | None):
        """Progress every half second for 10 s (or until `stall_after`), then done."""
        began = trio.current_time()
        while not done.is_set():
            await trio.sleep(0.5)
            if stall_after is None or trio.current_time() - began < stall_after:
                count[0] += 1
            if trio.current_time() - began >= 10:
                done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(download, None)
        started = trio.current_time()
        with progress_deadline(1.0) as deadline:
            await deadline.wait(done, lambda: count[0])
        assert trio.current_time() - started >= 9.5

    done, count = trio.Event(), [0]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(download, 3)
        started = trio.current_time()
        with pytest.raises(trio.TooSlowError):
            with progress_deadline(1.0) as deadline:
                await deadline.wait(done, lambda: count[0])
        failed_after = trio.current_time() - started
        assert 3.5 <= failed_after <= 3 + 1 + deadline.tick + 0.01, failed_after
        nursery.cancel_scope.cancel()

    with pytest.raises(trio.TooSlowError):  # nothing reported at all
        with progress_deadline(1.0):
            await trio.sleep_forever()
