import pathlib

import hypercorn.config
import hypercorn.trio
import pytest

from modelfs.cache.blobcache import BlobCache
from modelfs.cache.importer import import_gguf
from modelfs.cache.store import ModelsDir
from modelfs.fetcher.chunksum_store import ChunksumStore
from modelfs.fetcher.client import ClientConfig, RegistryClient
from modelfs.fetcher.names import Registry, parse_name
from modelfs.fetcher.retry import RetryPolicy
from modelfs.fetcher.server import RegistryApp

from .faults import Faults
from .gguf_factory import make_gguf_of_size

FAST_RETRY = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05)


class LiveRegistry:
    """The real registry app over a models dir, on 127.0.0.1, behind the fault middleware."""

    def __init__(self, root: pathlib.Path, chunk_size: int):
        self.models = ModelsDir(root / "models").create()
        self.sources = root / "sources"
        self.sources.mkdir()
        self.chunk_size = chunk_size
        self.store = ChunksumStore(root / "serve-state")
        self.faults = Faults(RegistryApp(self.models, self.store, chunk_size))
        self.url = None

    @property
    def registry(self) -> Registry:
        return Registry.from_url(self.url)

    def name(self, text: str):
        return parse_name(text, self.registry)

    def add_model(self, text: str, size: int, seed: int = 0, **texts):
        """Import a real GGUF of about `size` bytes as `text` (under the registry's host)."""
        source = make_gguf_of_size(self.sources / f"{seed}-{size}.gguf", size, seed=seed)
        result = import_gguf(source, self.name(text).store_parts, self.models, **texts)
        return source, result


@pytest.fixture
async def live_registry(tmp_path, nursery):
    async def start(chunk_size: int = 64 << 10) -> LiveRegistry:
        reg = LiveRegistry(tmp_path, chunk_size)
        config = hypercorn.config.Config()
        config.bind = ["127.0.0.1:0"]
        config.accesslog = None
        binds = await nursery.start(hypercorn.trio.serve, reg.faults, config)
        reg.url = binds[0]
        return reg
    return start


@pytest.fixture
def cache(tmp_path):
    c = BlobCache(tmp_path / "cache")
    yield c
    c.close()


@pytest.fixture
async def client():
    async with RegistryClient(ClientConfig(retry=FAST_RETRY, read_timeout=5)) as c:
        yield c


# The registry's chunks fetched one by one (`--fetch-unit 0`), as any registry of chunks of
# FETCH_UNIT or more is: for tests of what happens to one chunk, on lists of small chunks.
PER_CHUNK = ClientConfig(retry=FAST_RETRY, read_timeout=5, fetch_unit=0)


@pytest.fixture
async def chunk_client():
    async with RegistryClient(PER_CHUNK) as c:
        yield c
