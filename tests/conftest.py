import pathlib

import hypercorn.config
import hypercorn.trio
import pytest

from modelfs.cache.blobcache import BlobCache
from modelfs.cache.importer import import_gguf
from modelfs.cache.invariants import check_cache_dir, check_invariants
from modelfs.cache.store import ModelsDir
from modelfs.fetcher.chunksum_store import ChunksumStore
from modelfs.fetcher.client import ClientConfig, RegistryClient
from modelfs.fetcher.names import Registry, parse_name
from modelfs.fetcher.retry import RetryPolicy
from modelfs.fetcher.server import RegistryApp

from . import mounting
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


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "invariants(skip=REASON, **options): options for the cache invariant check "
        "at the end of the test (cache/invariants.py), or skip=why it cannot hold there")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.when == "call":
        item.call_failed = report.failed


@pytest.fixture(autouse=True)
def cache_invariants(request, monkeypatch):
    """Every BlobCache a test opens is checked when it is closed (check_invariants), and the
    cache directory of every mount a test started once the test is over and its mounts are
    gone (check_cache_dir). A test that breaks a cache on purpose says what still holds with
    @pytest.mark.invariants(...) (check_invariants' options), or skip="why"."""
    marker = request.node.get_closest_marker("invariants")
    options = dict(marker.kwargs) if marker else {}
    skip = options.pop("skip", None)
    broken = []
    real_close = BlobCache.close

    def close(self):
        if skip is None and getattr(self, "_lock_fd", -1) >= 0:  # (open, not closed yet)
            try:
                check_invariants(self, **options)
            except Exception as exc:  # reported at teardown: the cache is closed all the same
                broken.append(exc)
        real_close(self)

    monkeypatch.setattr(BlobCache, "close", close)
    mounting.started.clear()
    yield
    if skip is None:
        for cache, kwargs in mounting.caches_to_check():
            if not (cache / "index.sqlite").exists():
                continue  # (its filesystem is gone: a tmpfs the test unmounted)
            try:
                check_cache_dir(cache, **kwargs)
            except Exception as exc:
                broken.append(exc)
    if broken and not getattr(request.node, "call_failed", False):  # (else: noise after it)
        for other in broken[1:]:
            broken[0].add_note(f"also: {other}")
        raise broken[0]


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
