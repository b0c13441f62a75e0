"""The cache's one door, its durability order, the sealer, resume, and its own defences."""

import hashlib
import logging
import os
import threading

import pytest
import trio

from modelfs.cache.blobcache import BlobCache, CacheBusy
from modelfs.cache.chunks import Chunk
from modelfs.cache.errors import ChunkDigestMismatch, SealMismatch

from .helpers import put_bytes, receive_bytes

DATA = os.urandom(10_000)
SIZE = len(DATA)


def d(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def chunks_of(data: bytes, step: int = 1000) -> list[Chunk]:
    return [Chunk(s, min(s + step, len(data)), d(data[s:s + step]))
            for s in range(0, len(data), step)]


DIGEST, CHUNKS = d(DATA), chunks_of(DATA)


def piece(i: int) -> bytes:
    c = CHUNKS[i]
    return DATA[c.start:c.end]


@pytest.fixture
def cache(tmp_path):
    c = BlobCache(tmp_path / "c", sync_interval=0.01)
    yield c
    c.close()


async def test_out_of_order_chunks_seal_to_the_right_blob(cache):
    blob = cache.open_partial(DIGEST, SIZE, CHUNKS)
    order = [3, 9, 0, 1, 7, 2, 8, 4, 6, 5]
    async with trio.open_nursery() as nursery:
        for i in order:
            nursery.start_soon(put_bytes, blob, i, piece(i))
    path = await blob.seal()
    assert path.read_bytes() == DATA
    assert cache.is_sealed(DIGEST, SIZE)
    assert all(cache.index.load(DIGEST)[2])  # rows kept: a sealed blob is evicted by chunks
    assert not blob.path.exists()


async def test_a_chunk_that_fails_its_digest_is_never_written(cache):
    blob = cache.open_partial(DIGEST, SIZE, CHUNKS)
    bad = bytearray(piece(4))
    bad[0] ^= 1
    with pytest.raises(ChunkDigestMismatch):
        await put_bytes(blob, 4, bytes(bad))
    assert not blob.present[4] and not cache.index.load(DIGEST)[2][4]
    with open(blob.path, "rb") as f:
        f.seek(CHUNKS[4].start)
        assert f.read(CHUNKS[4].length) == b"\0" * CHUNKS[4].length
    with pytest.raises(ChunkDigestMismatch):
        await put_bytes(blob, 4, piece(4)[:-1])  # wrong length


async def test_a_chunk_is_recorded_only_after_it_is_durable(cache, monkeypatch):
    blob = cache.open_partial(DIGEST, SIZE, CHUNKS)
    synced = []

    def failing_fdatasync(fd):
        synced.append(fd)
        raise OSError(5, "I/O error")

    monkeypatch.setattr(os, "fdatasync", failing_fdatasync)
    with pytest.raises(OSError):
        await put_bytes(blob, 2, piece(2))
    assert synced  # it did try to make the bytes durable first
    assert not blob.present[2] and not cache.index.load(DIGEST)[2][2]
    monkeypatch.undo()
    await put_bytes(blob, 2, piece(2))
    assert cache.index.load(DIGEST)[2][2]


async def test_resume_keeps_chunks_for_the_same_list_only(tmp_path):
    cache = BlobCache(tmp_path / "c", sync_interval=0.01)
    blob = cache.open_partial(DIGEST, SIZE, CHUNKS)
    for i in (0, 5):
        await put_bytes(blob, i, piece(i))
    cache.close()

    cache = BlobCache(tmp_path / "c", sync_interval=0.01)  # as after a restart
    blob = cache.open_partial(DIGEST, SIZE, CHUNKS)
    assert blob.missing() == [1, 2, 3, 4, 6, 7, 8, 9]
    assert blob.cached_bytes() == 2000
    for i in blob.missing():
        await put_bytes(blob, i, piece(i))
    assert (await blob.seal()).read_bytes() == DATA  # the sealer re-read the resumed chunks
    cache.close()

    cache = BlobCache(tmp_path / "c", sync_interval=0.01)
    other = d(DATA[::-1])
    blob = cache.open_partial(other, SIZE, chunks_of(DATA[::-1]))
    await put_bytes(blob, 0, DATA[::-1][:1000])
    blob = cache.open_partial(other, SIZE, chunks_of(DATA[::-1], 2000))  # another list
    assert blob.missing() == list(range(5))
    cache.close()


async def test_a_replaced_blob_records_nothing_in_the_new_list(cache):
    """A chunk written under one chunk list, committed after the list was replaced: its index
    names a row of the new list, which must not be recorded present (after a restart it would
    be trusted over a hole)."""
    blob = cache.open_partial(DIGEST, SIZE, CHUNKS)
    assert await receive_bytes(blob, 3, piece(3))  # readable, not yet committed
    newer = cache.open_partial(DIGEST, SIZE, chunks_of(DATA, 2000))  # another list
    await blob.commit_chunk(3)  # the old object's commit still runs
    assert cache.index.load(DIGEST)[2] == [0] * len(newer.chunks)
    assert newer.missing() == list(range(len(newer.chunks)))
    assert cache.unrecorded.held == 0  # its room was given back


async def test_a_blob_started_over_gives_its_room_back(cache):
    """A new chunk list (or a lost file) starts the blob over: the bytes it had, recorded or
    only written, leave the budget with its rows and its file (they stayed counted until the
    next recount)."""
    blob = cache.open_partial(DIGEST, SIZE, CHUNKS)
    for i in (0, 5):
        await put_bytes(blob, i, piece(i))
    assert await receive_bytes(blob, 7, piece(7))  # readable, its write pending
    assert await blob.read(CHUNKS[7].start, 1000) == piece(7)  # a read writes it: not recorded
    assert cache.budget.used == 3000
    blob = cache.open_partial(DIGEST, SIZE, chunks_of(DATA, 2000))  # another list
    assert cache.budget.used == cache.index.usage() == 0
    await put_bytes(blob, 1, DATA[2000:4000])
    cache.release(blob)
    blob.path.unlink()  # lost behind our back
    cache.open_partial(DIGEST, SIZE, chunks_of(DATA, 2000))
    assert cache.budget.used == cache.index.usage() == 0


# A lying chunk list on purpose; the discard gives the blob's bytes back without telling the
# budget (PartialBlob.discard), which counts them until its next recount.
@pytest.mark.invariants(budget_exact=False)
async def test_seal_mismatch_discards_everything(cache, caplog):
    lying = chunks_of(DATA[:-1] + b"X")
    blob = cache.open_partial(DIGEST, SIZE, lying)
    forged = DATA[:-1] + b"X"
    for i, c in enumerate(lying):
        await put_bytes(blob, i, forged[c.start:c.end])
    with caplog.at_level(logging.ERROR), pytest.raises(SealMismatch):
        await blob.seal()
    assert "SEAL MISMATCH" in caplog.text
    assert not cache.store.blob_path(DIGEST).exists()
    assert not blob.path.exists() and cache.index.load(DIGEST) is None


# The sealed file is changed behind the cache's back on purpose: it stays in blobs/, to be
# hashed again before it is trusted.
@pytest.mark.invariants(unadopted=True)
async def test_a_blob_file_is_trusted_only_once_hashed(cache, caplog):
    path = cache.store.blob_path(DIGEST)
    path.write_bytes(DATA)  # put there by someone else: not sealed by us
    assert not cache.is_sealed(DIGEST, SIZE)
    assert await cache.adopt_sealed(DIGEST, SIZE)
    assert cache.is_sealed(DIGEST, SIZE)
    os.utime(path, ns=(1, 1))  # changed behind our back
    assert not cache.is_sealed(DIGEST, SIZE)

    other = d(b"y" * 100)
    cache.store.blob_path(other).write_bytes(b"z" * 100)  # right size, wrong bytes
    with caplog.at_level(logging.ERROR):
        assert not await cache.adopt_sealed(other, 100)
    assert "does not hash to its name" in caplog.text
    assert not cache.store.blob_path(other).exists()


def test_garbage_index_is_an_empty_cache(tmp_path, caplog):
    root = tmp_path / "c"
    root.mkdir()
    (root / "index.sqlite").write_bytes(b"this is not a database" * 100)
    (root / "partial").mkdir()
    (root / "partial" / "sha256-" ).with_name("sha256-" + "a" * 64 + ".partial").write_bytes(b"x")
    with caplog.at_level(logging.WARNING):
        cache = BlobCache(root, sync_interval=0.01)
    assert "unreadable" in caplog.text
    assert cache.index.digests() == []
    assert list((root / "partial").iterdir()) == []  # unknown partials are removed
    cache.close()


def test_one_process_per_cache(tmp_path):
    first = BlobCache(tmp_path / "c", sync_interval=0.01)
    with pytest.raises(CacheBusy, match=f"pid {os.getpid()}"):
        BlobCache(tmp_path / "c", sync_interval=0.01)
    first.close()
    BlobCache(tmp_path / "c", sync_interval=0.01).close()


# Over the cap on purpose: b's chunks (two more than fit) may come while a is being sealed and
# nothing of it can be evicted; the budget evicts that excess at its next write, not after.
@pytest.mark.invariants(over_cap=2 << 20)
async def test_no_chunk_is_evicted_from_under_a_seal(tmp_path):
    """A cap forces eviction while another blob is being sealed: the sealed blob must be whole
    (the eviction takes other chunks, or goes over the cap, never a hole in blobs/)."""
    step = 1 << 20
    a_data, b_data = os.urandom(8 * step), os.urandom(8 * step)
    cache = BlobCache(tmp_path / "c", sync_interval=0.01, cap=9 * step)
    try:
        a = cache.open_partial(d(a_data), len(a_data), chunks_of(a_data, step))
        for i in range(8):
            await put_bytes(a, i, a_data[i * step:(i + 1) * step])
        b = cache.open_partial(d(b_data), len(b_data), chunks_of(b_data, step))
        sealed = {}

        async def seal_a():
            sealed["path"] = await a.seal()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(seal_a)
            for i in range(3):
                nursery.start_soon(put_bytes, b, i, b_data[i * step:(i + 1) * step])
        data = cache.store.blob_path(d(a_data)).read_bytes() if cache.is_sealed(
            d(a_data), len(a_data)) else None
        assert data is None or data == a_data
        for blob, source in ((a, a_data), (b, b_data)):
            for i, chunk in enumerate(blob.chunks):
                if blob.readable[i]:
                    assert (await blob.read(chunk.start, chunk.length)) == \
                        source[chunk.start:chunk.end]
    finally:
        cache.close()


async def test_eviction_frees_least_recently_used_chunks_and_unseals(tmp_path):
    step = 1000
    cache = BlobCache(tmp_path / "c", sync_interval=0.01, cap=12 * step)
    try:
        blob = cache.open_partial(DIGEST, SIZE, CHUNKS)
        for i in range(10):
            await put_bytes(blob, i, piece(i))
        await blob.seal()
        assert cache.is_sealed(DIGEST, SIZE)
        cache.budget.touch(DIGEST, [0, 1])  # read lately: evicted last
        other = os.urandom(5 * step)
        ob = cache.open_partial(d(other), len(other), chunks_of(other))
        for i in range(5):
            await put_bytes(ob, i, other[i * step:(i + 1) * step])
        # 15 chunks into a 12-chunk cap: 3 of the sealed blob went, not the touched ones
        assert not cache.is_sealed(DIGEST, SIZE)  # back to in progress: blobs/ holds wholes
        assert not cache.store.blob_path(DIGEST).exists()
        assert blob.readable[0] and blob.readable[1]
        assert blob.readable.count(False) == 3
        assert cache.budget.used <= 12 * step
        for i, here in enumerate(blob.readable):
            if here:
                assert await blob.read(CHUNKS[i].start, CHUNKS[i].length) == piece(i)
    finally:
        cache.close()


async def test_a_write_retried_after_enospc_is_counted_once(tmp_path, monkeypatch):
    """The disk fills under a write: the budget evicts for it and the write is tried again.
    Its bytes are counted once (they were counted twice, one chunk too many per ENOSPC, until
    the next recount)."""
    import errno

    from modelfs.cache import directio
    real, failed = directio.pwrite_all, []

    def full_once(fd, data, offset):
        if offset == 4 * 1000 and not failed:
            failed.append(offset)
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data, offset)

    monkeypatch.setattr(directio, "pwrite_all", full_once)  # (chunks not page-aligned)
    cache = BlobCache(tmp_path / "c", sync_interval=0.01)
    try:
        blob = cache.open_partial(DIGEST, SIZE, CHUNKS)
        for i in range(5):
            await put_bytes(blob, i, piece(i))
        assert failed and cache.budget.evicted_bytes == 1000  # room was made for the retry
        assert cache.budget.used == cache.index.usage() == 4000
    finally:
        cache.close()


async def test_an_adopted_blob_is_dropped_whole_for_room(tmp_path):
    """A blob adopted from blobs/ has no chunk digests: when its room is needed it goes whole
    (a hole would leave bytes that nothing could verify again)."""
    cache = BlobCache(tmp_path / "c", sync_interval=0.01, cap=SIZE + 5000)
    try:
        cache.store.blob_path(DIGEST).write_bytes(DATA)
        assert await cache.adopt_sealed(DIGEST, SIZE)
        assert cache.budget.used == SIZE
        other = os.urandom(8000)
        ob = cache.open_partial(d(other), len(other), chunks_of(other))
        for i in range(8):
            await put_bytes(ob, i, other[i * 1000:(i + 1) * 1000])
        assert not cache.store.blob_path(DIGEST).exists()
        assert cache.index.load(DIGEST) is None and not cache.is_sealed(DIGEST, SIZE)
        assert not (cache.partial_dir / ("sha256-" + DIGEST[7:] + ".partial")).exists()
        assert all(ob.readable) and cache.budget.used <= SIZE + 5000
    finally:
        cache.close()


# -- received chunks: buffers filled by the data plane, written with direct I/O --------------

BIG = os.urandom(3 * 65536 + 1234)  # page-aligned chunks, and a tail that is not
BIG_CHUNKS = chunks_of(BIG, 65536)


def _received(blob, i: int, data: bytes):
    rec = blob.receiver(i)
    rec.view[:len(data)] = data
    rec.received(len(data))
    return rec


async def test_received_chunks_go_through_the_same_door(cache, tmp_path, monkeypatch):
    """Verified, readable at once, written behind (with direct I/O) by commit_chunk; file
    reads of a chunk whose write is pending wait for it."""
    from modelfs.cache import writeback
    direct = []
    real = writeback.write_received
    monkeypatch.setattr(writeback, "write_received",
                        lambda dfd, *a: direct.append(dfd >= 0) or real(dfd, *a))
    blob = cache.open_partial(d(BIG), len(BIG), BIG_CHUNKS)
    assert blob._io.direct  # a disk filesystem: the direct path is the one under test
    for i in (3, 1, 0, 2):  # the unaligned tail first, out of order
        c = BIG_CHUNKS[i]
        rec = _received(blob, i, BIG[c.start:c.end])
        assert await blob.write_chunk(i, rec)
        blob.release_buffer(rec.buf)
        assert blob.readable[i] and not blob.present[i]
        if i == 1:  # not in the file yet: a file read waits for (and does) the write
            assert await blob.read(c.start, c.length) == BIG[c.start:c.end]
        await blob.commit_chunk(i)
    assert direct == [True] * 4
    loaded = await blob.load_chunk(1)
    assert bytes(loaded.view) == BIG[65536:131072]
    blob.release_buffer(loaded)
    path = await blob.seal()
    assert path.read_bytes() == BIG
    assert cache.pool.allocated <= cache.pool.keep  # every buffer came back


async def test_a_bad_received_chunk_is_never_written(cache):
    blob = cache.open_partial(d(BIG), len(BIG), BIG_CHUNKS)
    c = BIG_CHUNKS[1]
    bad = bytearray(BIG[c.start:c.end])
    bad[100] ^= 1
    rec = _received(blob, 1, bytes(bad))
    with pytest.raises(ChunkDigestMismatch):
        await blob.write_chunk(1, rec)
    short = _received(blob, 2, BIG[2 * 65536:3 * 65536 - 1])
    with pytest.raises(ChunkDigestMismatch, match="got 65535 bytes"):
        await blob.write_chunk(2, short)
    assert not blob.readable[1] and not blob.readable[2]
    with open(blob.path, "rb") as f:
        f.seek(c.start)
        assert f.read(c.length) == bytes(c.length)  # still a hole
    for rec in (rec, short):
        blob.release_buffer(rec.buf)


async def test_a_receiver_does_not_wait_for_ever_for_a_sealer_that_cannot_move(cache,
                                                                             monkeypatch):
    """Where the seal is awaited (no readers: a pull), a chunk far ahead of the sealer waits for it
    to come closer; but the sealer waits for chunk 0, which nobody fetches (a resumed pull):
    after SEALER_PATIENCE the receiver goes on, and so do the ones after it."""
    from modelfs.cache import sealer
    monkeypatch.setattr(sealer, "EARLY_LIMIT", 2 * 65536)
    monkeypatch.setattr(sealer, "SEALER_PATIENCE", 0.2)
    blob = cache.open_partial(d(BIG), len(BIG), BIG_CHUNKS)
    c = BIG_CHUNKS[3]
    rec = _received(blob, 3, BIG[c.start:c.end])
    t = trio.current_time()
    with trio.fail_after(5):
        assert await blob.write_chunk(3, rec)
    assert 0.2 <= trio.current_time() - t  # it did wait for the sealer first
    c = BIG_CHUNKS[2]
    rec2 = _received(blob, 2, BIG[c.start:c.end])
    with trio.fail_after(0.15):  # the sealer is known not to move: no second wait
        assert await blob.write_chunk(2, rec2)
    for r, i in ((rec, 3), (rec2, 2)):
        blob.release_buffer(r.buf)
        await blob.commit_chunk(i)


# A landed chunk is corrupted on purpose; dropping it gives its bytes back without telling the
# budget (LandedChecks.drop), which counts them until its next recount.
@pytest.mark.invariants(budget_exact=False)
@pytest.mark.parametrize("reader_steps", [0, 1, 2, 4, 8, 16])
async def test_a_reader_dropping_a_corrupt_landed_chunk_during_a_seal_blames_the_chunk(
        tmp_path, reader_steps):
    """Chunks a pull left LANDED (never checked on their own), one corrupt on disk; a mount
    seals the blob while a reader checks that chunk (verify_landed) and drops it. However the
    two interleave, the seal never blames the chunk list (SealMismatch would discard every
    chunk): it reports the chunk, or that it lost it, and once the chunk is fetched again the
    blob seals with the right bytes."""
    from modelfs.cache.errors import LandedChunksBad, SealInterrupted

    data = os.urandom(16 * 4096)
    digest, chunks = d(data), chunks_of(data, 4096)
    cache = BlobCache(tmp_path / "c", sync_interval=0.01)
    try:
        blob = cache.open_partial(digest, len(data), chunks, check_whole=True)
        for i, c in enumerate(chunks):
            await put_bytes(blob, i, data[c.start:c.end])
        cache.index.mark_present(digest, list(range(len(chunks))), verified=False)  # landed
        cache.release(blob)
        bad = 10
        path = cache.partial_dir / ("sha256-" + digest[7:] + ".partial")
        with open(path, "r+b") as f:
            f.seek(chunks[bad].start + 5)
            f.write(b"\xff" * 8)
        blob = cache.open_partial(digest, len(data), chunks)  # as a mount opens it
        assert all(blob.landed) and not any(blob.readable)
        outcome = {}

        async def seal():
            try:
                await blob.seal()
                outcome["seal"] = "sealed"
            except (LandedChunksBad, SealInterrupted, SealMismatch) as exc:
                outcome["seal"] = type(exc).__name__

        async def reader():
            for _ in range(reader_steps):
                await trio.sleep(0)
            outcome["read"] = await blob.verify_landed(bad)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(seal)
            nursery.start_soon(reader)
        assert outcome["seal"] in ("LandedChunksBad", "SealInterrupted")
        assert outcome["read"] is None  # the corrupt bytes were never handed out
        assert path.exists() and not blob.present[bad] and not blob.landed[bad]
        await put_bytes(blob, bad, data[chunks[bad].start:chunks[bad].end])
        await blob.seal()
        assert cache.store.blob_path(digest).read_bytes() == data
    finally:
        cache.close()


class _Source:
    """A chunk source (fetcher/source.py) serving each range from `data`, once `answer` is
    set (`asked` is set when a range is asked for)."""

    name = "a test source"

    def __init__(self, data: bytes):
        self.data = data
        self.asked, self.answer = trio.Event(), trio.Event()

    async def fetch_into(self, start, end, size, receiver):
        self.asked.set()
        await self.answer.wait()
        receiver.view[:end - start] = self.data[start:end]
        receiver.received(end - start)


async def _open_landed(cache, data: bytes, chunks, corrupt: list[int]):
    """`data` as a pull leaves it (every chunk LANDED, never checked on its own), the chunks
    in `corrupt` damaged on disk, opened again as a mount opens it."""
    digest = d(data)
    blob = cache.open_partial(digest, len(data), chunks, check_whole=True)
    for i, c in enumerate(chunks):
        await put_bytes(blob, i, data[c.start:c.end])
    cache.index.mark_present(digest, list(range(len(chunks))), verified=False)  # landed
    cache.release(blob)
    with open(cache.partial_dir / ("sha256-" + digest[7:] + ".partial"), "r+b") as f:
        for i in corrupt:
            f.seek(chunks[i].start + 5)
            f.write(b"\xff" * 8)
    blob = cache.open_partial(digest, len(data), chunks)
    assert all(blob.landed) and not any(blob.readable)
    return blob


def _gate_checks(monkeypatch, blob, at):
    """Any check of landed chunk i from the file, for i in `at` (the seal's, here), sets
    entered[i] and waits for go[i]; a reader's check of a chunk not in `at` goes on."""
    entered = {i: trio.Event() for i in at}
    go = {i: trio.Event() for i in at}
    real = blob._landed.load_checked

    async def load_checked(i):
        if i in at:
            entered[i].set()
            await go[i].wait()
        return await real(i)
    monkeypatch.setattr(blob._landed, "load_checked", load_checked)
    return entered, go


async def _assert_served_and_sealed(blob, cache, data, chunks, i):
    """Chunk i's right bytes are in the file and a read returns them; the blob then seals."""
    c = chunks[i]
    with open(blob.path, "rb") as f:
        f.seek(c.start)
        on_disk = f.read(c.length)
    punched = on_disk == bytes(c.length)
    assert not punched, "a hole was punched over the chunk fetched again"
    assert on_disk == data[c.start:c.end]
    assert blob.readable[i] and blob.present[i]
    assert await blob.read(c.start, c.length) == data[c.start:c.end]
    for j in blob.missing():
        await put_bytes(blob, j, data[chunks[j].start:chunks[j].end])
    await blob.seal()
    assert cache.store.blob_path(d(data)).read_bytes() == data


def _seal_and_refetch(blob, source, i, expect: bytes | None = None):
    """The two sides of a race against a seal's check of landed chunks: `seal` must fail with
    LandedChunksBad (the chunks it blamed go to `outcome["blamed"]`); `reader` fetches chunk
    `i` again through the one fetch path (its bytes must be `expect`, when given), records it
    and sets `refetched`."""
    from modelfs.cache.errors import LandedChunksBad
    from modelfs.fetcher.fetch import fetch_chunk
    from modelfs.fetcher.retry import RetryPolicy

    outcome, refetched = {}, trio.Event()

    async def seal():
        with pytest.raises(LandedChunksBad) as exc:
            await blob.seal()
        outcome["blamed"] = exc.value.indexes

    async def reader():
        buf = await fetch_chunk(source, blob, i, RetryPolicy(attempts=1))
        if expect is not None:
            assert bytes(buf.view) == expect
        blob.release_buffer(buf)
        await blob.commit_chunk(i)
        refetched.set()

    return seal, reader, outcome, refetched


# Landed chunks corrupted on purpose; dropping them gives their bytes back without telling the
# budget (LandedChecks.drop), which counts them until its next recount.
@pytest.mark.invariants(budget_exact=False)
@pytest.mark.parametrize("dropped", ["before the check reaches it", "after the check failed it"])
async def test_a_chunk_a_reader_drops_and_fetches_again_during_the_check_is_not_punched(
        tmp_path, monkeypatch, dropped):
    """A seal that did not match checks each landed chunk; meanwhile a reader (fetch_chunk, as
    a mount does) finds one corrupt, drops it and fetches it again, and the fresh, verified
    bytes are written and recorded before the check ends. The check must not punch a hole over
    them (they would be served as zeros, and the blob would never seal), and it must still
    blame that chunk (LandedChunksBad), not the chunk list. The interleaving is forced: the
    check waits at chunks 0 and bad+1, the registry answers when told."""

    data = os.urandom(16 * 4096)
    chunks, bad = chunks_of(data, 4096), 10
    cache = BlobCache(tmp_path / "c", sync_interval=0.01)
    try:
        blob = await _open_landed(cache, data, chunks, [bad])
        entered, go = _gate_checks(monkeypatch, blob, {0, bad + 1})
        registry = _Source(data)
        seal, reader, outcome, refetched = _seal_and_refetch(
            blob, registry, bad, data[chunks[bad].start:chunks[bad].end])

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(seal)
                if dropped == "before the check reaches it":
                    await entered[0].wait()
                    nursery.start_soon(reader)
                    await registry.asked.wait()  # dropped it, and fetches it again
                    assert not blob.landed[bad] and not blob.readable[bad]
                    go[0].set()
                    await entered[bad + 1].wait()  # the check went past it
                else:
                    go[0].set()
                    await entered[bad + 1].wait()  # the check found it corrupt
                    assert blob.landed[bad]
                    nursery.start_soon(reader)
                registry.answer.set()
                await refetched.wait()  # fetched again: verified, written, recorded
                go[bad + 1].set()
        assert outcome["blamed"] == [bad]
        await _assert_served_and_sealed(blob, cache, data, chunks, bad)
    finally:
        cache.close()


# Landed chunks corrupted on purpose; dropping them gives their bytes back without telling the
# budget (LandedChecks.drop), which counts them until its next recount.
@pytest.mark.invariants(budget_exact=False)
async def test_a_chunk_fetched_again_while_the_check_punches_holes_keeps_its_bytes(
        tmp_path, monkeypatch):
    """The check drops two corrupt landed chunks; while the hole of the first is being
    punched (held in its thread), a reader fetches the second again. Its fresh bytes must not
    be punched after they are written: the decision and the punches are one step under the
    file's write lock, so the write comes after them. (The reader is let go on once its write
    is done, or waits for the write lock.)"""
    from modelfs.cache import writeback

    data = os.urandom(16 * 4096)
    chunks, first, second = chunks_of(data, 4096), 5, 10
    cache = BlobCache(tmp_path / "c", sync_interval=0.01)
    try:
        blob = await _open_landed(cache, data, chunks, [first, second])
        punching, release = trio.Event(), threading.Event()
        token = trio.lowlevel.current_trio_token()
        real_punch = writeback.punch_hole

        def punch_hole(fd, offset, length):
            if offset == chunks[first].start:
                trio.from_thread.run_sync(punching.set, trio_token=token)
                assert release.wait(20)
            real_punch(fd, offset, length)
        monkeypatch.setattr(writeback, "punch_hole", punch_hole)
        registry = _Source(data)
        registry.answer.set()
        seal, reader, outcome, refetched = _seal_and_refetch(blob, registry, second)

        try:
            with trio.fail_after(20):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(seal)
                    await punching.wait()
                    assert not blob.landed[second] and not blob.readable[second]
                    nursery.start_soon(reader)
                    while not (refetched.is_set() or
                               blob._io.lock.statistics().tasks_waiting):
                        await trio.sleep(0.001)  # (a state polled for, not a race hoped for)
                    release.set()
        finally:
            release.set()
        assert sorted(outcome["blamed"]) == [first, second]
        await _assert_served_and_sealed(blob, cache, data, chunks, second)
    finally:
        cache.close()


@pytest.mark.parametrize("found, kept", [("3", True), ("4", True), ("2", False)])
async def test_an_older_index_is_upgraded_or_set_aside(tmp_path, found, kept):
    """A version-3 index cannot hold LANDED chunks, a version-4 one no fetch units: either is
    taken as it is, given the units' column (its rows are units of one chunk each) and marked
    5, so a modelfs that knows only 3 or 4 sets it aside instead of serving landed chunks as
    verified or taking a unit's digest for a chunk's. Anything else unknown is set aside: the
    cache starts cold."""
    import sqlite3

    cache = BlobCache(tmp_path / "c", sync_interval=0.01)
    blob = cache.open_partial(DIGEST, SIZE, CHUNKS)
    for i in (0, 5):
        await put_bytes(blob, i, piece(i))
    cache.close()
    with sqlite3.connect(tmp_path / "c" / "index.sqlite") as db:
        db.execute("UPDATE meta SET value=? WHERE key='format'", (found,))
        db.execute("ALTER TABLE chunks DROP COLUMN parts")  # as formats up to 4 had it
    cache = BlobCache(tmp_path / "c", sync_interval=0.01)
    try:
        blob = cache.open_partial(DIGEST, SIZE, CHUNKS)
        assert blob.missing() == ([1, 2, 3, 4, 6, 7, 8, 9] if kept else list(range(10)))
        assert cache.index.get_meta("format") == "5"
        assert cache.index.load(DIGEST)[1] == CHUNKS
    finally:
        cache.close()


# -- what a crash may cost: the unrecorded budget ----------------------------------------------

async def test_the_unrecorded_budget_admits_up_to_its_limit_and_presses_from_half(
        autojump_clock):
    from modelfs.cache.groupsync import UnrecordedBudget
    budget = UnrecordedBudget(4000)
    woken = trio.Event()
    budget.notify(woken)
    await budget.admit(1000)
    assert not budget.pressed and not woken.is_set()
    await budget.admit(1000)  # half: group syncs waiting for their interval go now
    assert budget.pressed and woken.is_set()
    await budget.admit(2000)
    assert budget.held == 4000
    admitted = []

    async def late(n):
        await budget.admit(n)
        admitted.append(n)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(late, 1000)
        await trio.sleep(1)
        assert admitted == [] and budget.held == 4000  # no room: it waits
        budget.settle(2000)
    assert admitted == [1000] and budget.held == 3000
    for n in (1000, 1000, 1000):
        budget.settle(n)
    await budget.admit(10_000)  # larger than the limit, alone: it fits
    assert budget.pressed
    quiet = trio.Event()
    budget.settle(10_000)
    budget.notify(quiet)
    assert not budget.pressed and not quiet.is_set()


CHUNK64 = 64 << 10


def _blob_of(cache, n: int, seed: int):
    data = hashlib.sha256(bytes([seed])).digest() * (n * CHUNK64 // 32)
    chunks = chunks_of(data, CHUNK64)
    return cache.open_partial(d(data), len(data), chunks), data


def _unrecorded(blob) -> int:
    return sum(c.length for c, ok, here in zip(blob.chunks, blob.readable, blob.present)
               if ok and not here)


async def test_a_burst_is_recorded_by_bytes_not_only_on_the_timer(tmp_path):
    """Sync interval a minute, budget 8 chunks: chunks written one after the other (commits
    behind them, as a mount does) never leave more than the budget unrecorded, are recorded
    without waiting for the timer, and a few at a time per fdatasync."""
    limit, n = 8 * CHUNK64, 64
    cache = BlobCache(tmp_path / "c", sync_interval=60, max_unrecorded=limit)
    try:
        blob, data = _blob_of(cache, n, 1)
        most = 0
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for i in range(n):
                    assert await receive_bytes(blob, i, data[i * CHUNK64:(i + 1) * CHUNK64])
                    # (written behind by its commit, as in a mount: a sync waits for the
                    # writes under way rather than cover none of them)
                    most = max(most, _unrecorded(blob))
                    assert cache.unrecorded.held <= limit
                    nursery.start_soon(blob.commit_chunk, i)
                    await trio.sleep(0)
                # what is left once the syncs catch up is below half the budget: the timer's,
                # unless told otherwise
                while _unrecorded(blob) >= limit // 2:
                    await trio.sleep(0.01)
                blob.hurry()
        assert most <= limit
        assert blob.complete and cache.unrecorded.held == 0
        assert all(p == 1 for p in cache.index.load(blob.digest)[2])
        # batched: a sync per several chunks (about half the budget's worth), not one each
        assert blob._sync.syncs <= n // 2, blob._sync.syncs
    finally:
        cache.close()


async def test_the_budget_is_one_for_all_blobs_of_a_cache(tmp_path):
    """Chunks of one blob below the trigger are recorded at once when another blob's take the
    cache's unrecorded bytes to half the budget: the bound is per cache."""
    limit = 8 * CHUNK64
    cache = BlobCache(tmp_path / "c", sync_interval=60, max_unrecorded=limit)
    try:
        a, a_data = _blob_of(cache, 4, 2)
        b, b_data = _blob_of(cache, 4, 3)
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                await put_bytes(a, 0, a_data[:CHUNK64])  # the first sync: at once
                for i in (1, 2):
                    await receive_bytes(a, i, a_data[i * CHUNK64:(i + 1) * CHUNK64])
                    nursery.start_soon(a.commit_chunk, i)
                await trio.sleep(0.5)
                assert not a.present[1] and not a.present[2]  # waiting for the interval
                for i in (0, 1):
                    await receive_bytes(b, i, b_data[i * CHUNK64:(i + 1) * CHUNK64])
                    nursery.start_soon(b.commit_chunk, i)
                # pressed by b's bytes: long before the interval. (b's first sync is at once
                # and records the chunk its commits wrote first: they run in either order)
                with trio.fail_after(10):
                    while not (a.present[1] and a.present[2] and any(b.present)):
                        await trio.sleep(0.01)
                b.hurry()  # (what is left of b may be alone below the trigger again)
        assert cache.unrecorded.held == 0
    finally:
        cache.close()
