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
