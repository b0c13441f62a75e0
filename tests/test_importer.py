"""import_gguf against real GGUF files from the factory."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

import gguf
import numpy as np
import pytest

from modelfs.cache.errors import InvalidName
from modelfs.cache.importer import (
    CONFIG_MEDIA_TYPE,
    COPY_CHUNK,
    LICENSE_MEDIA_TYPE,
    MESSAGES_MEDIA_TYPE,
    MODEL_MEDIA_TYPE,
    PARAMS_MEDIA_TYPE,
    SYSTEM_MEDIA_TYPE,
    TEMPLATE_MEDIA_TYPE,
    ImportFailed,
    NotAGGUF,
    host_architecture,
    import_gguf,
)
from modelfs.cache.store import ModelsDir
from modelfs.fetcher.manifest import parse_manifest

try:
    from tests.gguf_factory import KiB, MiB, make_gguf, make_gguf_of_size
    from tests.helpers import sha256_file
except ImportError:  # run with tests/ (not the checkout) on sys.path
    from gguf_factory import KiB, MiB, make_gguf, make_gguf_of_size
    from helpers import sha256_file

PARTS = ("registry.ollama.ai", "library", "tiny", "latest")
TEMPLATE = "{{ if .System }}<|system|>{{ .System }}{{ end }}<|user|>{{ .Prompt }}"
SYSTEM = "You are a helpful assistant & you say \"hi\"."
PARAMS = {"temperature": 0.7, "stop": ["<|user|>", "</s>"], "num_ctx": 4096}
MESSAGES = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi ✓"}]
LICENSE = "MIT License\n\nCopyright (c) modelfs\n"


def blob_names(models: ModelsDir) -> list[str]:
    return sorted(p.name for p in models.blobs.iterdir())


def all_files(root: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("src") / "tiny.gguf"
    return make_gguf(path, n_tensors=3, tensor_bytes=32 * KiB, seed=7, arch="qwen2", size_label="1.5B")


@pytest.fixture
def models(tmp_path) -> ModelsDir:
    return ModelsDir(tmp_path / "models").create()


def full_import(source, models, parts=PARTS):
    return import_gguf(source, parts, models, template=TEMPLATE, system=SYSTEM, params=PARAMS,
                       messages=MESSAGES, license=LICENSE)


def test_model_blob_is_the_source_named_by_its_digest(small_gguf, models):
    result = import_gguf(small_gguf, PARTS, models)
    hex_ = sha256_file(small_gguf)[len("sha256:"):]
    blob = models.blobs / f"sha256-{hex_}"
    assert result.model == type(result.model)(MODEL_MEDIA_TYPE, f"sha256:{hex_}", small_gguf.stat().st_size)
    assert blob.read_bytes() == small_gguf.read_bytes()
    assert sha256_file(blob) == f"sha256:{hex_}"
    assert oct(blob.stat().st_mode & 0o777) == oct(0o644)


def test_manifest_layers_in_order_and_match_blob_files(small_gguf, models):
    result = full_import(small_gguf, models)
    assert result.manifest_path == models.manifest_path(PARTS)
    raw = result.manifest_path.read_bytes()
    assert raw == result.manifest
    assert raw.endswith(b"}\n") and b"\n" not in raw[:-1] and b": " not in raw  # compact, as Go writes it
    doc = json.loads(raw)
    assert doc["schemaVersion"] == 2
    assert doc["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert [layer["mediaType"] for layer in doc["layers"]] == [
        MODEL_MEDIA_TYPE, TEMPLATE_MEDIA_TYPE, SYSTEM_MEDIA_TYPE,
        PARAMS_MEDIA_TYPE, MESSAGES_MEDIA_TYPE, LICENSE_MEDIA_TYPE,
    ]
    assert doc["config"]["mediaType"] == CONFIG_MEDIA_TYPE
    for entry in [doc["config"], *doc["layers"]]:
        assert set(entry) == {"mediaType", "digest", "size"}
        blob = models.blob_path(entry["digest"])
        assert blob.stat().st_size == entry["size"]
        assert sha256_file(blob) == entry["digest"]
    assert [(layer.media_type, layer.digest, layer.size) for layer in result.layers] == [
        (layer["mediaType"], layer["digest"], layer["size"]) for layer in doc["layers"]]
    assert result.manifest_digest == "sha256:" + hashlib.sha256(raw).hexdigest()


def test_fetcher_parses_the_manifest(small_gguf, models):
    result = full_import(small_gguf, models)
    parsed = parse_manifest(result.manifest)
    assert parsed.config.digest == result.config.digest
    assert [layer.digest for layer in parsed.layers] == [layer.digest for layer in result.layers]
    assert models.list_manifests() == [PARTS]


def test_config_blob(small_gguf, models):
    result = full_import(small_gguf, models)
    config = json.loads(models.blob_path(result.config.digest).read_bytes())
    assert list(config) == ["model_format", "model_family", "model_families", "model_type",
                            "file_type", "architecture", "os", "rootfs"]
    assert config["model_format"] == "gguf"
    assert config["model_family"] == "qwen2"
    assert config["model_families"] == ["qwen2"]
    assert config["model_type"] == "1.5B"
    assert config["file_type"] == "F32"
    assert config["architecture"] == host_architecture() and config["architecture"] in ("amd64", "arm64")
    assert config["os"] == "linux"
    assert config["rootfs"] == {"type": "layers", "diff_ids": [layer.digest for layer in result.layers]}


def test_config_without_size_label(tmp_path, models):
    source = make_gguf(tmp_path / "m.gguf", n_tensors=1, tensor_bytes=4 * KiB, arch="llama")
    result = import_gguf(source, PARTS, models)
    config = json.loads(models.blob_path(result.config.digest).read_bytes())
    assert (config["model_family"], config["model_type"], config["file_type"]) == ("llama", "", "F32")


def test_text_layers_hold_exactly_the_text(small_gguf, models):
    result = full_import(small_gguf, models)
    by_type = {layer.media_type: models.blob_path(layer.digest).read_bytes() for layer in result.layers}
    assert by_type[TEMPLATE_MEDIA_TYPE] == TEMPLATE.encode()
    assert by_type[SYSTEM_MEDIA_TYPE] == SYSTEM.encode()
    assert by_type[LICENSE_MEDIA_TYPE] == LICENSE.encode()
    assert json.loads(by_type[PARAMS_MEDIA_TYPE]) == PARAMS
    assert json.loads(by_type[MESSAGES_MEDIA_TYPE]) == MESSAGES


def test_json_layers_are_encoded_like_go(small_gguf, models):
    result = full_import(small_gguf, models)
    by_type = {layer.media_type: models.blob_path(layer.digest).read_bytes() for layer in result.layers}
    # Go sorts map keys, escapes <, > and &, writes UTF-8 as is and ends with a newline.
    assert by_type[PARAMS_MEDIA_TYPE] == (
        b'{"num_ctx":4096,"stop":["\\u003c|user|\\u003e","\\u003c/s\\u003e"],"temperature":0.7}\n')
    assert by_type[MESSAGES_MEDIA_TYPE] == (
        '[{"role":"user","content":"hello"},{"role":"assistant","content":"hi ✓"}]\n'.encode())


def test_only_given_layers_are_written(small_gguf, models):
    result = import_gguf(small_gguf, PARTS, models, system="be brief", template="", params={})
    assert [layer.media_type for layer in result.layers] == [MODEL_MEDIA_TYPE, SYSTEM_MEDIA_TYPE]
    assert len(blob_names(models)) == 3  # model, system, config


def test_several_licenses(small_gguf, models):
    result = import_gguf(small_gguf, PARTS, models, license=["A", "B"])
    assert [layer.media_type for layer in result.layers[1:]] == [LICENSE_MEDIA_TYPE] * 2
    assert [models.blob_path(layer.digest).read_bytes() for layer in result.layers[1:]] == [b"A", b"B"]


def test_import_twice_is_idempotent(small_gguf, models):
    first = full_import(small_gguf, models)
    blobs_before = blob_names(models)
    model_blob = models.blob_path(first.model.digest)
    inode, mtime = model_blob.stat().st_ino, models.manifest_path(PARTS).stat().st_mtime_ns
    second = full_import(small_gguf, models)
    assert second.manifest == first.manifest
    assert second.manifest_path.read_bytes() == first.manifest
    assert blob_names(models) == blobs_before
    assert len(blobs_before) == 7  # model, five text layers, config
    assert not [p for p in all_files(models.root) if p.name.startswith(".tmp-")]
    assert model_blob.stat().st_ino == inode  # the existing blob was kept, not replaced
    assert models.manifest_path(PARTS).stat().st_mtime_ns == mtime


def test_same_weights_under_two_names_share_the_blob(small_gguf, models):
    a = import_gguf(small_gguf, PARTS, models)
    b = import_gguf(small_gguf, ("example.com", "me", "other", "v1"), models, system="x")
    assert a.model == b.model
    assert sorted(models.list_manifests()) == sorted([PARTS, ("example.com", "me", "other", "v1")])
    assert len([n for n in blob_names(models) if n == "sha256-" + a.model.digest[7:]]) == 1


def test_blob_of_wrong_size_is_replaced(small_gguf, models):
    digest = sha256_file(small_gguf)
    models.blob_path(digest).write_bytes(b"truncated")
    import_gguf(small_gguf, PARTS, models)
    assert models.blob_path(digest).read_bytes() == small_gguf.read_bytes()


def test_multi_chunk_copy(tmp_path, models):
    source = make_gguf_of_size(tmp_path / "big.gguf", 2 * COPY_CHUNK + 12345, seed=3)
    assert source.stat().st_size > 2 * COPY_CHUNK
    result = import_gguf(source, PARTS, models)
    assert result.model.size == source.stat().st_size
    assert sha256_file(models.blob_path(result.model.digest)) == sha256_file(source)


def test_reader_reads_the_blob_back(small_gguf, models):
    result = import_gguf(small_gguf, PARTS, models)
    original = gguf.GGUFReader(small_gguf)
    imported = gguf.GGUFReader(models.blob_path(result.model.digest))
    assert [t.name for t in imported.tensors] == [t.name for t in original.tensors]
    assert len(imported.tensors) == 3
    for a, b in zip(original.tensors, imported.tensors):
        assert b.tensor_type == a.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(b.shape) == list(a.shape)
        assert np.array_equal(np.asarray(a.data), np.asarray(b.data))
    assert imported.fields["general.architecture"].contents() == "qwen2"


def _garbage_sources(tmp_path: pathlib.Path, small_gguf: pathlib.Path) -> dict[str, pathlib.Path]:
    sources = {
        "text": tmp_path / "notes.txt",
        "empty": tmp_path / "empty.gguf",
        "short": tmp_path / "short.gguf",
        "truncated": tmp_path / "truncated.gguf",
        "directory": tmp_path / "adir.gguf",
    }
    sources["text"].write_text("this is not a model\n" * 100)
    sources["empty"].write_bytes(b"")
    sources["short"].write_bytes(b"GG")
    sources["truncated"].write_bytes(small_gguf.read_bytes()[:40])  # magic, then a cut header
    sources["directory"].mkdir()
    return sources


@pytest.mark.parametrize("kind", ["text", "empty", "short", "truncated", "directory"])
def test_non_gguf_is_refused_and_leaves_nothing(tmp_path, small_gguf, kind):
    source = _garbage_sources(tmp_path, small_gguf)[kind]
    models = ModelsDir(tmp_path / "models").create()
    with pytest.raises(NotAGGUF) as info:
        import_gguf(source, PARTS, models, system="s", license="l")
    assert str(source) in str(info.value)
    assert all_files(models.root) == []


def test_non_gguf_does_not_create_the_store(tmp_path):
    source = tmp_path / "x.bin"
    source.write_bytes(os.urandom(4096))
    with pytest.raises(NotAGGUF, match="not a GGUF file"):
        import_gguf(source, PARTS, ModelsDir(tmp_path / "models"))
    assert not (tmp_path / "models").exists()


def test_missing_source(tmp_path, models):
    with pytest.raises(ImportFailed, match="cannot read") as info:
        import_gguf(tmp_path / "nope.gguf", PARTS, models)
    assert info.value.errno == 2
    assert all_files(models.root) == []


def test_gguf_without_architecture_is_refused(tmp_path, models):
    path = tmp_path / "noarch.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.kv_data[0].pop("general.architecture")  # the writer always adds it; take it out
    writer.add_tensor("t", np.zeros(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(NotAGGUF, match="general.architecture"):
        import_gguf(path, PARTS, models)
    assert all_files(models.root) == []


def test_bad_params_fail_before_any_blob(small_gguf, models):
    with pytest.raises(ImportFailed, match="params"):
        import_gguf(small_gguf, PARTS, models, params={"x": object()})
    with pytest.raises(ImportFailed, match="messages"):
        import_gguf(small_gguf, PARTS, models, messages=["hello"])
    assert all_files(models.root) == []


@pytest.mark.parametrize("parts", [("h", "ns", "..", "t"), ("h", "ns/x", "m", "t"), ("h", "ns", "m")])
def test_bad_names_fail_before_any_io(small_gguf, models, parts):
    with pytest.raises((InvalidName, ImportFailed)):
        import_gguf(small_gguf, parts, models)
    assert all_files(models.root) == []


def test_factory_sizes_and_determinism(tmp_path):
    for target in (100 * KiB, 3 * MiB):
        path = make_gguf_of_size(tmp_path / f"{target}.gguf", target, seed=1)
        assert target - 4 * KiB <= path.stat().st_size <= target
    a = make_gguf(tmp_path / "a.gguf", seed=5)
    b = make_gguf(tmp_path / "b.gguf", seed=5)
    c = make_gguf(tmp_path / "c.gguf", seed=6)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
