"""`modelfs serve` over a hand-built models directory, on 127.0.0.1, with a real httpx client
(and a raw socket where httpx would normalise the path before sending it)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import pathlib
import re
import time

import httpx
import pytest
import trio

from modelfs.fetcher import chunksum_store
from modelfs.fetcher.chunksum_store import ChunksumStore
from modelfs.fetcher.server import serve

MODEL = "tiny"
CHUNK = 1000
ACCESS_LINE = re.compile(r'(\S+) "(\S+) (\S+)" range=(\S+) (\d{3}|-) (\d+)')


def sha_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Tree:
    """tmp/models (served), tmp/state (chunk lists), tmp/secret.txt (must never be served)."""

    def __init__(self, tmp: pathlib.Path):
        self.tmp = tmp
        self.models = tmp / "models"
        self.state = tmp / "state"
        (self.models / "blobs").mkdir(parents=True)
        self.secret = tmp / "secret.txt"
        self.secret_bytes = b"TOP-SECRET-" + os.urandom(8).hex().encode()
        self.secret.write_bytes(self.secret_bytes)

    def add_blob(self, data: bytes, name_hex: str | None = None) -> str:
        name_hex = name_hex or sha_hex(data)
        (self.models / "blobs" / f"sha256-{name_hex}").write_bytes(data)
        return "sha256:" + name_hex

    def add_manifest(self, digest: str, size: int, *, host: str = "registry.ollama.ai",
                     model: str = MODEL, tag: str = "latest") -> bytes:
        raw = json.dumps({"schemaVersion": 2,
                          "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                          "layers": [{"mediaType": "application/vnd.ollama.image.model",
                                      "digest": digest, "size": size}]}, indent=1).encode() + b"\n"
        path = self.models / "manifests" / host / "library" / model / tag
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(raw)
        return raw


@pytest.fixture
def tree(tmp_path) -> Tree:
    return Tree(tmp_path)


@pytest.fixture
def blob() -> bytes:
    return os.urandom(5 * CHUNK + 321)  # five whole chunks and a short one


@pytest.fixture
def hash_calls(monkeypatch) -> list[str]:
    """Counts how often a blob is actually read and hashed (not loaded from the state dir)."""
    calls: list[str] = []
    real = chunksum_store._hash_blob

    def counting(path, *args):
        calls.append(str(path))
        time.sleep(0.05)  # keep the flight open so concurrent requests really overlap
        return real(path, *args)

    monkeypatch.setattr(chunksum_store, "_hash_blob", counting)
    return calls


@contextlib.asynccontextmanager
async def running(tree: Tree, chunk_size: int = CHUNK):
    async with trio.open_nursery() as nursery:
        port = await nursery.start(functools.partial(
            serve, tree.models, chunk_size=chunk_size, state_dir=tree.state))
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                         timeout=10) as client:
                yield client, port
        finally:
            nursery.cancel_scope.cancel()


async def raw_get(port: int, target: str) -> tuple[int, bytes]:
    """GET with the request target sent byte for byte (httpx would resolve `..` itself)."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                                  "Connection: close\r\n\r\n".encode("latin-1"))
            data = b""
            while piece := await stream.receive_some(1 << 16):
                data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def error_code(response: httpx.Response) -> str:
    return response.json()["errors"][0]["code"]


def access_lines(caplog) -> list[re.Match]:
    lines = [r.getMessage() for r in caplog.records if r.name == "modelfs.serve"]
    matches = [ACCESS_LINE.fullmatch(line) for line in lines]
    assert all(matches), lines
    return matches


# --- manifests and the base endpoint -----------------------------------------------------------


async def test_base_endpoint(tree):
    async with running(tree) as (client, _):
        r = await client.get("/v2/")
        assert r.status_code == 200 and r.json() == {}
        assert (await client.head("/v2/")).status_code == 200


async def test_manifest_bytes_and_headers(tree, blob):
    raw = tree.add_manifest(tree.add_blob(blob), len(blob))
    async with running(tree) as (client, _):
        r = await client.get(f"/v2/library/{MODEL}/manifests/latest")
        assert r.status_code == 200
        assert r.content == raw  # byte for byte, indentation and trailing newline included
        assert r.headers["content-type"] == "application/vnd.docker.distribution.manifest.v2+json"
        assert r.headers["docker-content-digest"] == "sha256:" + sha_hex(raw)

        h = await client.head(f"/v2/library/{MODEL}/manifests/latest")
        assert h.status_code == 200 and h.content == b""
        assert int(h.headers["content-length"]) == len(raw)
        assert h.headers["docker-content-digest"] == r.headers["docker-content-digest"]


async def test_manifest_host_order(tree, blob):
    digest = tree.add_blob(blob)
    other = tree.add_manifest(digest, len(blob), host="a.example", tag="v1")
    tree.add_manifest(digest, 1, host="z.example", tag="v1")
    tree.add_manifest(digest, 2, host="z.example", tag="v2")
    default = tree.add_manifest(digest, len(blob), tag="v2")
    async with running(tree) as (client, _):
        # registry.ollama.ai first, then the other hosts sorted.
        assert (await client.get(f"/v2/library/{MODEL}/manifests/v2")).content == default
        assert (await client.get(f"/v2/library/{MODEL}/manifests/v1")).content == other


async def test_unknown_manifest_and_blob(tree, blob):
    async with running(tree) as (client, _):
        r = await client.get(f"/v2/library/{MODEL}/manifests/nope")
        assert r.status_code == 404 and error_code(r) == "MANIFEST_UNKNOWN"
        missing = "sha256:" + sha_hex(b"missing")
        for endpoint in ("blobs", "chunksums"):
            r = await client.get(f"/v2/library/{MODEL}/{endpoint}/{missing}")
            assert r.status_code == 404 and error_code(r) == "BLOB_UNKNOWN"
        r = await client.get("/v2/library/tiny/tags/list")
        assert r.status_code == 404
        r = await client.post("/v2/")
        assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD"


# --- blobs and ranges --------------------------------------------------------------------------


async def test_blob_get_and_head(tree, blob):
    digest = tree.add_blob(blob)
    async with running(tree) as (client, _):
        r = await client.get(f"/v2/library/{MODEL}/blobs/{digest}")
        assert r.status_code == 200 and r.content == blob
        assert r.headers["accept-ranges"] == "bytes"
        assert r.headers["docker-content-digest"] == digest
        h = await client.head(f"/v2/library/{MODEL}/blobs/{digest}")
        assert h.status_code == 200 and h.content == b""
        assert int(h.headers["content-length"]) == len(blob)


async def test_large_blob_streams_in_pieces(tree):
    data = os.urandom(3 * (1 << 20) + 12345)  # several 1 MiB pieces and a short one
    digest = tree.add_blob(data)
    async with running(tree) as (client, _):
        r = await client.get(f"/v2/library/{MODEL}/blobs/{digest}")
        assert r.status_code == 200 and r.content == data
        r = await client.get(f"/v2/library/{MODEL}/blobs/{digest}",
                             headers={"Range": "bytes=1048000-2097999"})
        assert r.status_code == 206 and r.content == data[1048000:2098000]


@pytest.mark.parametrize("header, start, end", [
    ("bytes=10-19", 10, 20),
    ("bytes=0-0", 0, 1),
    ("bytes=5000-", 5000, 5321),          # open-ended
    ("bytes=-100", 5221, 5321),           # suffix
    ("bytes=-999999", 0, 5321),           # suffix longer than the blob
    ("bytes=5300-999999", 5300, 5321),    # end past the blob is clamped
])
async def test_single_range(tree, blob, header, start, end):
    digest = tree.add_blob(blob)
    async with running(tree) as (client, _):
        r = await client.get(f"/v2/library/{MODEL}/blobs/{digest}", headers={"Range": header})
        assert r.status_code == 206
        assert r.content == blob[start:end]
        assert r.headers["content-range"] == f"bytes {start}-{end - 1}/{len(blob)}"
        assert int(r.headers["content-length"]) == end - start
        h = await client.head(f"/v2/library/{MODEL}/blobs/{digest}", headers={"Range": header})
        assert h.status_code == 206 and h.content == b""
        assert h.headers["content-range"] == r.headers["content-range"]


@pytest.mark.parametrize("header, status", [
    ("bytes=5321-", 416),          # starts at the size
    ("bytes=99999-100000", 416),   # starts past the end
    ("bytes=-0", 416),
    ("bytes=0-1,5-6", 416),        # several ranges
    ("bytes=abc", 400),
    ("bytes=9-3", 400),
    ("items=0-1", 400),
    ("bytes=-", 400),
])
async def test_bad_ranges(tree, blob, header, status):
    digest = tree.add_blob(blob)
    async with running(tree) as (client, _):
        r = await client.get(f"/v2/library/{MODEL}/blobs/{digest}", headers={"Range": header})
        assert r.status_code == status
        assert error_code(r) == "RANGE_INVALID"
        if status == 416:
            assert r.headers["content-range"] == f"bytes */{len(blob)}"


async def test_empty_blob(tree):
    digest = tree.add_blob(b"")
    async with running(tree) as (client, _):
        r = await client.get(f"/v2/library/{MODEL}/blobs/{digest}")
        assert r.status_code == 200 and r.content == b""
        r = await client.get(f"/v2/library/{MODEL}/blobs/{digest}", headers={"Range": "bytes=0-"})
        assert r.status_code == 416
        r = await client.get(f"/v2/library/{MODEL}/chunksums/{digest}")
        assert r.status_code == 200 and r.content == b""


async def test_client_disconnect_stops_the_stream(tree, caplog):
    caplog.set_level(logging.INFO, logger="modelfs.serve")
    size = 128 << 20
    path = tree.models / "blobs" / "tmp"
    with open(path, "wb") as f:
        f.truncate(size)  # sparse zeros: cheap to write
    digest = "sha256:" + sha_hex(bytes(1 << 20) * 128)
    path.rename(tree.models / "blobs" / f"sha256-{digest[7:]}")
    async with running(tree) as (_, port):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(f"GET /v2/library/{MODEL}/blobs/{digest} HTTP/1.1\r\n"
                                  f"Host: 127.0.0.1\r\n\r\n".encode())
            await stream.receive_some(1 << 16)
        with trio.fail_after(10):
            while not access_lines(caplog):
                await trio.sleep(0.01)
        [line] = access_lines(caplog)
        assert line.group(5) == "200"
        assert int(line.group(6)) < size  # the server stopped reading when the client left


# --- chunksums ---------------------------------------------------------------------------------


def parse_lines(body: bytes) -> list[tuple[str, int, int]]:
    out = []
    for line in body.decode().splitlines():
        digest, span = line.split(" ")
        start, end = span.split("-")
        out.append((digest, int(start), int(end)))
    return out


async def test_chunksums_cover_the_blob(tree, blob, hash_calls):
    digest = tree.add_blob(blob)
    async with running(tree) as (client, port):
        r = await client.get(f"/v2/library/{MODEL}/chunksums/{digest}")
        assert r.status_code == 200
        assert r.content.endswith(b"\n")
        chunks = parse_lines(r.content)
        assert len(chunks) == 6
        expected_start = 0
        for chunk_digest, start, end in chunks:
            assert start == expected_start and end >= start
            assert end - start + 1 == min(CHUNK, len(blob) - start)
            assert chunk_digest == "sha256:" + sha_hex(blob[start:end + 1])
            expected_start = end + 1
        assert expected_start == len(blob)

        location = r.headers["content-location"]
        assert location == f"http://127.0.0.1:{port}/v2/library/{MODEL}/blobs/{digest}"
        # Absolute, and fetchable with the ranges as given (what a client2 puller does).
        async with httpx.AsyncClient(timeout=10) as plain:
            _, start3, end3 = chunks[3]
            part = await plain.get(location, headers={"Range": f"bytes={start3}-{end3}"})
            assert part.status_code == 206 and part.content == blob[start3:end3 + 1]


async def test_chunksums_computed_once_outside_models_dir(tree, blob, hash_calls):
    digest = tree.add_blob(blob)
    before = sorted(p for p in tree.models.rglob("*"))
    async with running(tree) as (client, _):
        first = await client.get(f"/v2/library/{MODEL}/chunksums/{digest}")
        [state_file] = list(tree.state.iterdir())
        assert state_file.name == f"sha256-{digest[7:]}.{CHUNK}.json"
        stamp = state_file.stat().st_mtime_ns
        second = await client.get(f"/v2/library/{MODEL}/chunksums/{digest}")
        assert second.content == first.content
    assert len(hash_calls) == 1
    assert state_file.stat().st_mtime_ns == stamp
    assert sorted(p for p in tree.models.rglob("*")) == before  # nothing written into models

    # A new server process (same state dir) still does not hash again.
    async with running(tree) as (client, _):
        third = await client.get(f"/v2/library/{MODEL}/chunksums/{digest}")
        assert third.content == first.content
    assert len(hash_calls) == 1


async def test_chunk_lists_are_prepared_at_startup(tree, blob, hash_calls):
    """Right after it starts, serve computes the chunk list of every blob larger than a
    chunk, so the first client does not wait for a whole-blob hash; small blobs are left."""
    digest = tree.add_blob(blob)
    tree.add_blob(os.urandom(CHUNK // 2))
    async with running(tree):
        with trio.fail_after(10):
            while not (tree.state.exists() and list(tree.state.iterdir())):
                await trio.sleep(0.02)
        [state_file] = list(tree.state.iterdir())
        assert state_file.name == f"sha256-{digest[7:]}.{CHUNK}.json"
    assert len(hash_calls) == 1


async def test_chunksums_single_flight(tree, blob, hash_calls):
    digest = tree.add_blob(blob)
    bodies = []
    async with running(tree) as (client, _):
        async def fetch():
            r = await client.get(f"/v2/library/{MODEL}/chunksums/{digest}")
            bodies.append((r.status_code, r.content))

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(fetch)
    assert len(hash_calls) == 1
    assert len(bodies) == 8 and len(set(bodies)) == 1 and bodies[0][0] == 200


async def test_corrupt_blob_refused(tree, blob, hash_calls, caplog):
    claimed = sha_hex(blob)
    tree.add_blob(b"not what the name says" + blob[22:], name_hex=claimed)
    async with running(tree) as (client, _):
        r = await client.get(f"/v2/library/{MODEL}/chunksums/sha256:{claimed}")
        assert r.status_code == 500 and error_code(r) == "BLOB_CORRUPT"
        assert any(rec.levelno == logging.ERROR and "CORRUPT" in rec.getMessage()
                   for rec in caplog.records if rec.name == "modelfs.chunksums")
        # Remembered: refused again without hashing again, and the blob itself is refused too.
        r = await client.get(f"/v2/library/{MODEL}/chunksums/sha256:{claimed}")
        assert r.status_code == 500 and error_code(r) == "BLOB_CORRUPT"
        r = await client.get(f"/v2/library/{MODEL}/blobs/sha256:{claimed}")
        assert r.status_code == 500 and error_code(r) == "BLOB_CORRUPT"
    assert len(hash_calls) == 1
    assert not tree.state.exists() or not list(tree.state.iterdir())


async def test_saved_list_recomputed_when_stale_or_garbled(tree, blob, hash_calls):
    digest = tree.add_blob(blob)
    path = tree.models / "blobs" / f"sha256-{digest[7:]}"
    store = ChunksumStore(tree.state)
    good = await store.chunks(digest, path, CHUNK)
    assert len(hash_calls) == 1
    assert await store.chunks(digest, path, CHUNK) == good
    assert len(hash_calls) == 1

    state_file = store.state_file(digest, CHUNK)
    state_file.write_bytes(b'{"format": "modelfs-chunk')  # garbled: a cold cache, no error
    assert await store.chunks(digest, path, CHUNK) == good
    assert len(hash_calls) == 2
    json.loads(state_file.read_bytes())  # rewritten whole

    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert await store.chunks(digest, path, CHUNK) == good
    assert len(hash_calls) == 3

    other = await store.chunks(digest, path, 2048)  # another chunk size, another file
    assert [c.end for c in other] == [2048, 4096, len(blob)]
    assert len(hash_calls) == 4
    assert store.statistics()["computed"] == 4


async def test_state_dir_inside_models_dir_refused(tree):
    with pytest.raises(ValueError, match="outside"):
        await serve(tree.models, state_dir=tree.models / "state")


# --- path safety -------------------------------------------------------------------------------


def traversal_targets(tree: Tree, digest: str) -> list[str]:
    return [
        # Joined naively under manifests/registry.ollama.ai/library/tiny/ these reach
        # tmp/secret.txt (checked below).
        f"/v2/library/{MODEL}/manifests/..%2F..%2F..%2F..%2F..%2Fsecret.txt",
        f"/v2/library/{MODEL}/manifests/..%2f..%2f..%2f..%2f..%2fsecret.txt",
        f"/v2/library/{MODEL}/manifests/../../../../../secret.txt",
        "/v2/%2e%2e/%2e%2e/manifests/..%2Fsecret.txt",
        "/v2/%2E%2E/%2E%2E/manifests/%2E%2E%2Fsecret.txt",
        f"/v2/library/{MODEL}/manifests/..%5C..%5C..%5C..%5C..%5Csecret.txt",
        f"/v2/library/{MODEL}/manifests/..\\..\\..\\..\\..\\secret.txt",
        f"/v2/library/{MODEL}/blobs/..%2F..%2Fsecret.txt",
        f"/v2/library/{MODEL}/blobs/sha256:{digest[7:]}%2F..%2F..%2F..%2Fsecret.txt",
        f"/v2/library/{MODEL}/blobs/sha256:{digest[7:]}/../../../secret.txt",
        f"/v2/library/{MODEL}/chunksums/..%2F..%2Fsecret.txt",
        f"//{tree.secret}",
        "//etc/passwd",
        f"/v2/library//{MODEL}/manifests/latest",
        f"/v2/library/{MODEL}/manifests/./latest",
        f"/v2/library/{MODEL}/manifests/latest%00",
        f"/v2/library/{MODEL}/manifests/%zz",
        f"/v2/library/{MODEL}/manifests/lat%0Aest",
        f"http://127.0.0.1/v2/library/{MODEL}/manifests/../../../../../secret.txt",
    ]


async def test_path_traversal_refused(tree, blob):
    digest = tree.add_blob(blob)
    tree.add_manifest(digest, len(blob))
    # The first target really leads to the secret if the path were decoded and joined.
    naive = os.path.normpath(os.path.join(
        tree.models, "manifests", "registry.ollama.ai", "library", MODEL,
        "../../../../../secret.txt"))
    assert naive == str(tree.secret)
    async with running(tree) as (client, port):
        for target in traversal_targets(tree, digest):
            status, body = await raw_get(port, target)
            assert 400 <= status < 500, (target, status, body)
            assert tree.secret_bytes not in body, target
            if body:
                assert json.loads(body)["errors"][0]["code"] in (
                    "NAME_INVALID", "DIGEST_INVALID", "NAME_UNKNOWN", "UNSUPPORTED"), target
        # The same server still answers a proper request.
        assert (await client.get(f"/v2/library/{MODEL}/manifests/latest")).status_code == 200


@pytest.mark.parametrize("path, code", [
    ("/v2/library/bad name/manifests/latest", "NAME_INVALID"),
    ("/v2/lib.rary/tiny/manifests/latest", "NAME_INVALID"),   # '.' not allowed in a namespace
    ("/v2/library/tiny/manifests/-tag", "NAME_INVALID"),
    ("/v2/library/tiny/blobs/sha256:1234", "DIGEST_INVALID"),
    ("/v2/library/tiny/chunksums/md5:" + "0" * 32, "DIGEST_INVALID"),
])
async def test_invalid_names_refused(tree, path, code):
    async with running(tree) as (client, port):
        status, body = await raw_get(port, path.replace(" ", "%20"))
        assert status == 400
        assert json.loads(body)["errors"][0]["code"] == code


# --- errors and the access log ----------------------------------------------------------------


async def test_internal_error_is_a_500(tree, monkeypatch, caplog):
    from modelfs.fetcher import server

    def broken(*args):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(server, "_find_manifest", broken)
    caplog.set_level(logging.INFO, logger="modelfs.serve")
    async with running(tree) as (client, _):
        r = await client.get(f"/v2/library/{MODEL}/manifests/latest")
        assert r.status_code == 500 and error_code(r) == "UNKNOWN"
        assert (await client.get("/v2/")).status_code == 200  # the connection survived
    [rec] = [r for r in caplog.records if r.name == "modelfs.server"]
    assert rec.exc_info is not None and "disk on fire" in str(rec.exc_info[1])
    assert [m.group(5) for m in access_lines(caplog)] == ["500", "200"]


async def test_one_access_line_per_request(tree, blob, caplog):
    caplog.set_level(logging.INFO, logger="modelfs.serve")
    digest = tree.add_blob(blob)
    raw = tree.add_manifest(digest, len(blob))
    blob_path = f"/v2/library/{MODEL}/blobs/{digest}"
    async with running(tree) as (client, port):
        await client.get("/v2/")
        await client.get(f"/v2/library/{MODEL}/manifests/latest")
        await client.head(blob_path)
        await client.get(blob_path, headers={"Range": "bytes=10-19"})
        await client.get(blob_path, headers={"Range": "bytes=0-1, 4-5"})
        await client.get(f"/v2/library/{MODEL}/chunksums/{digest}")
        await client.get(f"/v2/library/{MODEL}/manifests/nope")
        await raw_get(port, f"/v2/library/{MODEL}/manifests/..%2Fx")
    lines = access_lines(caplog)
    assert [(m.group(2), m.group(3), m.group(4), m.group(5)) for m in lines] == [
        ("GET", "/v2/", "-", "200"),
        ("GET", f"/v2/library/{MODEL}/manifests/latest", "-", "200"),
        ("HEAD", blob_path, "-", "200"),
        ("GET", blob_path, "bytes=10-19", "206"),
        ("GET", blob_path, r"bytes=0-1,\x204-5", "416"),
        ("GET", f"/v2/library/{MODEL}/chunksums/{digest}", "-", "200"),
        ("GET", f"/v2/library/{MODEL}/manifests/nope", "-", "404"),
        ("GET", f"/v2/library/{MODEL}/manifests/..%2Fx", "-", "400"),
    ]
    sent = [int(m.group(6)) for m in lines]
    assert sent[0] == 2 and sent[1] == len(raw) and sent[2] == 0 and sent[3] == 10
    assert all(m.group(1).startswith("127.0.0.1:") for m in lines)
