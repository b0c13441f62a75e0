"""The cache invariant checker itself (cache/invariants.py): quiet on a healthy cache with
partial and sealed blobs, and loud, naming the blob and the chunk, on each kind of damage."""

import hashlib
import os

import pytest

from modelfs.cache.blobcache import BlobCache
from modelfs.cache.buffers import punch_hole
from modelfs.cache.chunks import Chunk
from modelfs.cache.invariants import InvariantBroken, check_cache_dir, check_invariants

from .helpers import put_bytes, receive_bytes

# These tests damage caches on purpose and check them themselves.
pytestmark = pytest.mark.invariants(skip="the checker's own tests break caches on purpose")

STEP = 64 << 10


def d(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def chunks_of(data: bytes, step: int = STEP) -> list[Chunk]:
    return [Chunk(s, min(s + step, len(data)), d(data[s:s + step]))
            for s in range(0, len(data), step)]


SEALED = os.urandom(6 * STEP + 123)
PARTIAL = os.urandom(8 * STEP)
WRITTEN = (0, 2, 3, 7)  # chunks of PARTIAL in the cache


@pytest.fixture
async def world(tmp_path):
    """A cache with a sealed blob and a partial one (some chunks recorded, one written but
    not recorded yet)."""
    cache = BlobCache(tmp_path / "c", sync_interval=0.01)
    sealed = cache.open_partial(d(SEALED), len(SEALED), chunks_of(SEALED))
    for i, c in enumerate(sealed.chunks):
        await put_bytes(sealed, i, SEALED[c.start:c.end])
    await sealed.seal()
    cache.release(sealed)
    blob = cache.open_partial(d(PARTIAL), len(PARTIAL), chunks_of(PARTIAL))
    for i in WRITTEN:
        await put_bytes(blob, i, PARTIAL[i * STEP:(i + 1) * STEP])
    assert await receive_bytes(blob, 5, PARTIAL[5 * STEP:6 * STEP])  # readable, not recorded
    await blob.read(5 * STEP, STEP)  # a read has its write behind done: in the file
    try:
        yield cache, blob
    finally:
        cache.close()


def broken(cache, **options) -> str:
    with pytest.raises(InvariantBroken) as exc:
        check_invariants(cache, **options)
    return str(exc.value)


def _overwrite(path, offset: int, data: bytes, keep_mtime: bool = False) -> None:
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    if keep_mtime:  # as a disk's corruption would: the file looks as it was sealed
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


async def test_a_healthy_cache_passes_live_and_after_close(world, tmp_path):
    cache, blob = world
    check_invariants(cache)
    assert cache.is_sealed(d(SEALED), len(SEALED)) and not blob.present[5]
    await blob.commit_chunk(5)
    check_invariants(cache)
    cache.close()
    check_cache_dir(tmp_path / "c", clean=True, over_cap=0)


async def test_a_recorded_chunk_overwritten(world, tmp_path):
    cache, blob = world
    _overwrite(blob.path, 2 * STEP + 10, b"\xff" * 8)
    text = broken(cache)
    assert f"blob {d(PARTIAL)[:19]}… chunk 2 (bytes {2 * STEP}-{3 * STEP - 1})" in text
    assert "recorded VERIFIED, but the bytes in partial/" in text
    assert "do not match its digest" in text
    assert "1 cache invariant(s) broken" in text
    cache.close()
    with pytest.raises(InvariantBroken, match="chunk 2 .* do not match its digest"):
        check_cache_dir(tmp_path / "c")


async def test_a_chunk_written_but_not_recorded_must_hold_its_bytes_too(world):
    cache, blob = world
    _overwrite(blob.path, 5 * STEP, b"\0" * 100)
    text = broken(cache)
    assert "chunk 5 (bytes" in text and "written (not recorded yet), but the bytes" in text


async def test_a_sealed_blob_overwritten_in_place(world):
    cache, _ = world
    path = cache.store.blob_path(d(SEALED))
    _overwrite(path, STEP * 4 + 1, b"\x00\x01", keep_mtime=True)
    assert cache.is_sealed(d(SEALED), len(SEALED))
    text = broken(cache)
    assert f"blob {d(SEALED)[:19]}… chunk 4" in text and "bytes in blobs/" in text


async def test_a_recorded_chunk_punched_to_a_hole(world, tmp_path):
    cache, blob = world
    fd = os.open(blob.path, os.O_RDWR)
    try:
        punch_hole(fd, 3 * STEP, STEP)
    finally:
        os.close(fd)
    # a hole is found without reading a byte: whatever the bound on reading back
    text = broken(cache, verify_bytes=0)
    assert f"chunk 3 (bytes {3 * STEP}-{4 * STEP - 1}): recorded VERIFIED but partial/" in text
    assert f"has a hole at offset {3 * STEP}" in text
    cache.close()
    with pytest.raises(InvariantBroken, match="chunk 3 .* has a hole"):
        check_cache_dir(tmp_path / "c", verify_bytes=0)


async def test_a_stray_file_in_blobs(world, tmp_path):
    cache, _ = world
    other = b"adopt me" * 1000
    (cache.store.blob_path(d(other))).write_bytes(other)
    assert f"blobs/sha256-{d(other)[7:]}: not a sealed blob (not in the sealed table)" in \
        broken(cache)
    check_invariants(cache, unadopted=True)  # put there to be adopted: hashed before trusted
    assert await cache.adopt_sealed(d(other), len(other))
    check_invariants(cache)
    (cache.store.blobs / "notes.txt").write_text("hello")
    assert "blobs/notes.txt: not a blob file" in broken(cache, unadopted=True)


async def test_a_sealed_file_changed_behind_the_caches_back(world):
    cache, _ = world
    os.utime(cache.store.blob_path(d(SEALED)), ns=(1, 1))
    assert "its size, mtime or inode differ from the sealed table's" in broken(cache)


async def test_a_stray_partial_file(world, tmp_path):
    cache, _ = world
    stray = cache.partial_dir / ("sha256-" + "ab" * 32 + ".partial")
    stray.write_bytes(b"x" * 100)
    assert f"partial/{stray.name}: no blob of the index has this file" in broken(cache)
    stray.unlink()
    check_invariants(cache)


async def test_budget_used_off(world):
    cache, _ = world
    cache.budget.used += 4096
    assert "budget.used is" in broken(cache) and "off by +4096" in broken(cache)
    check_invariants(cache, budget_exact=False)  # counting more is what a recount corrects
    cache.budget.used -= 2 * 4096
    assert "off by -4096" in broken(cache, budget_exact=False)  # never less


async def test_unrecorded_budget_against_the_chunks_shares(world):
    cache, blob = world
    cache.unrecorded.held += 4096  # held by no chunk
    assert "unrecorded.held is" in broken(cache)
    cache.unrecorded.held -= 4096
    check_invariants(cache)


async def test_memory_and_index_disagree(world):
    cache, blob = world
    cache.index.mark_absent(blob.digest, [7])  # behind the open blob's back
    assert "chunk 7 (bytes" in broken(cache)
    assert "present in memory but not recorded in the index" in broken(cache)
    cache.index.mark_present(blob.digest, [7])
    check_invariants(cache)
    cache.index.mark_present(blob.digest, [6])  # recorded, never written
    text = broken(cache)
    assert "chunk 6" in text and "recorded VERIFIED in the index but not present in memory" \
        in text


async def test_bytes_nobody_accounts_for(world):
    cache, blob = world
    _overwrite(blob.path, 4 * STEP, b"\1" * STEP)  # an absent chunk, written behind our back
    assert "bytes on disk that nothing accounts for" in broken(cache)


async def test_the_cap_is_checked_against_the_disk(world):
    cache, _ = world
    cache.budget.cap = 4 * STEP  # far below what is cached now
    assert "cap exceeded" in broken(cache)
    check_invariants(cache, over_cap=len(SEALED) + len(PARTIAL))


async def test_reading_back_is_bounded(world, monkeypatch):
    """At most verify_bytes of chunks are read back per check (a sample beyond that)."""
    import modelfs.cache.invariants as inv
    cache, _ = world
    read = []
    real = os.pread
    monkeypatch.setattr(inv.os, "pread", lambda fd, n, off: read.append(n) or real(fd, n, off))
    check_invariants(cache)
    assert sum(read) == len(SEALED) + 5 * STEP  # everything recorded or written: small
    read.clear()
    check_invariants(cache, verify_bytes=3 * STEP)
    assert 0 < sum(read) <= 3 * STEP


async def test_what_a_close_or_a_crash_may_leave(world, tmp_path):
    cache, _ = world
    cache.close()  # chunk 5 was written, never recorded: it stays in the file until reopened
    root = tmp_path / "c"
    check_cache_dir(root)
    with pytest.raises(InvariantBroken, match=f"files hold {STEP} bytes in chunks the index "
                                              "does not record, at most 0 allowed"):
        check_cache_dir(root, clean=True)  # a clean unmount records everything it wrote
    check_cache_dir(root, leftover=STEP)
    orphan = root / "partial" / ("sha256-" + "cd" * 32 + ".partial")
    orphan.write_bytes(b"rows forgotten, then killed before the unlink")
    with pytest.raises(InvariantBroken, match="no blob of the index has this file"):
        check_cache_dir(root)
    check_cache_dir(root, crashed=True)
