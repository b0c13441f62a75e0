"""Protocol edge cases of the registry client: Content-Range checks, stalls, auth, headers."""

import httpx
import pytest
import trio

from modelfs.cache.chunks import Chunk
from modelfs.fetcher.client import ClientConfig, RegistryClient, user_agent
from modelfs.fetcher.errors import (BadRangeAnswer, ProtocolViolation, RegistryError, ShortBody,
                                    TemporaryError, Unauthorized)
from modelfs.fetcher.manifest import Layer
from modelfs.fetcher.pull import pull
from modelfs.fetcher.retry import RetryPolicy

from . import faults as F
from .conftest import FAST_RETRY
from .helpers import sha256_file

URL = "http://reg.test/v2/library/m/blobs/sha256:" + "0" * 64
DATA = bytes(range(256)) * 4


def ranged(status=206, content_range=None, body=None):
    def handler(request):
        first, last = request.headers["range"].removeprefix("bytes=").split("-")
        first, last = int(first), int(last)
        cr = content_range if content_range is not None else f"bytes {first}-{last}/{len(DATA)}"
        headers = {"content-range": cr} if cr else {}
        return httpx.Response(status, headers=headers,
                              content=DATA[first:last + 1] if body is None else body)
    return handler


async def fetch(handler, start=10, end=20, size=len(DATA), **config):
    async with RegistryClient(ClientConfig(**config),
                              transport=httpx.MockTransport(handler)) as client:
        return await client.fetch_range(URL, start, end, size)


async def test_exact_range_accepted():
    assert bytes(await fetch(ranged())) == DATA[10:20]


@pytest.mark.parametrize("handler, error, match", [
    (ranged(content_range=""), BadRangeAnswer, "without a valid Content-Range"),
    (ranged(content_range="bytes 11-20/1024"), BadRangeAnswer, "got 11-20"),
    (ranged(content_range="bytes 10-19/999"), ProtocolViolation, "manifest says 1024"),
    (ranged(content_range="bytes */1024"), BadRangeAnswer, "Content-Range"),
    (ranged(status=200, content_range=""), BadRangeAnswer, "ignored Range"),
    (ranged(body=DATA[10:15]), ShortBody, "gave 5 of 10"),
    (ranged(body=DATA[10:25]), BadRangeAnswer, "more than the 10 bytes"),
    (ranged(status=302, content_range=""), ProtocolViolation, "unexpected status 302"),
])
async def test_bad_range_answers(handler, error, match):
    """One attempt, refused with exactly this class (the same the data plane raises)."""
    asked = []

    def counting(request):
        asked.append(request)
        return handler(request)

    with pytest.raises(error, match=match) as exc:
        await fetch(counting)
    assert type(exc.value) is error
    assert len(asked) == 1


async def test_requests_carry_a_registry_compatible_user_agent():
    seen = []

    def handler(request):
        seen.append(request.headers["user-agent"])
        return ranged()(request)

    await fetch(handler)
    # protocol.md §2.1: the registry expects `ollama/<semver> (<arch> <os>)`
    assert seen == [user_agent()]
    assert seen[0].startswith("ollama/0.") and " (" in seen[0] and "modelfs/" in seen[0]


async def test_a_trickling_server_is_a_stall(autojump_clock):
    async def trickle():
        for byte in DATA[10:20]:
            await trio.sleep(20)  # each wait is under the read timeout, the whole is not
            yield bytes([byte])

    def handler(request):
        return httpx.Response(206, headers={"content-range": "bytes 10-19/1024"},
                              content=trickle())

    with pytest.raises(TemporaryError, match="stalled"):
        await fetch(handler, read_timeout=30)


async def test_chunksums_without_content_location_use_the_blob_url():
    data = b"x" * 300

    def handler(request):
        if "/chunksums/" in request.url.path:
            import hashlib
            d = "sha256:" + hashlib.sha256(data).hexdigest()
            return httpx.Response(200, text=f"{d} 0-299\n")
        raise AssertionError(request.url)

    from modelfs.fetcher.names import parse_name
    async with RegistryClient(transport=httpx.MockTransport(handler)) as client:
        name = parse_name("m")
        layer = Layer("application/vnd.ollama.image.model", "sha256:" + "1" * 64, 300)
        plan = await client.chunk_plan(name, layer, chunk_size=100)
    assert plan.url == client.blob_url(name, layer.digest)
    assert plan.chunks == [Chunk(0, 300, plan.chunks[0].digest)]


async def test_bearer_token_flow_with_many_concurrent_challenges(live_registry, cache):
    reg = await live_registry(chunk_size=64 << 10)
    _, imported = reg.add_model("private", 1 << 20)
    host = reg.url.removeprefix("http://")
    reg.faults.add("GET", "/token", F.reply(200, b'{"token": "s3cret"}'))
    for part in ("/manifests/", "/chunksums/", "/blobs/"):
        reg.faults.add("GET", part, F.require_auth(
            "Bearer s3cret", f'Bearer realm="{reg.url}/token",service="{host}",'
                             f'scope="repository:library/private:pull"'))
    # as many workers as connections: a 401 holding its connection would starve the token GET
    config = ClientConfig(retry=FAST_RETRY, max_connections=4, pool_timeout=5)
    async with RegistryClient(config) as client:
        await pull(reg.name("private"), client, cache, concurrency=4, chunk_size=64 << 10)
    d = imported.model.digest
    assert sha256_file(cache.store.blob_path(d)) == d
    tokens = [s for s in reg.faults.seen if s.path.startswith("/token")]
    assert len(tokens) == 1  # one token for everyone
    assert "scope=repository%3Alibrary%2Fprivate%3Apull" in tokens[0].query


async def test_token_realm_on_another_host_is_refused(live_registry, cache):
    reg = await live_registry()
    reg.add_model("private", 64 << 10)
    reg.faults.add("GET", "/manifests/", F.require_auth(
        "Bearer x", 'Bearer realm="http://evil.example/token",service="x"'))
    async with RegistryClient(ClientConfig(retry=FAST_RETRY)) as client:
        with pytest.raises(Unauthorized, match="not on the registry"):
            await pull(reg.name("private"), client, cache)
    assert not any(s.path.startswith("/token") for s in reg.faults.seen)


async def test_basic_auth(live_registry, cache):
    reg = await live_registry()
    reg.add_model("private", 64 << 10)
    reg.faults.add("GET", "/v2/", F.require_auth("Basic dTpw", 'Basic realm="registry"'))
    async with RegistryClient(ClientConfig(retry=FAST_RETRY)) as client:
        with pytest.raises(Unauthorized, match="MODELFS_REGISTRY_USER"):
            await pull(reg.name("private"), client, cache)
    async with RegistryClient(ClientConfig(retry=FAST_RETRY, username="u",
                                           password="p")) as client:
        await pull(reg.name("private"), client, cache)


async def test_redirect_loop_is_a_clear_error():
    def handler(request):
        return httpx.Response(307, headers={"location": str(request.url)})

    with pytest.raises(RegistryError, match="TooManyRedirects"):
        await fetch(handler, retry=RetryPolicy(attempts=1))
