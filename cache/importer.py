"""Import a local GGUF file as a model, laid out the way `ollama create` does it (protocol.md §2.2,
§2.3, §6.1): the weights as `blobs/sha256-<hex>`, one blob per text layer, a ConfigV2 config
blob, and the manifest, which is written last so that a crash never leaves a manifest pointing at
missing blobs.

JSON blobs are encoded the way Go's `json.Encoder` does it (compact, HTML characters escaped, a
trailing newline), so the same inputs give the same digests as Ollama where the inputs agree.
Synchronous and blocking; call it from a worker thread in async code.
"""

from __future__ import annotations

import dataclasses
import errno as _errno
import hashlib
import json
import os
import pathlib
import platform
import stat
import tempfile
from collections.abc import Sequence
from typing import Any

from .errors import ModelfsError
from .store import ManifestParts, ModelsDir, atomic_write, fsync_dir

COPY_CHUNK = 8 << 20

MANIFEST_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_MEDIA_TYPE = "application/vnd.docker.container.image.v1+json"
MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"
TEMPLATE_MEDIA_TYPE = "application/vnd.ollama.image.template"
SYSTEM_MEDIA_TYPE = "application/vnd.ollama.image.system"
PARAMS_MEDIA_TYPE = "application/vnd.ollama.image.params"
MESSAGES_MEDIA_TYPE = "application/vnd.ollama.image.messages"
LICENSE_MEDIA_TYPE = "application/vnd.ollama.image.license"

GGUF_MAGIC = b"GGUF"

# general.file_type -> the name Ollama shows as "quantization level" (fs/ggml FileType.String).
FILE_TYPE_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
    10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
    16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S",
    22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M",
    28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16",
    36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4",
}

# platform.machine() -> Go's GOARCH, which is what Ollama writes as `architecture`.
_GOARCH = {
    "x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
    "i386": "386", "i686": "386", "armv7l": "arm", "armv6l": "arm",
}

# Go's encoder escapes these inside strings by default; they never occur outside strings in JSON.
_GO_ESCAPES = (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
               ("\u2028", "\\u2028"), ("\u2029", "\\u2029"))


class ImportFailed(ModelfsError):
    """The source or the layer contents given to an import cannot be used."""

    errno = _errno.EINVAL


class NotAGGUF(ImportFailed):
    """The source file is not a readable GGUF model."""


@dataclasses.dataclass(frozen=True)
class Layer:
    media_type: str
    digest: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclasses.dataclass(frozen=True)
class GGUFInfo:
    """The few GGUF header facts the config blob needs."""

    architecture: str
    size_label: str
    file_type: str


@dataclasses.dataclass(frozen=True)
class ImportResult:
    manifest: bytes
    manifest_path: pathlib.Path
    config: Layer
    layers: tuple[Layer, ...]

    @property
    def model(self) -> Layer:
        return self.layers[0]

    @property
    def manifest_digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.manifest).hexdigest()


def go_json(obj: Any, *, sort_keys: bool = False) -> bytes:
    """`obj` as Go's json.Encoder writes it. Go sorts map keys, so pass sort_keys for maps."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"),
                      sort_keys=sort_keys, allow_nan=False)
    for char, escaped in _GO_ESCAPES:
        text = text.replace(char, escaped)
    return (text + "\n").encode("utf-8")


def host_architecture() -> str:
    machine = platform.machine().lower()
    return _GOARCH.get(machine, machine)


# --- the GGUF source ---------------------------------------------------------------------------


def _check_source(source: pathlib.Path) -> None:
    """Cheap checks before the (memory-mapped) parse, so common mistakes get a plain message."""
    try:
        # stat before open: opening a FIFO or a device could block or have side effects.
        if not stat.S_ISREG(source.stat().st_mode):
            raise NotAGGUF(f"{source} is not a regular file")
        with open(source, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        err = ImportFailed(f"cannot read {source}: {exc.strerror or exc}")
        err.errno = exc.errno or _errno.EIO
        raise err from None
    if magic != GGUF_MAGIC:
        raise NotAGGUF(f"{source} is not a GGUF file (starts with {magic!r}, want b'GGUF')")


def _field(reader, key: str) -> Any:
    field = reader.get_field(key)
    if field is None:
        return None
    try:
        return field.contents()
    except (ValueError, IndexError, TypeError, UnicodeDecodeError):
        return None


def read_gguf_info(source: os.PathLike | str) -> GGUFInfo:
    """Parse the GGUF header and metadata; raise NotAGGUF for anything that is not a usable GGUF."""
    import gguf  # imported here: numpy and gguf are only needed by import

    source = pathlib.Path(source)
    _check_source(source)
    try:
        reader = gguf.GGUFReader(source)
    except Exception as exc:  # the reader raises many kinds on truncated or corrupt headers
        raise NotAGGUF(f"{source} has an unreadable GGUF header: {exc}") from None
    try:
        arch = _field(reader, "general.architecture")
        size_label = _field(reader, "general.size_label")
        file_type = _field(reader, "general.file_type")
    finally:
        del reader  # drop the memory map now rather than at some later collection
    if not isinstance(arch, str) or not arch:
        raise NotAGGUF(f"{source} has no general.architecture, so no runtime can load it")
    return GGUFInfo(
        architecture=arch,
        size_label=size_label if isinstance(size_label, str) else "",
        file_type=FILE_TYPE_NAMES.get(file_type, "") if isinstance(file_type, int) else "",
    )


# --- blobs -------------------------------------------------------------------------------------


def _copy_hashed(source: pathlib.Path, blobs: pathlib.Path) -> tuple[pathlib.Path, str, int]:
    """Copy `source` to a durable temp file in `blobs/`, hashing the same bytes on the way."""
    fd, tmp = tempfile.mkstemp(dir=blobs, prefix=".tmp-", suffix="-import")
    hasher, size = hashlib.sha256(), 0
    try:
        buf = bytearray(COPY_CHUNK)
        view = memoryview(buf)
        with open(source, "rb", buffering=0) as src, os.fdopen(fd, "wb") as dst:
            while n := src.readinto(buf):
                hasher.update(view[:n])
                dst.write(view[:n])
                size += n
            dst.flush()
            os.fsync(dst.fileno())
        os.chmod(tmp, 0o644)
    except BaseException:
        _unlink_quietly(pathlib.Path(tmp))
        raise
    return pathlib.Path(tmp), "sha256:" + hasher.hexdigest(), size


def _unlink_quietly(path: pathlib.Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def put_file_blob(models: ModelsDir, source: pathlib.Path, media_type: str) -> Layer:
    """Store a file as a blob. An existing blob of that digest and size is kept as it is."""
    tmp, digest, size = _copy_hashed(source, models.blobs)
    try:
        if models.has_blob(digest, size):
            tmp.unlink()
        else:
            os.replace(tmp, models.blob_path(digest))
            fsync_dir(models.blobs)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return Layer(media_type, digest, size)


def put_bytes_blob(models: ModelsDir, data: bytes, media_type: str) -> Layer:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    if not models.has_blob(digest, len(data)):
        atomic_write(models.blob_path(digest), data)
    return Layer(media_type, digest, len(data))


# --- layers and the manifest -------------------------------------------------------------------


def _text_layers(
    template: str | None,
    system: str | None,
    params: dict | None,
    messages: list | None,
    license: str | Sequence[str] | None,
) -> list[tuple[str, bytes]]:
    """Encode every text layer up front, so bad input fails before any blob is written.

    Empty values are skipped, as `ollama create` skips them.
    """
    out: list[tuple[str, bytes]] = []
    for media_type, text in ((TEMPLATE_MEDIA_TYPE, template), (SYSTEM_MEDIA_TYPE, system)):
        if text:
            out.append((media_type, _utf8(text, media_type)))
    if params:
        if not isinstance(params, dict):
            raise ImportFailed("params must be a JSON object (a dict)")
        out.append((PARAMS_MEDIA_TYPE, _json_layer(params, "params", sort_keys=True)))
    if messages:
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ImportFailed("messages must be a list of {role, content} objects")
        out.append((MESSAGES_MEDIA_TYPE, _json_layer(messages, "messages")))
    licenses = [license] if isinstance(license, str) else list(license or ())
    for text in licenses:
        if text:
            out.append((LICENSE_MEDIA_TYPE, _utf8(text, LICENSE_MEDIA_TYPE)))
    return out


def _utf8(text: str, media_type: str) -> bytes:
    if not isinstance(text, str):
        raise ImportFailed(f"{media_type.rsplit('.', 1)[-1]} must be text")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ImportFailed(f"{media_type.rsplit('.', 1)[-1]} is not valid text: {exc}") from None


def _json_layer(obj: Any, what: str, *, sort_keys: bool = False) -> bytes:
    try:
        return go_json(obj, sort_keys=sort_keys)
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
        raise ImportFailed(f"{what} cannot be written as JSON: {exc}") from None


def config_json(info: GGUFInfo, layers: Sequence[Layer]) -> bytes:
    """Ollama's ConfigV2, fields in its struct order (omitempty fields left out)."""
    return go_json({
        "model_format": "gguf",
        "model_family": info.architecture,
        "model_families": [info.architecture],
        "model_type": info.size_label,
        "file_type": info.file_type,
        "architecture": host_architecture(),
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer.digest for layer in layers]},
    })


def manifest_json(config: Layer, layers: Sequence[Layer]) -> bytes:
    return go_json({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": config.to_json(),
        "layers": [layer.to_json() for layer in layers],
    })


def import_gguf(
    source: os.PathLike | str,
    parts: ManifestParts,
    models: ModelsDir,
    *,
    template: str | None = None,
    system: str | None = None,
    params: dict | None = None,
    license: str | Sequence[str] | None = None,
    messages: list | None = None,
) -> ImportResult:
    """Make `parts` (host, namespace, model, tag) a model in `models` whose weights are `source`.

    Layers: the model first, then template, system, params, messages, license. Re-importing the
    same inputs gives the same manifest bytes and reuses the blobs already there.
    """
    source = pathlib.Path(source)
    if len(parts) != 4:
        raise ImportFailed("a model name needs four parts: host, namespace, model, tag")
    models.manifest_path(parts)  # validates every part before any I/O
    texts = _text_layers(template, system, params, messages, license)
    info = read_gguf_info(source)

    models.create()
    layers = [put_file_blob(models, source, MODEL_MEDIA_TYPE)]
    layers += [put_bytes_blob(models, data, media_type) for media_type, data in texts]
    config = put_bytes_blob(models, config_json(info, layers), CONFIG_MEDIA_TYPE)

    # Last: every blob it names is already durable.
    raw = manifest_json(config, layers)
    if models.read_manifest(parts) == raw:
        path = models.manifest_path(parts)  # unchanged: keep the file (and its mtime) as it is
    else:
        path = models.write_manifest(parts, raw)
    return ImportResult(manifest=raw, manifest_path=path, config=config, layers=tuple(layers))
