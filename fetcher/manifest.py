"""Manifests: parsed for their layers, kept byte for byte as served (protocol.md §2)."""

from __future__ import annotations

import dataclasses
import hashlib
import json

from modelfs.cache.digests import parse_digest
from modelfs.cache.errors import InvalidName

from .errors import BadManifest

MAX_MANIFEST_BYTES = 4 << 20
MANIFEST_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
OCI_MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"


@dataclasses.dataclass(frozen=True)
class Layer:
    media_type: str
    digest: str
    size: int


@dataclasses.dataclass(frozen=True)
class Manifest:
    raw: bytes
    config: Layer | None
    layers: tuple[Layer, ...]

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.raw).hexdigest()

    def blobs(self) -> list[Layer]:
        """Config first, then the layers; each digest once (two layers may share a blob)."""
        seen, out = set(), []
        for layer in ((self.config,) if self.config else ()) + self.layers:
            if layer.digest not in seen:
                seen.add(layer.digest)
                out.append(layer)
        return out


def _layer(obj, where: str) -> Layer:
    if not isinstance(obj, dict):
        raise BadManifest(f"manifest {where} is not an object")
    media_type, digest, size = obj.get("mediaType"), obj.get("digest"), obj.get("size")
    if not isinstance(media_type, str) or not media_type:
        raise BadManifest(f"manifest {where} has no mediaType")
    try:
        digest = parse_digest(digest)
    except InvalidName as exc:
        raise BadManifest(f"manifest {where}: {exc}") from None
    if type(size) is not int or size < 0:
        raise BadManifest(f"manifest {where} has an invalid size {size!r}")
    return Layer(media_type, digest, size)


def parse_manifest(raw: bytes) -> Manifest:
    if len(raw) > MAX_MANIFEST_BYTES:
        raise BadManifest(f"manifest is {len(raw)} bytes, more than {MAX_MANIFEST_BYTES}")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadManifest(f"manifest is not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise BadManifest("manifest is not a JSON object")
    if doc.get("schemaVersion", 2) != 2:
        raise BadManifest(f"unsupported manifest schemaVersion {doc.get('schemaVersion')!r}")
    layers = doc.get("layers")
    if not isinstance(layers, list) or not layers:
        raise BadManifest("manifest has no layers")
    config = doc.get("config")
    return Manifest(
        raw=raw,
        config=_layer(config, "config") if config is not None else None,
        layers=tuple(_layer(obj, f"layer {i}") for i, obj in enumerate(layers)),
    )
