"""What a request to the registry asks for, parsed from its raw bytes before any I/O: the
route (`parse_path`: path safety, invariant 11, see fetcher/server.py), the byte range
(`parse_range`), the authority the client used, and the refusals (`HttpError`, with a
Docker-style error body). Pure functions of the request: no state, no I/O.
"""

from __future__ import annotations

import dataclasses
import json
import re
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

from modelfs.cache.digests import parse_digest
from modelfs.cache.errors import InvalidName
from modelfs.fetcher.names import validate_part

_ENDPOINTS = {"manifests": "manifest", "blobs": "blob", "chunksums": "chunksums"}

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Headers = list[tuple[str, str]]


class HttpError(Exception):
    """A refusal with a Docker-style error body."""

    def __init__(self, status: int, code: str, message: str, headers: Headers = ()):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, list(headers)

    def body(self) -> bytes:
        return json.dumps({"errors": [{"code": self.code, "message": self.message}]}).encode()


# --- request target ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Route:
    kind: str  # "base" | "manifest" | "blob" | "chunksums"
    namespace: str = ""
    model: str = ""
    ref: str = ""  # the tag, or the canonical digest


_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")


def _refuse_path(why: str) -> HttpError:
    return HttpError(400, "NAME_INVALID", f"invalid request path: {why}")


def _is_plain(data: bytes) -> bool:
    """Printable ASCII without space or backslash (a separator on some systems)."""
    return all(0x21 <= b <= 0x7E and b != 0x5C for b in data)


def _decode_segment(segment: bytes) -> str:
    if _BAD_ESCAPE.search(segment):
        raise _refuse_path("malformed percent-escape")
    decoded = urllib.parse.unquote_to_bytes(segment)
    if not decoded:
        raise _refuse_path("empty path component")
    if not _is_plain(decoded) or b"/" in decoded:
        raise _refuse_path("encoded separator or control character")
    if decoded in (b".", b".."):
        raise _refuse_path("'.' or '..' component")
    return decoded.decode("ascii")


def _named_route(kind: str, namespace: str, model: str, ref: str) -> Route:
    try:
        validate_part("namespace", namespace)
        validate_part("model", model)
        if kind == "manifest":
            validate_part("tag", ref)
    except InvalidName as exc:
        raise HttpError(400, "NAME_INVALID", str(exc)) from None
    if kind != "manifest":
        try:
            ref = parse_digest(ref)
        except InvalidName as exc:
            raise HttpError(400, "DIGEST_INVALID", str(exc)) from None
    return Route(kind, namespace, model, ref)


def parse_path(raw_path: bytes) -> Route:
    """The route for a raw request path, or HttpError (400 unsafe, 404 unknown)."""
    if not raw_path.startswith(b"/"):
        raise _refuse_path("not an absolute path")
    if not _is_plain(raw_path):
        raise _refuse_path("control, non-ASCII or backslash character")
    if raw_path in (b"/v2", b"/v2/"):
        return Route("base")
    # Every component is checked before routing, so a refusal never depends on the route.
    segments = [_decode_segment(s) for s in raw_path[1:].split(b"/")]
    if len(segments) == 5 and segments[0] == "v2" and segments[3] in _ENDPOINTS:
        return _named_route(_ENDPOINTS[segments[3]], segments[1], segments[2], segments[4])
    if segments[0] == "v2":
        raise HttpError(404, "NAME_UNKNOWN", "repository name not known to registry")
    raise HttpError(404, "UNSUPPORTED", "no such endpoint")


# --- Range ------------------------------------------------------------------------------------

_RANGE_SPEC = re.compile(r"\s*([0-9]{0,19})\s*-\s*([0-9]{0,19})\s*", re.ASCII)


def _unsatisfiable(size: int, why: str) -> HttpError:
    return HttpError(416, "RANGE_INVALID", why, [("Content-Range", f"bytes */{size}")])


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end exclusive) for a single byte range, None for the whole blob.

    Malformed → 400 RANGE_INVALID; several ranges or nothing satisfiable → 416."""
    if header is None:
        return None
    unit, sep, spec = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        raise HttpError(400, "RANGE_INVALID", f"malformed Range header {header[:80]!r}")
    if "," in spec:
        raise _unsatisfiable(size, "multiple ranges are not supported")
    m = _RANGE_SPEC.fullmatch(spec)
    if m is None or not (m.group(1) or m.group(2)):
        raise HttpError(400, "RANGE_INVALID", f"malformed Range header {header[:80]!r}")
    first, last = m.groups()
    if not first:  # suffix: the last n bytes
        n = int(last)
        if n == 0 or size == 0:
            raise _unsatisfiable(size, "empty suffix range")
        return max(0, size - n), size
    start = int(first)
    if last and int(last) < start:
        raise HttpError(400, "RANGE_INVALID", f"reversed Range {header[:80]!r}")
    if start >= size:
        raise _unsatisfiable(size, f"range starts at {start}, blob has {size} bytes")
    return start, size if not last else min(int(last) + 1, size)


# --- scope helpers ----------------------------------------------------------------------------


def header_values(scope: Scope, name: bytes) -> list[str]:
    return [v.decode("latin-1") for k, v in scope.get("headers", ()) if k.lower() == name]


def range_header(scope: Scope) -> str | None:
    values = header_values(scope, b"range")
    # Several Range headers are several ranges: joined, they get the multi-range answer.
    return ",".join(values) if values else None


_AUTHORITY = re.compile(r"[A-Za-z0-9._-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")


def _authority(scope: Scope) -> str:
    """Host[:port] the client used, checked before it is reflected into a header."""
    hosts = header_values(scope, b"host")
    if len(hosts) == 1 and _AUTHORITY.fullmatch(hosts[0]):
        return hosts[0]
    server = scope.get("server")
    if not server:
        return "localhost"
    host, port = server[0], server[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def blob_url(scope: Scope, route: Route) -> str:
    scheme = scope.get("scheme") if scope.get("scheme") in ("http", "https") else "http"
    return f"{scheme}://{_authority(scope)}/v2/{route.namespace}/{route.model}/blobs/{route.ref}"


def printable(value: str | bytes, limit: int = 1024) -> str:
    data = value.encode("latin-1", "replace") if isinstance(value, str) else value
    text = "".join(chr(b) if 0x21 <= b <= 0x7E and b not in b'"\\' else f"\\x{b:02x}"
                   for b in data[:limit])
    return text + ("..." if len(data) > limit else "")


def raw_path(scope: Scope) -> bytes:
    raw = scope.get("raw_path")
    # raw_path is optional in ASGI; the decoded path is still validated component by component.
    return raw if raw is not None else scope.get("path", "").encode("utf-8", "surrogateescape")
