"""`modelfs serve --export`: the static registry tree, and modelfs pulling/mounting from it
served by a real nginx."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess

import pytest

from modelfs.cache.errors import ModelfsError
from modelfs.cache.units import FETCH_UNIT
from modelfs.fetcher import export as export_mod
from modelfs.fetcher.export import ExportError, ExportIncomplete, export_tree

from .gguf_factory import make_gguf_of_size
from .helpers import MODELFS, import_model, sha256_file
from .mounting import Mount, fuse_available
from .nginx import Nginx

MiB = 1 << 20
CHUNK = MiB
HOST = "registry.ollama.ai"
TEMPLATE = "{{ .System }} {{ .Prompt }}"


@pytest.fixture
def world(tmp_path):
    """A models dir made with `modelfs import`: two models in two repositories that share
    their template blob, one big enough (> 8 MiB) that clients ask for its chunk list."""
    models = tmp_path / "models"
    src = tmp_path / "src"
    src.mkdir()
    sources = {
        "tiny:q1": make_gguf_of_size(src / "tiny.gguf", 12 * MiB + 12345, seed=1),
        "alice/other:v2": make_gguf_of_size(src / "other.gguf", 3 * MiB, seed=2),
    }
    import_model(sources["tiny:q1"], "tiny:q1", models, "--template", TEMPLATE, "--system",
            "Be brief.", "--license", "MIT")
    import_model(sources["alice/other:v2"], "alice/other:v2", models, "--template", TEMPLATE)
    return {"tmp": tmp_path, "models": models, "sources": sources,
            "dest": tmp_path / "export", "state": tmp_path / "state"}


def _repo(name: str) -> tuple[str, str, str]:
    model, tag = name.split(":")
    ns, _, model = model.rpartition("/")
    return ns or "library", model, tag


def _manifest(world, name: str) -> tuple[bytes, dict]:
    ns, model, tag = _repo(name)
    raw = (world["models"] / "manifests" / HOST / ns / model / tag).read_bytes()
    return raw, json.loads(raw)


def _blobs_of(doc: dict) -> list[dict]:
    return [doc["config"], *doc["layers"]]


def _model_layer(doc: dict) -> dict:
    return next(layer for layer in doc["layers"] if layer["mediaType"].endswith(".model"))


async def _export(world, **kw):
    return await export_tree(world["models"], world["dest"], chunk_size=kw.pop("chunk_size", CHUNK),
                             state_dir=world["state"], **kw)


def _check_chunksums(text: str, blob_path, size: int, chunk_size: int) -> None:
    """Lines cover [0, size) in order, fixed-size chunks, each digest right."""
    lines = text.splitlines()
    assert text.endswith("\n") or size == 0
    assert len(lines) == -(-size // chunk_size)
    expected_start = 0
    with open(blob_path, "rb") as f:
        for line in lines:
            digest, span = line.split(" ")
            start, end = (int(x) for x in span.split("-"))
            assert start == expected_start and end >= start
            assert end - start + 1 == min(chunk_size, size - start)
            f.seek(start)
            assert digest == "sha256:" + hashlib.sha256(f.read(end - start + 1)).hexdigest()
            expected_start = end + 1
    assert expected_start == size


# --- the tree ---------------------------------------------------------------------------------


async def test_export_writes_the_tree(world):
    stats = await _export(world)
    assert not stats.skipped
    dest = world["dest"]
    total_entries = total_bytes = 0
    for name in world["sources"]:
        raw, doc = _manifest(world, name)
        ns, model, tag = _repo(name)
        repo = dest / "v2" / ns / model
        assert (repo / "manifests" / tag).read_bytes() == raw
        for layer in _blobs_of(doc):
            digest, hexd = layer["digest"], layer["digest"].split(":")[1]
            source = world["models"] / "blobs" / f"sha256-{hexd}"
            entry = repo / "blobs" / digest
            assert os.stat(entry).st_ino == os.stat(source).st_ino  # a hard link
            assert entry.read_bytes() == source.read_bytes()
            _check_chunksums((repo / "chunksums" / digest).read_text(), entry, layer["size"],
                             CHUNK)
            total_entries += 1
            total_bytes += layer["size"]
    # the shared template blob is one entry in each repository
    _, tiny = _manifest(world, "tiny:q1")
    _, other = _manifest(world, "alice/other:v2")
    template = {layer["digest"] for layer in tiny["layers"]} & \
        {layer["digest"] for layer in other["layers"]}
    assert len(template) == 1
    assert stats.manifests == 2
    assert stats.blobs == stats.linked == stats.chunksums == total_entries
    assert stats.copied == stats.unchanged == stats.copied_bytes == 0
    assert stats.bytes == total_bytes
    # nothing but the tree, and no temp files left behind
    assert sorted(p.name for p in dest.iterdir()) == ["v2"]
    assert not [p for p in dest.rglob(".tmp-*")]
    # the chunk lists were remembered in the state dir, never inside the models dir
    assert list(world["state"].glob("sha256-*.json"))


async def test_export_again_is_idempotent(world):
    first = await _export(world)
    files = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in world["dest"].rglob("*")
             if p.is_file()}
    second = await _export(world)
    assert second.linked == second.copied == second.written == 0
    assert second.unchanged == second.blobs == first.blobs
    assert second.manifests == first.manifests
    after = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in world["dest"].rglob("*")
             if p.is_file()}
    assert after == files  # nothing replaced or touched


async def test_export_repairs_changed_entries(world):
    await _export(world)
    raw, doc = _manifest(world, "tiny:q1")
    repo = world["dest"] / "v2" / "library" / "tiny"
    model = _model_layer(doc)
    # a stale manifest, a damaged chunk list and a blob entry that is not the models' blob
    (repo / "manifests" / "q1").write_bytes(b"{}")
    (repo / "chunksums" / model["digest"]).write_text("garbage\n")
    entry = repo / "blobs" / model["digest"]
    entry.unlink()
    entry.write_bytes(b"x" * 10)
    stats = await _export(world)
    assert (repo / "manifests" / "q1").read_bytes() == raw
    _check_chunksums((repo / "chunksums" / model["digest"]).read_text(), entry, model["size"],
                     CHUNK)
    hexd = model["digest"].split(":")[1]
    assert entry.stat().st_ino == (world["models"] / "blobs" / f"sha256-{hexd}").stat().st_ino
    assert stats.linked == 1 and stats.written == 2


async def test_copies_when_hard_links_are_impossible(world, monkeypatch):
    def no_link(src, dst, *a, **kw):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(export_mod.os, "link", no_link)
    # small pieces: the copy loop runs several times per blob
    monkeypatch.setattr(export_mod, "_COPY_PIECE", 5 * MiB)
    stats = await _export(world)
    assert stats.linked == 0 and stats.copied == stats.blobs > 0
    assert stats.copied_bytes == stats.bytes
    _, doc = _manifest(world, "tiny:q1")
    for layer in _blobs_of(doc):
        hexd = layer["digest"].split(":")[1]
        source = world["models"] / "blobs" / f"sha256-{hexd}"
        entry = world["dest"] / "v2" / "library" / "tiny" / "blobs" / layer["digest"]
        assert entry.stat().st_ino != source.stat().st_ino
        assert sha256_file(entry) == layer["digest"]
        assert entry.stat().st_mtime_ns == source.stat().st_mtime_ns
    assert not list(world["dest"].rglob(".tmp-*"))
    again = await _export(world)
    assert again.copied == 0 and again.unchanged == again.blobs


async def test_copy_with_read_write_fallback(world, monkeypatch):
    def no_cfr(*a, **kw):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(export_mod.os, "link", no_cfr)
    monkeypatch.setattr(export_mod.os, "copy_file_range", no_cfr)
    stats = await _export(world)
    assert stats.copied == stats.blobs
    _, doc = _manifest(world, "tiny:q1")
    entry = world["dest"] / "v2" / "library" / "tiny" / "blobs" / _model_layer(doc)["digest"]
    assert sha256_file(entry) == _model_layer(doc)["digest"]


async def test_prefers_the_default_host_then_sorted_hosts(world):
    raw, _ = _manifest(world, "tiny:q1")
    other = world["models"] / "manifests"
    for host, data in [("a.example:5000", raw + b"\n\n"), ("b.example", raw + b"\n")]:
        path = other / host / "library" / "tiny" / "q1"
        path.parent.mkdir(parents=True)
        path.write_bytes(data)
    # a tag only on other hosts: the first sorted host wins
    for host, data in [("b.example", raw + b" "), ("a.example:5000", raw + b"  ")]:
        path = other / host / "library" / "tiny" / "only-elsewhere"
        path.write_bytes(data)
    stats = await _export(world)
    manifests = world["dest"] / "v2" / "library" / "tiny" / "manifests"
    assert (manifests / "q1").read_bytes() == raw
    assert (manifests / "only-elsewhere").read_bytes() == raw + b"  "
    assert stats.manifests == 3


async def test_refusals_write_nothing(world):
    models = world["models"]
    for dest, state, chunk_size in [
        (models / "export", world["state"], CHUNK),           # dest inside the models dir
        (models, world["state"], CHUNK),                      # dest is the models dir
        (world["dest"], models / "state", CHUNK),             # state inside the models dir
        (world["dest"], world["state"], 0),                   # bad chunk sizes
        (world["dest"], world["state"], 1 << 30),
    ]:
        with pytest.raises(ExportError):
            await export_tree(models, dest, chunk_size=chunk_size, state_dir=state)
    with pytest.raises(ExportError):
        await export_tree(world["tmp"] / "nope", world["dest"], state_dir=world["state"])
    assert not world["dest"].exists() and not (models / "export").exists()
    assert not (models / "v2").exists()
    assert issubclass(ExportError, ModelfsError)  # the CLI prints it as one line


async def test_page_sized_chunks_are_the_smallest_offered(world):
    """A registry may choose 4 KiB chunks, so export (and serve, below) must offer them for the
    client to be tested against; below a page is refused."""
    await _export(world, chunk_size=4 << 10)
    _, tiny = _manifest(world, "tiny:q1")
    model = _model_layer(tiny)
    text = (world["dest"] / "v2" / "library" / "tiny" / "chunksums" / model["digest"]).read_text()
    blob = world["models"] / "blobs" / model["digest"].replace(":", "-")
    _check_chunksums(text, blob, model["size"], 4 << 10)
    with pytest.raises(ExportError, match="between 4K and"):
        await export_tree(world["models"], world["tmp"] / "small", chunk_size=2 << 10,
                          state_dir=world["state"])
    assert not (world["tmp"] / "small").exists()


def test_cli_serve_offers_page_sized_chunks(world):
    import urllib.request

    serve = MODELFS + ["serve", "--models", str(world["models"]), "--listen", "127.0.0.1:0",
                       "--state-dir", str(world["state"])]
    r = subprocess.run(serve + ["--chunk-size", "2K"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2
    assert "--chunk-size must be between 4K and 64M" in r.stderr
    _, doc = _manifest(world, "alice/other:v2")
    model = _model_layer(doc)
    proc = subprocess.Popen(serve + ["--chunk-size", "4K"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving"), line
        url = f"{line.split()[-1]}/v2/alice/other/chunksums/{model['digest']}"
        with urllib.request.urlopen(url, timeout=60) as answer:
            text = answer.read().decode()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    blob = world["models"] / "blobs" / model["digest"].replace(":", "-")
    _check_chunksums(text, blob, model["size"], 4 << 10)


async def test_corrupt_or_missing_blobs_skip_only_their_model(world):
    _, tiny = _manifest(world, "tiny:q1")
    model = _model_layer(tiny)
    blob = world["models"] / "blobs" / f"sha256-{model['digest'].split(':')[1]}"
    with open(blob, "r+b") as f:  # same size, one byte changed
        f.seek(5 * MiB)
        byte = f.read(1)
        f.seek(5 * MiB)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ExportIncomplete) as exc:
        await _export(world)
    stats = exc.value.stats
    assert stats.manifests == 1 and len(stats.skipped) == 1
    assert "tiny:q1" in stats.skipped[0] and model["digest"] in stats.skipped[0]
    tiny_repo = world["dest"] / "v2" / "library" / "tiny"
    assert not (tiny_repo / "manifests" / "q1").exists()
    assert not (tiny_repo / "blobs" / model["digest"]).exists()
    assert not (tiny_repo / "chunksums" / model["digest"]).exists()
    raw, _ = _manifest(world, "alice/other:v2")
    assert (world["dest"] / "v2" / "alice" / "other" / "manifests" / "v2").read_bytes() == raw
    # a missing blob is reported the same way
    blob.unlink()
    with pytest.raises(ExportIncomplete, match="not in the models directory"):
        await _export(world)


async def test_unwritable_tree_is_one_plain_error(world):
    (world["dest"] / "v2" / "library").mkdir(parents=True)
    (world["dest"] / "v2" / "library" / "tiny").write_text("not a directory")
    with pytest.raises(OSError):  # itself, not wrapped in an exception group
        await _export(world)
    assert not list(world["dest"].rglob(".tmp-*"))


def test_cli_export(world):
    cmd = MODELFS + ["serve", "--models", str(world["models"]), "--export", str(world["dest"]),
                     "--state-dir", str(world["state"]), "--chunk-size", "1M"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "exported 2 manifests and" in r.stdout
    assert (world["dest"] / "v2" / "library" / "tiny" / "manifests" / "q1").is_file()
    bad = MODELFS + ["serve", "--models", str(world["models"]), "--export",
                     str(world["models"] / "out"), "--state-dir", str(world["state"])]
    r = subprocess.run(bad, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "must be outside the models directory" in r.stderr
    assert "Traceback" not in r.stderr


# --- served by nginx ------------------------------------------------------------------------


def _have_nginx() -> str | None:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    if found:
        return found
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-qq", "nginx-light"]
    try:
        if subprocess.run(install, capture_output=True, env=env, timeout=600).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env,
                           timeout=600)
            subprocess.run(install, capture_output=True, env=env, timeout=600)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")


@pytest.fixture
def nginx(world):
    binary = _have_nginx()
    if binary is None:
        pytest.skip("nginx is not installed and `apt-get install nginx-light` failed")
    work = world["tmp"] / "nginx"
    server = Nginx(binary, world["dest"], work)
    try:
        yield server
    finally:
        server.stop()


def _pull(world, url, *extra):
    cache = world["tmp"] / "cache"
    r = subprocess.run(MODELFS + ["pull", "tiny:q1", "--registry", url, "--cache", str(cache),
                                  *extra], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "verified and sealed" in r.stdout
    _, doc = _manifest(world, "tiny:q1")
    for layer in _blobs_of(doc):
        hexd = layer["digest"].split(":")[1]
        assert sha256_file(cache / "blobs" / f"sha256-{hexd}") == layer["digest"]
    return cache


def _all_chunk_ranges(size: int, chunk: int) -> set[str]:
    return {f"bytes={s}-{min(s + chunk, size) - 1}" for s in range(0, size, chunk)}


async def test_pull_from_nginx_uses_chunksums(world, nginx):
    await _export(world)
    nginx.start()
    cache = _pull(world, nginx.url)
    raw, doc = _manifest(world, "tiny:q1")
    assert (cache / "manifests" / "registry.ollama.ai" / "library" / "tiny" / "q1"
            ).read_bytes() == raw
    model = _model_layer(doc)
    requests = nginx.requests()
    chunksums = [r for r in requests if "/chunksums/" in r["path"]]
    assert [(r["path"], r["status"]) for r in chunksums] == \
        [(f"/v2/library/tiny/chunksums/{model['digest']}", "200")]
    ranges = nginx.ranges(model["digest"])
    # the exported 1 MiB chunks, fetched in units of four (cache/units.py)
    assert set(ranges) == _all_chunk_ranges(model["size"], FETCH_UNIT)
    assert len(ranges) == len(set(ranges))
    blob_gets = [r for r in requests if "/blobs/" in r["path"]]
    assert all(r["status"] == "206" and r["range"] != "-" for r in blob_gets)


async def test_pull_from_nginx_without_chunksums(world, nginx):
    await _export(world)
    shutil.rmtree(world["dest"] / "v2" / "library" / "tiny" / "chunksums")
    nginx.start()
    _pull(world, nginx.url, "--chunk-size", "2M")
    _, doc = _manifest(world, "tiny:q1")
    model = _model_layer(doc)
    chunksums = [r for r in nginx.requests() if "/chunksums/" in r["path"]]
    assert chunksums and all(r["status"] == "404" for r in chunksums)
    # the client's own 2 MiB ranges, sealed by the whole-blob digest
    assert set(nginx.ranges(model["digest"])) == _all_chunk_ranges(model["size"], 2 * MiB)


@fuse_available
async def test_mount_reads_through_nginx(world, nginx):
    await _export(world)
    nginx.start()
    mount = Mount(world["tmp"] / "mnt", world["tmp"] / "mcache", nginx.url)
    try:
        mount.start()
        for name, source in world["sources"].items():
            ns, model, tag = _repo(name)
            parts = [f"{model}:{tag}"] if ns == "library" else [ns, f"{model}:{tag}"]
            path = mount.path.joinpath(*parts, "model.gguf")
            assert sha256_file(path) == sha256_file(source)
            assert (mount.path.joinpath(*parts, "template")).read_text() == TEMPLATE
    finally:
        mount.cleanup()
    _, doc = _manifest(world, "tiny:q1")
    model = _model_layer(doc)
    assert any("/chunksums/" + model["digest"] in r["path"] and r["status"] == "200"
               for r in nginx.requests())
    ranges = set(nginx.ranges(model["digest"]))
    assert ranges and ranges <= _all_chunk_ranges(model["size"], FETCH_UNIT)


async def test_nginx_keeps_blobs_open_but_serves_a_replaced_manifest_at_once(world, nginx):
    """The generated config caches open blob files (immutable, read in many ranges) but not
    manifests: a tag exported again is served new on the very next request."""
    import urllib.request

    await _export(world)
    nginx.start()
    raw, doc = _manifest(world, "tiny:q1")
    model = _model_layer(doc)
    base = f"{nginx.url}/v2/library/tiny"
    blob_url = f"{base}/blobs/{model['digest']}"
    for _ in range(2):  # the second answer comes from the file nginx keeps open
        request = urllib.request.Request(blob_url, headers={"Range": "bytes=0-1023"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status == 206 and len(answer.read()) == 1024
    with urllib.request.urlopen(f"{base}/manifests/q1", timeout=10) as answer:
        assert answer.read() == raw
    path = world["dest"] / "v2" / "library" / "tiny" / "manifests" / "q1"
    changed = raw.replace(b"{", b"{ ", 1)
    spare = path.with_name("q1.new")
    spare.write_bytes(changed)
    spare.replace(path)  # as an export does it: a new file under the old name
    with urllib.request.urlopen(f"{base}/manifests/q1", timeout=10) as answer:
        assert answer.read() == changed
    conf = (world["tmp"] / "nginx" / "nginx.conf").read_text()
    assert "open_file_cache" in conf
