"""import -> serve -> pull over 127.0.0.1 with the real registry app, and every way a pull must
fail without leaving an unverified byte in the cache."""

import hashlib
import json

import pytest
import trio

from modelfs.cache.chunks import BadChunkList
from modelfs.cache.errors import ChunkDigestMismatch, SealMismatch
from modelfs.cache.units import digest_of
from modelfs.fetcher.errors import BadManifest, BadRangeAnswer, NotFound, ShortBody
from modelfs.fetcher.client import RegistryClient, user_agent
from modelfs.fetcher.pull import pull

from . import faults as F
from .conftest import FAST_RETRY, PER_CHUNK
from .helpers import sha256_file, small_filesystem
from .landed import corrupt_a_landed_chunk, stopped_pull

MiB = 1 << 20


def assert_cache_clean_of(cache, digest):
    """Nothing of `digest` is visible as complete, and every chunk the index calls present
    has exactly the bytes its digest promises."""
    assert not cache.store.blob_path(digest).exists()
    stored = cache.index.load(digest)
    if stored is None:
        return
    _, chunks, present = stored
    path = cache.partial_dir / ("sha256-" + digest[7:] + ".partial")
    with open(path, "rb") as f:
        for chunk, here in zip(chunks, present):
            if here:
                f.seek(chunk.start)
                assert digest_of(chunk, f.read(chunk.length)) == chunk.digest


def manifest_of(cache, name):
    return cache.store.read_manifest(name.store_parts)


async def test_round_trip_matches_source_and_ollama_layout(live_registry, cache, client):
    reg = await live_registry(chunk_size=256 << 10)
    source, imported = reg.add_model("tiny:q1", 3 * MiB, template="{{ .Prompt }}",
                                     system="be brief", params={"temperature": 0.1},
                                     license="MIT")
    name = reg.name("tiny:q1")
    result = await pull(name, client, cache, chunk_size=1 * MiB)

    # the manifest, byte for byte, where Ollama keeps it
    # (under Ollama's host for the name, not the address it was fetched from)
    path = cache.root / "manifests" / "registry.ollama.ai" / "library" / "tiny" / "q1"
    assert path.read_bytes() == imported.manifest
    # every layer, same bytes as the source models dir, named as Ollama names them
    layers = [imported.config, *imported.layers]
    assert sorted(p.name for p in (cache.root / "blobs").iterdir()) == sorted(
        "sha256-" + layer.digest[7:] for layer in layers)
    for layer in layers:
        assert sha256_file(cache.store.blob_path(layer.digest)) == layer.digest
        assert sha256_file(reg.models.blob_path(layer.digest)) == layer.digest
    assert sha256_file(cache.store.blob_path(imported.model.digest)) == sha256_file(source)
    assert (cache.store.blob_path(imported.config.digest).read_bytes()
            == reg.models.blob_path(imported.config.digest).read_bytes())
    assert list(cache.partial_dir.iterdir()) == []
    assert cache.index.in_progress() == []
    assert {s.user_agent for s in reg.faults.seen} == {user_agent()}
    assert result.fetched_bytes == sum(layer.size for layer in layers)

    # A second pull of a sealed model fetches nothing but the manifest.
    before = len(reg.faults.seen)
    again = await pull(name, client, cache)
    assert again.fetched_bytes == 0
    assert [s.path for s in reg.faults.seen[before:]] == ["/v2/library/tiny/manifests/q1"]


async def test_many_chunks_fetched_concurrently_each_once(live_registry, cache, chunk_client):
    reg = await live_registry(chunk_size=64 << 10)
    _, imported = reg.add_model("big", 3 * MiB)
    reg.faults.delay = 0.01  # keep requests overlapping so concurrency is visible
    await pull(reg.name("big"), chunk_client, cache, concurrency=8, chunk_size=64 << 10)
    model = imported.model
    ranges = reg.faults.ranges(model.digest)
    n_chunks = -(-model.size // (64 << 10))
    assert n_chunks >= 40
    assert len(ranges) == n_chunks == len(set(ranges))  # each chunk requested exactly once
    assert reg.faults.max_in_flight > 1
    assert sha256_file(cache.store.blob_path(model.digest)) == model.digest


async def test_temporary_failures_are_retried(live_registry, cache, chunk_client):
    reg = await live_registry(chunk_size=64 << 10)
    _, imported = reg.add_model("flaky", 1 * MiB)
    d = imported.model.digest
    reg.faults.add("GET", "/manifests/", F.reply(503, b"busy", {"retry-after": "0"}), times=1)
    reg.faults.add("GET", "/chunksums/", F.reply(503), times=1)
    reg.faults.add("GET", d, F.reset_mid_body(), times=2, range="bytes=65536-131071")
    reg.faults.add("GET", d, F.reply(429, b"", {"retry-after": "0"}), times=1,
                   range="bytes=0-65535")
    await pull(reg.name("flaky"), chunk_client, cache, chunk_size=64 << 10)
    assert sha256_file(cache.store.blob_path(d)) == d
    assert reg.faults.ranges(d).count("bytes=65536-131071") == 3
    statuses = [s.status for s in reg.faults.seen if s.path.endswith("/manifests/latest")]
    assert statuses == [503, 200]


# a failed pull leaves the chunks it had written unrecorded, counted by the budget until its
# next recount (cache/invariants.py; the next open gives them back): timing decides if any
@pytest.mark.invariants(budget_exact=False)
async def test_missing_blob_fails_fast(live_registry, cache, client):
    reg = await live_registry()
    _, imported = reg.add_model("gone", 512 << 10)
    d = imported.model.digest
    reg.models.blob_path(d).unlink()
    with trio.fail_after(5):
        with pytest.raises(NotFound):
            await pull(reg.name("gone"), client, cache)
    # 404 is final: asked for once (a 512 KiB blob is one chunk, no chunk list needed)
    assert len([s for s in reg.faults.seen if d in s.path]) == 1
    assert manifest_of(cache, reg.name("gone")) is None


async def test_unknown_model_is_not_found(live_registry, cache, client):
    reg = await live_registry()
    with pytest.raises(NotFound, match="not found"):
        await pull(reg.name("nosuch"), client, cache, chunk_size=64 << 10)


# Bad answers on purpose: the failed pull releases its blob with chunks written but not
# recorded, and the next pull's open punches them (_free_absent) without telling the budget,
# which counts them until the next recount.
@pytest.mark.invariants(budget_exact=False)
@pytest.mark.parametrize("fault, error", [
    (F.corrupt_body, ChunkDigestMismatch),
    (F.without_range, BadRangeAnswer),
    (F.short_body, ShortBody),
])
async def test_bad_chunk_answers_are_refused(live_registry, cache, chunk_client, fault, error):
    reg = await live_registry(chunk_size=64 << 10)
    _, imported = reg.add_model("bad", 1 * MiB)
    d = imported.model.digest
    reg.faults.add("GET", d, fault(), range="bytes=131072-196607")
    with pytest.raises(error):
        await pull(reg.name("bad"), chunk_client, cache, chunk_size=64 << 10)
    assert_cache_clean_of(cache, d)
    assert manifest_of(cache, reg.name("bad")) is None
    stored = cache.index.load(d)
    assert stored is not None and not stored[2][2]  # the bad chunk is not present
    asked = reg.faults.ranges(d).count("bytes=131072-196607")
    # bad range answers (short, or a 200 with the whole body) are asked for again until the
    # attempts run out. A damaged one is caught by the seal (a pull checks the blob as a
    # whole), then fetched again and checked on its own.
    expected = {BadRangeAnswer: FAST_RETRY.attempts, ShortBody: FAST_RETRY.attempts,
                ChunkDigestMismatch: 1 + FAST_RETRY.attempts}[error]
    assert asked == expected
    # Once the server behaves, the next pull completes and fetches only what is missing.
    reg.faults.rules.clear()
    before = len(reg.faults.ranges(d))
    await pull(reg.name("bad"), chunk_client, cache, chunk_size=64 << 10)
    assert sha256_file(cache.store.blob_path(d)) == d
    refetched = reg.faults.ranges(d)[before:]
    assert "bytes=131072-196607" in refetched
    assert len(refetched) == stored[2].count(False)


@pytest.mark.parametrize("plane", ["direct", "httpx"])
async def test_pull_through_a_flaky_edge_completes(live_registry, cache, monkeypatch, plane):
    """A CDN edge that answers every third range with 200 and the whole blob, plus a short
    body and a shifted Content-Range: through either HTTP stack each bad answer is asked for
    again, and the pull completes with the right bytes in every blob."""
    monkeypatch.setenv("MODELFS_DATA_PLANE", plane)
    reg = await live_registry(chunk_size=64 << 10)
    _, imported = reg.add_model("edgy", 1 * MiB, template="{{ .Prompt }}")
    source = F.FlakySource(reg.faults, imported.model.digest, short="bytes=131072-196607",
                           shifted="bytes=327680-393215")
    async with RegistryClient(PER_CHUNK) as client:
        assert (client._raw is not None) == (plane == "direct")
        await pull(reg.name("edgy"), client, cache, chunk_size=64 << 10)
    for layer in [imported.config, *imported.layers]:
        assert sha256_file(cache.store.blob_path(layer.digest)) == layer.digest
    assert manifest_of(cache, reg.name("edgy")) == imported.manifest
    source.check_every_bad_answer_was_asked_again()


def _lines(chunks):
    return "".join(f"{digest} {start}-{end}\n" for digest, start, end in chunks).encode()


def _chunk_lines(data, size=64 << 10):
    out = []
    for start in range(0, len(data), size):
        piece = data[start:start + size]
        out.append(("sha256:" + hashlib.sha256(piece).hexdigest(), start, start + len(piece) - 1))
    return out


@pytest.mark.parametrize("mangle, match", [
    (lambda c: c[:2] + c[3:], "gap"),
    (lambda c: [c[0], (c[1][0], c[1][1] - 1, c[1][2])] + c[2:], "overlaps"),
    (lambda c: [c[1], c[0]] + c[2:], "gap"),
    (lambda c: c[:-1], "covers"),
    (lambda c: c[:-1] + [(c[-1][0], c[-1][1], c[-1][2] + 100)], "past the blob size"),
    ("sha256:zz 0-9\n", "invalid digest"),
    ("garbage", "missing chunk range"),
])
async def test_bad_chunk_lists_are_refused(live_registry, cache, client, mangle, match):
    reg = await live_registry(chunk_size=64 << 10)
    source, imported = reg.add_model("lies", 1 * MiB)
    d = imported.model.digest
    data = reg.models.blob_path(d).read_bytes()
    body = mangle.encode() if isinstance(mangle, str) else _lines(mangle(_chunk_lines(data)))
    reg.faults.add("GET", "/chunksums/" + d, F.reply(200, body))
    with pytest.raises(BadChunkList, match=match):
        await pull(reg.name("lies"), client, cache, chunk_size=64 << 10)
    assert_cache_clean_of(cache, d)
    assert reg.faults.ranges(d) == []  # nothing fetched on a list we do not accept


@pytest.mark.parametrize("body, match", [
    (b"<html>not json</html>", "not JSON"),
    (json.dumps({"schemaVersion": 2, "layers": [
        {"mediaType": "application/vnd.ollama.image.model", "digest": "sha256:1234",
         "size": 3}]}).encode(), "invalid digest"),
])
async def test_bad_manifests_are_refused(live_registry, cache, client, body, match):
    reg = await live_registry()
    reg.add_model("m", 256 << 10)
    reg.faults.add("GET", "/manifests/", F.reply(200, body))
    with pytest.raises(BadManifest, match=match):
        await pull(reg.name("m"), client, cache, chunk_size=64 << 10)
    assert list((cache.root / "blobs").iterdir()) == []
    assert manifest_of(cache, reg.name("m")) is None


# A seal mismatch on purpose: the discard gives the blob's bytes back without telling the
# budget (PartialBlob.discard), which counts them until the next recount.
@pytest.mark.invariants(budget_exact=False)
async def test_seal_catches_self_consistent_lies(live_registry, cache, client):
    """Every chunk matches the (forged) chunk list, but the blob is not the manifest's."""
    reg = await live_registry(chunk_size=64 << 10)
    _, imported = reg.add_model("forged", 1 * MiB)
    d = imported.model.digest
    evil = bytearray(reg.models.blob_path(d).read_bytes())
    evil[-1] ^= 1
    chunksums, blob = F.serve_bytes(bytes(evil), 64 << 10)
    reg.faults.add("GET", "/chunksums/" + d, chunksums)
    reg.faults.add("GET", "/blobs/" + d, blob)
    with pytest.raises(SealMismatch):
        await pull(reg.name("forged"), client, cache, chunk_size=64 << 10)
    assert_cache_clean_of(cache, d)
    assert cache.index.load(d) is None  # the chunk list is distrusted: all progress dropped
    assert not (cache.partial_dir / ("sha256-" + d[7:] + ".partial")).exists()
    assert manifest_of(cache, reg.name("forged")) is None


async def test_registry_without_chunksums(live_registry, cache, client):
    reg = await live_registry(chunk_size=64 << 10)
    _, imported = reg.add_model("plain", 2 * MiB)
    d = imported.model.digest
    reg.faults.add("GET", "/chunksums/", F.reply(404, b"404 page not found"))
    await pull(reg.name("plain"), client, cache, chunk_size=256 << 10)
    assert sha256_file(cache.store.blob_path(d)) == d
    assert len(reg.faults.ranges(d)) == -(-imported.model.size // (256 << 10))


# A seal mismatch on purpose: the discard gives the blob's bytes back without telling the
# budget (PartialBlob.discard), which counts them until the next recount.
@pytest.mark.invariants(budget_exact=False)
async def test_registry_without_chunksums_still_sealed(live_registry, cache, client):
    reg = await live_registry(chunk_size=64 << 10)
    _, imported = reg.add_model("plain", 1 * MiB)
    d = imported.model.digest
    reg.faults.add("GET", "/chunksums/", F.reply(404, b"404 page not found"))
    reg.faults.add("GET", "/blobs/" + d, F.corrupt_body(), range="bytes=262144-524287")
    with pytest.raises(SealMismatch):
        await pull(reg.name("plain"), client, cache, chunk_size=256 << 10)
    assert not cache.store.blob_path(d).exists()
    assert manifest_of(cache, reg.name("plain")) is None


async def test_redirected_blobs_are_followed(live_registry, cache, client):
    reg = await live_registry(chunk_size=64 << 10)
    _, imported = reg.add_model("moved", 512 << 10)
    d = imported.model.digest
    reg.faults.add("GET", "/chunksums/" + d, F.reply(
        200, _lines(_chunk_lines(reg.models.blob_path(d).read_bytes())),
        {"content-location": f"{reg.url}/cdn/{d}"}))
    cdn = f"{reg.url}/v2/library/moved/blobs/{d}"
    reg.faults.add("GET", "/cdn/", F.reply(307, b"", {"location": cdn}))
    await pull(reg.name("moved"), client, cache, chunk_size=64 << 10)
    assert sha256_file(cache.store.blob_path(d)) == d
    assert any("/cdn/" in s.path for s in reg.faults.seen)


async def test_chunks_ahead_of_the_sealer_wait_for_a_slow_first_chunk(live_registry, cache,
                                                                        chunk_client, monkeypatch):
    """A pull keeps its chunks within reach of the sealer (which hashes them from memory):
    while the first chunk is slow the others wait for it, without deadlock, and the pull
    completes, fetches each chunk once and seals."""
    from modelfs.cache import sealer
    reg = await live_registry(chunk_size=256 << 10)
    source, imported = reg.add_model("slowstart", 4 * MiB)
    monkeypatch.setattr(sealer, "EARLY_LIMIT", 512 << 10)  # two chunks

    async def slow(faults, scope, receive, send):
        await trio.sleep(1.5)
        await faults.app(scope, receive, send)

    first = f"bytes=0-{(256 << 10) - 1}"
    reg.faults.add("GET", "/blobs/" + imported.model.digest, slow, range=first)
    with trio.fail_after(20):
        await pull(reg.name("slowstart"), chunk_client, cache, concurrency=4, chunk_size=1 * MiB)
    assert sha256_file(cache.store.blob_path(imported.model.digest)) == sha256_file(source)
    ranges = reg.faults.ranges("/blobs/" + imported.model.digest)
    assert len(ranges) == 16 and len(set(ranges)) == 16  # each chunk once


class _CountingSha256:
    """hashlib.sha256 that adds the bytes it is fed to `counter` (threads may feed it)."""

    def __init__(self, counter: list, data=b""):
        self._h, self._counter = hashlib.sha256(), counter
        self.update(data)

    def update(self, data) -> None:
        if not bytes(memoryview(data)[:18]) == b"modelfs fetch unit":
            # (a fetch unit's digest hashes its chunks' digests, not blob bytes: units.py)
            self._counter[0] += memoryview(data).nbytes
        self._h.update(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()

    def digest(self) -> bytes:
        return self._h.digest()


async def test_pull_hashes_each_byte_once(live_registry, cache, client, monkeypatch):
    """A pull checks a blob by its seal alone: every byte goes through sha256 once (a mount,
    which serves chunks before the seal, must hash each one on its own as well)."""
    import types

    import sys

    reg = await live_registry(chunk_size=64 << 10)
    _, imported = reg.add_model("once", 4 * MiB)
    counter = [0]
    fake = types.SimpleNamespace(sha256=lambda data=b"": _CountingSha256(counter, data))
    server_side = ("modelfs.fetcher.server", "modelfs.fetcher.chunksum_store",
                   "modelfs.cache.importer")  # the registry in this process
    for name, module in list(sys.modules.items()):
        if name.startswith("modelfs.") and name not in server_side and \
                getattr(module, "hashlib", None) is hashlib:
            monkeypatch.setattr(module, "hashlib", fake)
    result = await pull(reg.name("once"), client, cache, chunk_size=64 << 10)
    total = sum(layer.size for layer in result.manifest.blobs())
    assert cache.is_sealed(imported.model.digest, imported.model.size)
    assert sha256_file(cache.store.blob_path(imported.model.digest)) == imported.model.digest
    # not twice: no chunk was hashed on its own as well (nor the manifest, which is checked
    # against the digest it was asked for, when it was asked for by one)
    assert counter[0] == total
    stored = cache.index.load(imported.model.digest)
    assert set(stored[2]) == {1}  # verified by the seal: recorded as verified


async def test_stopped_pull_resumes_and_refetches_only_corrupt_landed_chunks(
        live_registry, tmp_path, chunk_client):
    """A pull stopped halfway leaves LANDED chunks (never checked on their own). One of them is
    damaged on disk before the next pull: the seal catches it, it alone is fetched again, and
    the blob is sealed with the right bytes."""
    reg = await live_registry(chunk_size=64 << 10)
    _, imported = reg.add_model("mid", 4 * MiB)
    layer = imported.model
    cache = await stopped_pull(reg, tmp_path / "cache", chunk_client, "mid", layer.digest)
    try:
        chunks, present, bad = corrupt_a_landed_chunk(cache, layer.digest)
        before = len(reg.faults.ranges(layer.digest))
        await pull(reg.name("mid"), chunk_client, cache, chunk_size=64 << 10)
        assert sha256_file(cache.store.blob_path(layer.digest)) == layer.digest
        again = reg.faults.ranges(layer.digest)[before:]
        want = {f"bytes={c.start}-{c.end - 1}" for i, c in enumerate(chunks)
                if not present[i] or i == bad}
        assert sorted(again) == sorted(want)  # each once: the missing ones and the bad one
        assert set(cache.index.load(layer.digest)[2]) == {1}
    finally:
        cache.close()


async def test_chunks_larger_than_the_sealers_reach_do_not_wait_for_it(live_registry, cache,
                                                                       client, monkeypatch):
    """Chunks larger than the bytes kept for the sealer (EARLY_LIMIT, 48 MiB; here made small:
    a registry's own list, or --chunk-size, may exceed it): the chunk the sealer needs next is
    never made to wait for the sealer to come closer. It used to wait SEALER_PATIENCE for a
    sealer that was waiting for it (31 s instead of 3 s for 2 GiB in 64 MiB chunks)."""
    from modelfs.cache import sealer

    monkeypatch.setattr(sealer, "EARLY_LIMIT", 64 << 10)
    monkeypatch.setattr(sealer, "SEALER_PATIENCE", 60.0)
    reg = await live_registry(chunk_size=64 << 10)
    _, imported = reg.add_model("wide", 2 * MiB)
    reg.faults.add("GET", "/chunksums/", F.reply(404, b"404 page not found"))
    with trio.fail_after(20):
        await pull(reg.name("wide"), client, cache, chunk_size=256 << 10)
    assert sha256_file(cache.store.blob_path(imported.model.digest)) == imported.model.digest


@pytest.mark.invariants(budget_exact=False)  # (a failed write is given back at the recount)
async def test_pull_onto_a_full_disk_fails_with_the_write_error(live_registry, client, tmp_path):
    """A pull whose chunks cannot be written (a cache on a filesystem smaller than the model)
    fails with the disk's error, not a later symptom, writes no manifest, and records no chunk
    whose bytes are not in the file."""
    from modelfs.cache.blobcache import BlobCache
    from modelfs.cache.errors import CacheFull

    reg = await live_registry(chunk_size=256 << 10)
    _, imported = reg.add_model("big", 4 * MiB)
    with small_filesystem(tmp_path / "small", "1m") as small:
        cache = BlobCache(small / "cache")
        try:
            with pytest.raises((CacheFull, OSError), match="room|space|full"):
                with trio.fail_after(60):
                    await pull(reg.name("big"), client, cache, chunk_size=256 << 10)
            assert manifest_of(cache, reg.name("big")) is None
            assert_cache_clean_of(cache, imported.model.digest)
        finally:
            cache.close()
