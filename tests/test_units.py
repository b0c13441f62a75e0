"""Fetch units (cache/units.py): the registry's small chunks fetched together, each still
verified against its own digest."""

from __future__ import annotations

import hashlib
import random
import struct

import pytest
import trio

from modelfs.cache.blobcache import BlobCache
from modelfs.cache.chunks import Chunk, check_coverage, fixed_chunks
from modelfs.cache.errors import ChunkDigestMismatch
from modelfs.cache.readers import ReaderActivity
from modelfs.cache.units import UnitHasher, bad_part, digest_of, group_units, part_lengths
from modelfs.fetcher.materializer import Materializer
from modelfs.fetcher.pull import pull

from .helpers import put_bytes, sha256_file

MiB = 1 << 20


def registry_chunks(data: bytes, step: int) -> list[Chunk]:
    return [Chunk(s, min(s + step, len(data)),
                  "sha256:" + hashlib.sha256(data[s:s + step]).hexdigest())
            for s in range(0, len(data), step)]


DATA = random.Random(3).randbytes(9 * MiB + 1234)


def test_small_chunks_are_grouped_large_ones_kept_as_they_are():
    small = registry_chunks(DATA, 4096)
    units = group_units(small, 4 * MiB)
    check_coverage(units, len(DATA))
    assert [u.length for u in units] == [4 * MiB, 4 * MiB, MiB + 1234]
    assert sum(len(part_lengths(u)) for u in units) == len(small)
    big = registry_chunks(DATA, 8 * MiB)
    assert group_units(big, 4 * MiB) == big  # as the registry gave them: index rows as before
    mixed = small[:3] + [Chunk(small[3].start, len(DATA), "sha256:" + "0" * 64)]
    grouped = group_units(mixed, 4 * MiB)
    assert grouped[1] == mixed[3] and grouped[1].parts is None  # as the registry gave it
    assert len(part_lengths(grouped[0])) == 3
    plain = fixed_chunks(len(DATA), 4096)  # no digests: nothing to verify per chunk
    assert group_units(plain, 4 * MiB) == plain


def test_a_unit_matches_only_when_every_chunk_in_it_does():
    unit = group_units(registry_chunks(DATA[:MiB], 4096), 4 * MiB)[0]
    data = DATA[:MiB]
    assert digest_of(unit, data) == unit.digest
    h = UnitHasher(unit)  # fed in pieces that do not line up with the chunks
    for pos in range(0, len(data), 10_000):
        h.update(data[pos:pos + 10_000])
    assert h.result() == unit.digest
    bad = bytearray(data)
    bad[77 * 4096 + 5] ^= 1
    h = UnitHasher(unit)
    h.update(bytes(bad))
    assert h.result() != unit.digest and bad_part(unit, h.parts()) == 77
    assert digest_of(unit, data[:-1]) != unit.digest
    assert digest_of(unit, data + b"x") != unit.digest
    assert unit.digest != "sha256:" + hashlib.sha256(data).hexdigest()


async def test_a_received_unit_with_one_bad_chunk_is_never_written(tmp_path):
    cache = BlobCache(tmp_path / "c", sync_interval=0.01)
    try:
        digest = "sha256:" + hashlib.sha256(DATA).hexdigest()
        units = group_units(registry_chunks(DATA, 64 << 10), 4 * MiB)
        blob = cache.open_partial(digest, len(DATA), units)
        for i, unit in enumerate(units):
            body = bytearray(DATA[unit.start:unit.end])
            if i == 1:
                body[-1] ^= 0xFF  # the unit's last registry chunk
            receiver = blob.receiver(i)
            receiver.view[:len(body)] = body
            receiver.received(len(body))
            if i == 1:
                with pytest.raises(ChunkDigestMismatch, match="registry chunks"):
                    await blob.write_chunk(i, receiver)
                assert not blob.in_file(i)
            else:
                assert await blob.write_chunk(i, receiver)
                await blob.commit_chunk(i)
            blob.release_buffer(receiver.buf)
        assert blob.missing() == [1]
        await put_bytes(blob, 1, DATA[units[1].start:units[1].end])
        await blob.seal()
        assert sha256_file(cache.store.blob_path(digest)) == digest
    finally:
        cache.close()


async def test_pull_and_mount_fetch_small_chunks_in_units(live_registry, tmp_path, client):
    """A registry of 4 KiB chunks: a pull asks for a few multi-MiB ranges, not thousands of
    4 KiB ones, and seals the right blob; a mount's read of a cold blob does the same."""
    reg = await live_registry(chunk_size=4096)
    source, imported = reg.add_model("tiny4k", 10 * MiB)
    layer, data = imported.model, source.read_bytes()
    cache = BlobCache(tmp_path / "pulled", sync_interval=0.01)
    try:
        await pull(reg.name("tiny4k"), client, cache)
        assert sha256_file(cache.store.blob_path(layer.digest)) == layer.digest
    finally:
        cache.close()
    ranges = reg.faults.ranges(layer.digest)
    assert len(ranges) == -(-layer.size // (4 * MiB))

    before = len(reg.faults.ranges(layer.digest))
    cache = BlobCache(tmp_path / "mounted", sync_interval=0.01, readers=ReaderActivity())
    try:
        async with trio.open_nursery() as nursery:
            mat = Materializer(client, cache, nursery, background=False)
            with trio.fail_after(30):
                got = await mat.read(reg.name("tiny4k"), layer, 9 * MiB, 4096)
            assert got == data[9 * MiB:9 * MiB + 4096]
            nursery.cancel_scope.cancel()
    finally:
        cache.close()
    assert reg.faults.ranges(layer.digest)[before:] == [f"bytes={8 * MiB}-{layer.size - 1}"]


@pytest.mark.parametrize("step", [4096, 1000, 65536 + 7])
def test_a_unit_hashed_in_any_pieces_gives_each_chunk_its_digest(step):
    """UnitHasher cuts the bytes at the registry chunks' bounds whatever the pieces it is fed
    (down to one byte, across several chunks, past the unit's end)."""
    rng = random.Random(step)
    data = DATA[:2 * MiB + 333]
    unit = group_units(registry_chunks(data, step), 4 * MiB)[0]
    want = b"".join(struct.pack(">I32s", len(data[s:s + step]),
                                hashlib.sha256(data[s:s + step]).digest())
                    for s in range(0, len(data), step))
    assert unit.parts == want
    for _ in range(4):
        h, pos = UnitHasher(unit), 0
        while pos < len(data):
            n = rng.choice([1, 2, step - 1, step, step + 1, 3 * step, 100_000, MiB])
            h.update(memoryview(data)[pos:pos + n])
            pos += n
        assert h.parts() == want and h.result() == unit.digest
    h = UnitHasher(unit)
    h.update(data[:step + 5])
    h.update(data[step + 5:] + b"more")  # past the end: never matches
    assert h.result() != unit.digest


@pytest.mark.parametrize("whole_up_to", [1 * MiB, 8 * MiB])
async def test_another_fetch_unit_resumes_what_is_cached(live_registry, tmp_path, client,
                                                         whole_up_to):
    """Chunks cached in one grouping (a mount with --fetch-unit 0) are not fetched again when
    the same registry list comes grouped otherwise (a pull with the default units), or when
    the layer comes as one chunk no list was asked for (a pull's --chunk-size above the
    layer's size): the stored list is kept, and only the missing bytes are asked for."""
    from modelfs.fetcher.client import ClientConfig, RegistryClient

    from .conftest import FAST_RETRY

    reg = await live_registry(chunk_size=64 << 10)
    source, imported = reg.add_model("regroup", 3 * MiB)
    layer, data = imported.model, source.read_bytes()
    cache = BlobCache(tmp_path / "cache", sync_interval=0.01, readers=ReaderActivity())
    try:
        async with RegistryClient(ClientConfig(retry=FAST_RETRY, fetch_unit=0)) as per_chunk:
            async with trio.open_nursery() as nursery:
                mat = Materializer(per_chunk, cache, nursery, background=False)
                with trio.fail_after(30):
                    assert await mat.read(reg.name("regroup"), layer, MiB, MiB) == \
                        data[MiB:2 * MiB]
                    while cache.index.present_bytes(layer.digest, layer.size) < MiB:
                        await trio.sleep(0.02)  # (recorded in batches)
                nursery.cancel_scope.cancel()
    finally:
        cache.close()
    before = len(reg.faults.ranges(layer.digest))
    cache = BlobCache(tmp_path / "cache", sync_interval=0.01)
    try:
        await pull(reg.name("regroup"), client, cache, chunk_size=whole_up_to)
        assert sha256_file(cache.store.blob_path(layer.digest)) == layer.digest
    finally:
        cache.close()
    asked = []
    for r in reg.faults.ranges(layer.digest)[before:]:
        first, last = map(int, r.removeprefix("bytes=").split("-"))
        asked.append((first, last + 1))
    assert sum(end - start for start, end in asked) == layer.size - MiB
    assert all(end <= MiB or start >= 2 * MiB for start, end in asked)
