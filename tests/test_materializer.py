"""The read path below the mount, in-process against the real registry app (tier a)."""

import pytest
import trio
import trio.testing

from modelfs.cache.blobcache import BlobCache
from modelfs.cache.errors import ModelfsError
from modelfs.cache.readers import ReaderActivity
from modelfs.fetcher.client import ClientConfig, RegistryClient
from modelfs.fetcher.materializer import Materializer

from . import faults as F
from .conftest import FAST_RETRY, PER_CHUNK
from .helpers import sha256_file


# A damaged range on purpose: the failed seal discards the blob without telling the budget
# (PartialBlob.discard), which counts its bytes until the next recount.
@pytest.mark.invariants(budget_exact=False)
async def test_blob_that_failed_its_seal_is_fetched_again_and_served(live_registry, tmp_path):
    """No chunk digests (so bytes are served only after the seal), a damaged range: the seal
    fails and the blob is quarantined; once the server is fixed, a read gets the right bytes."""
    reg = await live_registry(chunk_size=64 << 10)
    source, imported = reg.add_model("fragile", 2 << 20)
    layer = imported.model
    reg.faults.add("GET", "/chunksums/", F.reply(404, b"404 page not found"))
    corrupt = reg.faults.add("GET", "/blobs/" + layer.digest, F.corrupt_body(),
                             range=f"bytes=1048576-{layer.size - 1}")
    cache = BlobCache(tmp_path / "cache", sync_interval=0.01, readers=ReaderActivity())
    try:
        async with RegistryClient(ClientConfig(retry=FAST_RETRY)) as client:
            async with trio.open_nursery() as nursery:
                mat = Materializer(client, cache, nursery, chunk_size=1 << 20,
                                   quarantine_seconds=0.2)
                name = reg.name("fragile")
                with pytest.raises(ModelfsError):
                    await mat.read(name, layer, 0, 4096)
                with pytest.raises(ModelfsError, match="failed its seal"):
                    await mat.read(name, layer, 0, 4096)  # quarantined: no bytes
                reg.faults.rules.remove(corrupt)
                await trio.sleep(0.3)
                data = await mat.read(name, layer, 1 << 20, 8192)
                assert data == source.read_bytes()[1 << 20:(1 << 20) + 8192]
                assert cache.is_sealed(layer.digest, layer.size)
                nursery.cancel_scope.cancel()
    finally:
        cache.close()


async def test_a_seal_that_failed_on_io_is_tried_again(live_registry, tmp_path, monkeypatch):
    """A complete blob whose seal fails for no fault of its own (an I/O error) is not left
    unsealed for the mount's life: reads go on from the partial blob meanwhile, and a read
    after the backoff seals it."""
    from modelfs.cache.partial import PartialBlob
    from modelfs.fetcher import seals as S

    monkeypatch.setattr(S, "RETRY_FIRST", 0.2)
    real_seal, failures = PartialBlob.seal, []

    async def seal_failing_once(self):
        if not failures:
            failures.append(self.digest)
            raise OSError(5, "Input/output error")
        return await real_seal(self)

    monkeypatch.setattr(PartialBlob, "seal", seal_failing_once)
    reg = await live_registry(chunk_size=64 << 10)
    source, imported = reg.add_model("sturdy", 2 << 20)
    layer, data = imported.model, source.read_bytes()
    cache = BlobCache(tmp_path / "cache", sync_interval=0.01, readers=ReaderActivity(quiet=0.05))
    try:
        async with RegistryClient(ClientConfig(retry=FAST_RETRY)) as client:
            async with trio.open_nursery() as nursery:
                mat = Materializer(client, cache, nursery, background=False)
                name = reg.name("sturdy")
                with trio.fail_after(20):
                    assert await mat.read(name, layer, 0, layer.size) == data
                    while not failures:
                        await trio.sleep(0.02)
                    await trio.sleep(0.3)  # (past the backoff)
                    assert not cache.is_sealed(layer.digest, layer.size)
                    assert await mat.read(name, layer, 0, 4096) == data[:4096]
                    while not cache.is_sealed(layer.digest, layer.size):
                        await trio.sleep(0.02)
                assert sha256_file(cache.store.blob_path(layer.digest)) == layer.digest
                nursery.cancel_scope.cancel()
    finally:
        cache.close()


@pytest.mark.parametrize("plane", ["direct", "httpx"])
async def test_a_read_through_a_flaky_edge_retries_inside_the_read(live_registry, tmp_path,
                                                                  monkeypatch, plane):
    """The mount's read path through the same flaky edge as the pull's test (every third range
    a 200 with the whole blob, a short body, a shifted Content-Range): one read of the whole
    blob returns the right bytes, its bad answers asked for again inside that read: each chunk
    is fetched once, the retries are inside that fetch (not the reader asking again)."""
    monkeypatch.setenv("MODELFS_DATA_PLANE", plane)
    reg = await live_registry(chunk_size=64 << 10)
    source, imported = reg.add_model("edgy", 2 << 20)  # (more than WHOLE_UP_TO)
    layer, data = imported.model, source.read_bytes()
    flaky = F.FlakySource(reg.faults, layer.digest, short="bytes=131072-196607",
                          shifted="bytes=327680-393215")
    cache = BlobCache(tmp_path / "cache", sync_interval=0.01, readers=ReaderActivity())
    try:
        async with RegistryClient(PER_CHUNK) as client:
            assert (client._raw is not None) == (plane == "direct")
            async with trio.open_nursery() as nursery:
                mat = Materializer(client, cache, nursery, background=False)
                with trio.fail_after(30):
                    assert await mat.read(reg.name("edgy"), layer, 0, layer.size) == data
                nursery.cancel_scope.cancel()
        flaky.check_every_bad_answer_was_asked_again()
        assert mat.engine.fetches == len(flaky.asked())  # one fetch per chunk, retries inside it
    finally:
        cache.close()


async def test_sealer_waits_for_the_readers_then_seals(live_registry, tmp_path):
    """While a blob is being read, its whole-blob hash waits (it would take the readers' CPU);
    once they pause, the blob is sealed. A chunk list is served, so reads never wait on it."""
    reg = await live_registry(chunk_size=64 << 10)
    source, imported = reg.add_model("steady", 4 << 20)
    layer, data = imported.model, source.read_bytes()
    cache = BlobCache(tmp_path / "cache", sync_interval=0.01, readers=ReaderActivity())
    try:
        async with RegistryClient(ClientConfig(retry=FAST_RETRY)) as client:
            async with trio.open_nursery() as nursery:
                mat = Materializer(client, cache, nursery, background=False)
                name = reg.name("steady")
                step = 64 << 10
                for off in range(0, layer.size, step):
                    assert await mat.read(name, layer, off, step) == data[off:off + step]
                blob = cache.open_stored(layer.digest, layer.size)
                assert all(blob.readable) and not blob.sealed
                assert blob.seal_progress == 0  # nothing hashed while the reads went on
                with trio.fail_after(10):
                    while not cache.is_sealed(layer.digest, layer.size):
                        await trio.sleep(0.05)
                assert cache.store.blob_path(layer.digest).read_bytes() == data
                nursery.cancel_scope.cancel()
    finally:
        cache.close()


async def test_sealed_stretches_ahead_of_many_readers_stay_bounded(live_registry, tmp_path,
                                                                   monkeypatch):
    """Six sequential readers of one sealed blob, on a slow disk: each gets the right bytes,
    and the buffers in use stay within the memory cache, the loads ahead (STRETCHES_AHEAD at a
    time, all readers together) and the readers' own loads, not readers times the lead.
    (Stretches of 1 MiB and a lead of 4 MiB keep the blob small.)"""
    import time

    from modelfs.cache import directio
    from modelfs.fetcher import sealedreads as S
    monkeypatch.setattr(S, "SEALED_STRETCH", 1 << 20)
    monkeypatch.setattr(S, "SEALED_LEAD", 4 << 20)
    real_read_into = directio.read_into

    def slow_read_into(*args):
        time.sleep(0.05)
        real_read_into(*args)

    reg = await live_registry(chunk_size=1 << 20)
    source, imported = reg.add_model("shared", 48 << 20)
    layer, data = imported.model, source.read_bytes()
    cache = BlobCache(tmp_path / "cache", sync_interval=0.01, readers=ReaderActivity())
    try:
        async with RegistryClient(ClientConfig(retry=FAST_RETRY)) as client:
            async with trio.open_nursery() as nursery:
                mat = Materializer(client, cache, nursery, memory_cache=4 << 20,
                                   background=False)
                name = reg.name("shared")
                for off in range(0, layer.size, 4 << 20):
                    await mat.read(name, layer, off, 4 << 20)
                with trio.fail_after(20):
                    while not cache.is_sealed(layer.digest, layer.size):
                        await trio.sleep(0.05)
                pool = cache.pool

                def in_use():
                    return pool.allocated - pool._free_bytes

                loads, peak, base = mat.loads, [0], in_use()
                monkeypatch.setattr(directio, "read_into", slow_read_into)

                async def watch():
                    while True:
                        peak[0] = max(peak[0], in_use() - base)
                        await trio.sleep(0)

                async def reader(start):
                    step = 256 << 10
                    for off in range(start, start + (3 << 20), step):
                        got = await mat.read(name, layer, off, step,
                                             ahead=(off + step, off + (8 << 20)))
                        assert got == data[off:off + step], off

                async with trio.open_nursery() as inner:
                    inner.start_soon(watch)
                    async with trio.open_nursery() as readers:
                        for k in range(6):
                            readers.start_soon(reader, k * (8 << 20))
                    inner.cancel_scope.cancel()
                assert mat.loads - loads > 6  # the stretches were loaded (not read page by page)
                # (a few loads ahead at a time: a limit of hundreds would be no limit)
                ahead = min(S.STRETCHES_AHEAD, 4) * S.SEALED_STRETCH
                bound = (4 << 20) + ahead + 6 * S.SEALED_STRETCH
                assert peak[0] <= bound, (peak[0] >> 20, bound >> 20)
                nursery.cancel_scope.cancel()
    finally:
        cache.close()


async def test_first_miss_of_a_blob_is_fetched_alone(live_registry, tmp_path):
    """Streaming start: while the first read of a cold blob waits for its chunk, the rest of
    the blob is not fetched beside it; the background starts once that read is answered, and
    then completes the blob."""
    reg = await live_registry(chunk_size=64 << 10)
    source, imported = reg.add_model("first", 2 << 20)
    layer = imported.model
    beside = []

    async def first_chunk(faults, scope, receive, send):
        for _ in range(30):  # while it is held back: what else is being fetched?
            beside.append(faults.ranges_in_flight - 1)
            await trio.sleep(0.01)
        await faults.app(scope, receive, send)

    reg.faults.add("GET", "/blobs/" + layer.digest, first_chunk, times=1, range="bytes=0-65535")
    reg.faults.delay = 0.05
    cache = BlobCache(tmp_path / "cache", sync_interval=0.01, readers=ReaderActivity())
    try:
        async with RegistryClient(PER_CHUNK) as client:
            async with trio.open_nursery() as nursery:
                mat = Materializer(client, cache, nursery)
                name = reg.name("first")
                mat.opened(name, layer)
                got = await mat.read(name, layer, 0, 4096, whole=True)
                assert got == source.read_bytes()[:4096]
                assert max(beside) == 0, beside
                n_chunks = -(-layer.size // (64 << 10))
                with trio.fail_after(20):  # then the background: all of it
                    while len(set(reg.faults.ranges(layer.digest))) < n_chunks:
                        await trio.sleep(0.05)
                mat.closed(layer)
                nursery.cancel_scope.cancel()
    finally:
        cache.close()


# A landed chunk damaged on purpose: dropping it gives its bytes back without telling the
# budget (LandedChecks.drop), which counts them until the next recount.
@pytest.mark.invariants(budget_exact=False)
async def test_landed_chunks_are_checked_before_they_are_served(live_registry, tmp_path,
                                                                chunk_client):
    """A pull stopped halfway left chunks checked by nobody (LANDED), one of them damaged on
    disk. A mount reading the blob serves the right bytes: the landed chunks are checked
    against their own digests from the file (not fetched again), the damaged one is fetched
    again, and the blob is sealed."""
    from .landed import corrupt_a_landed_chunk, stopped_pull

    reg = await live_registry(chunk_size=64 << 10)
    source, imported = reg.add_model("mid", 4 << 20)
    layer, data = imported.model, source.read_bytes()
    cache = await stopped_pull(reg, tmp_path / "cache", chunk_client, "mid", layer.digest,
                               readers=ReaderActivity())
    try:
        chunks, present, bad = corrupt_a_landed_chunk(cache, layer.digest)
        before = len(reg.faults.ranges(layer.digest))
        async with trio.open_nursery() as nursery:
            mat = Materializer(chunk_client, cache, nursery, background=False)
            name = reg.name("mid")
            with trio.fail_after(30):
                for chunk in chunks:
                    got = await mat.read(name, layer, chunk.start, chunk.length)
                    assert got == data[chunk.start:chunk.end]
            with trio.fail_after(10):
                while not cache.is_sealed(layer.digest, layer.size):
                    await trio.sleep(0.02)
            nursery.cancel_scope.cancel()
        again = reg.faults.ranges(layer.digest)[before:]
        want = {f"bytes={c.start}-{c.end - 1}" for i, c in enumerate(chunks)
                if not present[i] or i == bad}
        assert sorted(again) == sorted(want)
    finally:
        cache.close()


async def test_chunks_of_a_blob_without_digests_are_not_kept_or_published_before_the_seal(
        live_registry, tmp_path):
    """No chunk digests: the chunks a read waits for are fetched whole at DEMAND, but none is
    kept for readers or pushed into the kernel's page cache before the whole blob matched its
    digest (invariant 1: a pushed page would be served by the kernel itself)."""
    reg = await live_registry(chunk_size=64 << 10)
    source, imported = reg.add_model("plain", 4 << 20)
    layer = imported.model
    reg.faults.add("GET", "/chunksums/", F.reply(404, b"404 page not found"))
    cache = BlobCache(tmp_path / "cache", sync_interval=0.01, readers=ReaderActivity())
    pushed = []

    async def publish(digest, offset, buf):
        pushed.append((offset, cache.is_sealed(digest, layer.size)))

    try:
        async with RegistryClient(ClientConfig(retry=FAST_RETRY)) as client:
            async with trio.open_nursery() as nursery:
                mat = Materializer(client, cache, nursery, chunk_size=1 << 20, publish=publish)
                with trio.fail_after(30):
                    got = await mat.read(reg.name("plain"), layer, 0, 1 << 20,
                                         ahead=(1 << 20, 3 << 20))
                assert got == source.read_bytes()[:1 << 20]
                await trio.testing.wait_all_tasks_blocked()
                nursery.cancel_scope.cancel()
        assert all(sealed for _, sealed in pushed), pushed
    finally:
        cache.close()
