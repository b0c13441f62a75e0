"""Ollama on the mount: `OLLAMA_MODELS=<mnt>`. Ollama itself cannot be installed here, so these
tests make exactly its lookups in a models directory (protocol.md §6.1) against real mounts:
the manifest path from the name, the blob paths from the manifest (':' -> '-'), the small
blobs read whole, the start-up prune (list `blobs/`, remove what no manifest names, remove
empty manifest directories), and llama.cpp loading the model blob they lead to.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import pathlib
import time

import pytest

from .helpers import import_model, modelfs, sha256_file
from .mounting import Mount, fuse_available
from .test_llama import MODEL, llama_python, run_llama, served  # noqa: F401 (fixtures)
from .test_mount import world  # noqa: F401 (a fixture)

pytestmark = fuse_available

SMALL = 1 << 20  # Ollama reads the config, template, params, ... whole


def ollama_manifest_path(models: pathlib.Path, name: str) -> pathlib.Path:
    """Where Ollama looks for `name` (types/model/name.go: ParseName, Filepath): the tag after a
    last ':' that follows the last '/', then model, namespace, host; defaults filled in."""
    host, namespace, tag = "registry.ollama.ai", "library", "latest"
    if name.rfind(":") > name.rfind("/"):
        name, tag = name.rsplit(":", 1)
    parts = name.split("/")
    model = parts[-1]
    if len(parts) >= 2:
        namespace = parts[-2]
    if len(parts) == 3:
        host = parts[0]
    return models / "manifests" / host / namespace / model / tag


def ollama_blob_path(models: pathlib.Path, digest: str) -> pathlib.Path:
    return models / "blobs" / digest.replace(":", "-")


def ollama_prune(models: pathlib.Path) -> list[tuple[str, int]]:
    """PruneLayers, as `ollama serve` runs it at start-up (server/images.go): every blob no
    manifest names is removed (an error is logged). Returns what was tried and its errno."""
    referenced = set()
    for path in glob.glob(str(models / "manifests" / "*" / "*" / "*" / "*")):
        doc = json.loads(pathlib.Path(path).read_bytes())
        for layer in [doc.get("config") or {}, *doc["layers"]]:
            if layer:
                referenced.add(layer["digest"].replace(":", "-"))
    return [(blob, _attempt(os.remove, models / "blobs" / blob))
            for blob in os.listdir(models / "blobs") if blob not in referenced]


def ollama_prune_directory(path: pathlib.Path) -> int:
    """PruneDirectory (manifest/paths.go), run on `manifests/` right after: empty directories
    are removed depth first, `manifests/` itself included; the first error is returned, and
    Serve returns it (`ollama serve` exits)."""
    if not path.is_dir() or path.is_symlink():
        return 0
    for entry in os.listdir(path):
        if error := ollama_prune_directory(path / entry):
            return error
    return 0 if os.listdir(path) else _attempt(os.rmdir, path)


def _attempt(fn, *args) -> int:
    try:
        fn(*args)
    except OSError as exc:
        return exc.errno
    return 0


def test_ollamas_lookups_on_a_cold_mount_lead_llama_to_the_model(served, llama_python):
    server, layer, tmp = served["server"], served["layer"], served["tmp"]
    source_models = tmp / "models"
    local = run_llama(llama_python, served["source"], "mmap")
    mount = Mount(tmp / "mnt", tmp / "cache", server.url)
    try:
        mount.start()
        mnt = mount.path
        # `ollama serve` on a cold mount: nothing known, no blob to prune, and manifests/ is
        # not empty (its placeholder file), so the prune removes nothing and serve goes on
        assert os.listdir(mnt / "blobs") == [] and os.listdir(mnt / "manifests") == [".modelfs"]
        assert ollama_prune(mnt) == []
        assert ollama_prune_directory(mnt / "manifests") == 0
        assert glob.glob(str(mnt / "manifests/*/*/*/*")) == []  # what `ollama list` globs
        # a name that does not exist leaves no empty directory for a later prune to meet
        assert not ollama_manifest_path(mnt, "nosuch:latest").exists()
        # `ollama run tinyllama:f32`: the manifest, by Ollama's path for the name
        path = ollama_manifest_path(mnt, MODEL)
        assert path == mnt / "manifests/registry.ollama.ai/library/tinyllama/f32"
        assert path.stat().st_size == len(path.read_bytes())
        raw = path.read_bytes()
        assert raw == ollama_manifest_path(source_models, MODEL).read_bytes()
        doc = json.loads(raw)
        blobs = [doc["config"], *doc["layers"]]
        for blob in blobs:
            p = ollama_blob_path(mnt, blob["digest"])
            assert p.stat().st_size == blob["size"], blob
            if blob["size"] <= SMALL:  # the config, template, params: read whole
                assert p.read_bytes() == ollama_blob_path(source_models,
                                                          blob["digest"]).read_bytes()
        assert json.loads(ollama_blob_path(mnt, doc["config"]["digest"]).read_bytes())[
            "model_format"] == "gguf"
        assert server.ranges(layer["digest"]) == []  # the weights are not fetched yet
        # a restart of `ollama serve` now: the prune finds every blob named by a manifest,
        # and the manifest directories are not empty
        listed = sorted(os.listdir(mnt / "blobs"))
        assert listed == sorted(b["digest"].replace(":", "-") for b in blobs)
        assert ollama_prune(mnt) == [] and ollama_prune_directory(mnt / "manifests") == 0
        assert glob.glob(str(mnt / "manifests/*/*/*/*")) == [str(path)]
        # what a prune of an unreferenced blob or an empty directory would get: EROFS, harmless
        model_blob = ollama_blob_path(mnt, layer["digest"])
        assert _attempt(os.remove, model_blob) == errno.EROFS
        assert _attempt(os.rmdir, path.parent) in (errno.EROFS, errno.ENOTEMPTY)
        assert _attempt(os.rename, model_blob, mnt / "blobs" / "x") == errno.EROFS
        assert sorted(os.listdir(mnt / "blobs")) == listed and path.read_bytes() == raw
        # the runner gets the model blob's path: llama.cpp loads it through the mount
        mounted = run_llama(llama_python, model_blob, "mmap")
        assert mounted["runs"] == local["runs"] and mounted["n_vocab"] == local["n_vocab"]
        assert server.ranges(layer["digest"]), "the weights were not read through the mount"
        # the same bytes as model.gguf of the model's directory
        assert sha256_file(model_blob) == layer["digest"] == sha256_file(
            mnt / MODEL / "model.gguf")
        cached = tmp / "cache" / "blobs" / layer["digest"].replace(":", "-")
        deadline = time.monotonic() + 10
        while not cached.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sha256_file(cached) == layer["digest"], mount.log()
    finally:
        mount.cleanup()


def test_the_root_lists_what_the_cache_holds_after_a_remount(world):
    import_model(world["sources"]["alice/other:v2"], "manifests/odd:1", world["models"])
    m = world["mount"]()
    assert sorted(os.listdir(m.path)) == ["blobs", "manifests"]  # cold: nothing known
    template = (m.path / "tiny:q1" / "template").read_text()
    # a namespace called `manifests` of the default registry: under its host's directory
    odd = m.path / "registry.ollama.ai" / "manifests" / "odd:1" / "model.gguf"
    assert sha256_file(odd) == sha256_file(world["sources"]["alice/other:v2"])
    assert (m.path / "manifests/registry.ollama.ai/manifests/odd/1").read_bytes() == \
        (world["models"] / "manifests/registry.ollama.ai/manifests/odd/1").read_bytes()
    m.unmount()
    # a model pulled into the same cache is shown as well
    r = modelfs("pull", "alice/other:v2", "--registry", world["server"].url, "--cache", m.cache)
    assert r.returncode == 0, r.stderr
    world["server"].stop()  # what is listed now comes from the cache alone
    m.start()
    assert sorted(os.listdir(m.path)) == ["alice", "blobs", "manifests", "registry.ollama.ai",
                                          "tiny:q1"]
    assert os.listdir(m.path / "alice") == ["other:v2"]
    assert sorted(glob.glob("*/*/*/*", root_dir=m.path / "manifests")) == [
        "registry.ollama.ai/alice/other/v2", "registry.ollama.ai/library/tiny/q1",
        "registry.ollama.ai/manifests/odd/1"]
    assert (m.path / "tiny:q1" / "template").read_text() == template
    assert sha256_file(m.path / "alice" / "other:v2" / "model.gguf") == sha256_file(
        world["sources"]["alice/other:v2"])
    # a name the cache does not hold needs the registry, which is down: EIO, and the mount
    # keeps answering
    with pytest.raises(OSError) as exc:
        os.stat(m.path / "manifests/registry.ollama.ai/library/nosuch/latest")
    assert exc.value.errno == errno.EIO
    assert os.listdir(m.path / "registry.ollama.ai") == ["manifests"]
