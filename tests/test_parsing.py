"""Chunk lists, manifests and sizes: every malformed input is refused with a clear error."""

import hashlib
import json

import pytest

from modelfs.cache.chunks import BadChunkList, Chunk, check_coverage, fixed_chunks
from modelfs.fetcher.chunksums import parse_chunksums
from modelfs.fetcher.errors import BadManifest
from modelfs.fetcher.manifest import parse_manifest
from modelfs.fs.sizes import parse_size


def d(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


A, B, C = d(b"a"), d(b"b"), d(b"c")


def test_chunksums_good_and_both_digest_forms():
    body = f"{A} 0-9\n{B.replace(':', '-')} 10-19\n{C} 20-24\n".encode()
    assert parse_chunksums(body, 25) == [Chunk(0, 10, A), Chunk(10, 20, B), Chunk(20, 25, C)]


@pytest.mark.parametrize("body, size, match", [
    (f"{A} 0-9\n{B} 11-19\n", 20, "gap"),
    (f"{A} 0-9\n{B} 9-19\n", 20, "overlaps"),
    (f"{B} 10-19\n{A} 0-9\n", 20, "gap"),
    (f"{A} 0-9\n{B} 10-19\n", 30, "covers 20 of 30"),
    (f"{A} 0-9\n{B} 10-29\n", 20, "past the blob size"),
    (f"{A} 0-9\n{B}\n", 20, "missing chunk range"),
    (f"{A} 0-9\nsha256:! 10-19\n", 20, "invalid digest"),
    (f"{A} 0-x\n", 10, "invalid chunk range"),
    (f"{A} 9-0\n", 10, "reversed"),
    (f"{A} -1-9\n", 10, "invalid chunk range"),
    ("", 10, "covers 0 of 10"),
    ("\xff\xfe", 10, "not ASCII"),
])
def test_chunksums_refused(body, size, match):
    raw = body.encode("latin-1")
    with pytest.raises(BadChunkList, match=match):
        parse_chunksums(raw, size)


def test_coverage_and_fixed_chunks():
    chunks = fixed_chunks(25, 10)
    assert chunks == [Chunk(0, 10, None), Chunk(10, 20, None), Chunk(20, 25, None)]
    assert check_coverage(chunks, 25) is chunks
    assert fixed_chunks(0, 10) == []
    with pytest.raises(BadChunkList):
        check_coverage([Chunk(0, 0, None)], 0)


def manifest(**overrides):
    doc = {"schemaVersion": 2,
           "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
           "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                      "digest": A, "size": 1},
           "layers": [{"mediaType": "application/vnd.ollama.image.model", "digest": B,
                       "size": 1, "from": "somewhere", "extra": [1, 2]}]}
    doc.update(overrides)
    return json.dumps(doc).encode()


def test_manifest_kept_byte_for_byte():
    raw = manifest()
    m = parse_manifest(raw)
    assert m.raw is raw and m.digest == d(raw)
    assert [layer.digest for layer in m.blobs()] == [A, B]


@pytest.mark.parametrize("raw, match", [
    (b"not json", "not JSON"),
    (b"[]", "not a JSON object"),
    (b"null", "not a JSON object"),
    (manifest(layers=[]), "no layers"),
    (manifest(layers=[{"mediaType": "x", "digest": "sha256:abc", "size": 1}]), "invalid digest"),
    (manifest(layers=[{"mediaType": "x", "digest": "md5:" + "0" * 32, "size": 1}]),
     "invalid digest"),
    (manifest(layers=[{"mediaType": "x", "digest": "sha256:../../" + "0" * 58, "size": 1}]),
     "invalid digest"),
    (manifest(layers=[{"mediaType": "x", "digest": B, "size": -1}]), "invalid size"),
    (manifest(layers=[{"mediaType": "x", "digest": B, "size": "1"}]), "invalid size"),
    (manifest(layers=[{"digest": B, "size": 1}]), "no mediaType"),
    (manifest(schemaVersion=1), "schemaVersion"),
])
def test_manifest_refused(raw, match):
    with pytest.raises(BadManifest, match=match):
        parse_manifest(raw)


@pytest.mark.parametrize("text, value", [
    ("4096", 4096), ("8M", 8 << 20), ("2G", 2 << 30), ("512k", 512 << 10), ("1.5G", 3 << 29),
    ("8MiB", 8 << 20), ("64MB", 64 << 20)])
def test_sizes(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "M", "8X", "-1", "1.5"])
def test_bad_sizes(text):
    with pytest.raises(ValueError):
        parse_size(text)
