"""sha256 digests as registries write them (`sha256:<hex>`) and as the store names files
(`sha256-<hex>`). Everything that turns a digest into a path goes through `parse_digest`, so a
digest from the network can never carry a path separator or `..`."""

from __future__ import annotations

import re

from .errors import InvalidName

_DIGEST_RE = re.compile(r"sha256[:-]([0-9a-fA-F]{64})")


def parse_digest(text: str) -> str:
    """Return the canonical `sha256:<lowercase hex>` form, or raise InvalidName."""
    if not isinstance(text, str):
        raise InvalidName(f"invalid digest: {text!r}")
    m = _DIGEST_RE.fullmatch(text)
    if m is None:
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise InvalidName(f"invalid digest: {shown!r} (want sha256:<64 hex digits>)")
    return "sha256:" + m.group(1).lower()


def digest_hex(digest: str) -> str:
    return parse_digest(digest)[len("sha256:"):]


def blob_filename(digest: str) -> str:
    """The file name Ollama uses for a blob: `sha256-<hex>`."""
    return "sha256-" + digest_hex(digest)

