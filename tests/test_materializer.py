"""The read path below the mount, in-process against the real registry app (tier a)."""

import pytest
import trio

from modelfs.cache.blobcache import BlobCache
from modelfs.cache.errors import ModelfsError
from modelfs.fetcher.client import ClientConfig, RegistryClient
from modelfs.fetcher.materializer import Materializer

from . import faults as F
from .conftest import FAST_RETRY


async def test_blob_that_failed_its_seal_is_fetched_again_and_served(live_registry, tmp_path):
    """No chunk digests (so bytes are served only after the seal), a damaged range: the seal
    fails and the blob is quarantined; once the server is fixed, a read gets the right bytes."""
    reg = await live_registry(chunk_size=64 << 10)
    source, imported = reg.add_model("fragile", 2 << 20)
    layer = imported.model
    reg.faults.add("GET", "/chunksums/", F.reply(404, b"404 page not found"))
    corrupt = reg.faults.add("GET", "/blobs/" + layer.digest, F.corrupt_body(),
                             range=f"bytes=1048576-{layer.size - 1}")
    cache = BlobCache(tmp_path / "cache", sync_interval=0.01)
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


async def test_sealer_waits_for_the_readers_then_seals(live_registry, tmp_path):
    """While a blob is being read, its whole-blob hash waits (it would take the readers' CPU);
    once they pause, the blob is sealed. A chunk list is served, so reads never wait on it."""
    reg = await live_registry(chunk_size=64 << 10)
    source, imported = reg.add_model("steady", 4 << 20)
    layer, data = imported.model, source.read_bytes()
    cache = BlobCache(tmp_path / "cache", sync_interval=0.01, background_seal=True)
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
                assert blob._hashed_upto == 0  # nothing hashed while the reads went on
                with trio.fail_after(10):
                    while not cache.is_sealed(layer.digest, layer.size):
                        await trio.sleep(0.05)
                assert cache.store.blob_path(layer.digest).read_bytes() == data
                nursery.cancel_scope.cancel()
    finally:
        cache.close()
