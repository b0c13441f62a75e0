"""Registry errors, classified once: `temporary` errors are retried with backoff, the rest are
final. Transport exceptions from httpx are translated in one place (`client.map_transport_errors`)
and always chained."""

from __future__ import annotations

import email.utils
import errno as _errno
import json
import time

from modelfs.cache.errors import ModelfsError


class RegistryError(ModelfsError):
    """The registry answered something we cannot use."""

    status: int | None = None
    retry_after: float | None = None


class TemporaryError(RegistryError):
    """Worth retrying: connect errors, resets, stalls, 5xx, 429."""

    temporary = True
    errno = _errno.EIO


class RegistryUnreachable(TemporaryError):
    """No answer at all (connection refused, DNS, timeouts)."""


class NotFound(RegistryError):
    """404: unknown model, tag or blob."""

    errno = _errno.ENOENT


class Unauthorized(RegistryError):
    """401 after authenticating, or 403."""

    errno = _errno.EACCES


class ClientTooOld(RegistryError):
    """412: the registry refuses this client version."""


class BadManifest(RegistryError):
    """A manifest that is not JSON or not the shape Ollama's manifests have."""


class ProtocolViolation(RegistryError):
    """An answer that breaks the protocol and will not get better by asking again (an answer
    that is not HTTP, a status no server sends to a Range request, a blob of another size than
    the manifest says). Range answers a flaky edge gives are `BadRangeAnswer` instead."""


class BadRangeAnswer(TemporaryError):
    """An answer to a Range request that is not the range: a 200 with the whole body, a
    missing or different Content-Range, more bytes than asked for. CDN edges and caching
    proxies give these now and then (a 200 on a cache miss, a mixed-up cached range), and the
    next request is usually answered right, so it is retried. Its body is never used."""


class ShortBody(BadRangeAnswer):
    """A range answer with fewer bytes than asked for (retried: the next try may be whole)."""


def error_for_status(status: int, message: str, retry_after: float | None = None) -> RegistryError:
    """The error to raise for an HTTP status that is not a success."""
    if status == 404:
        cls = NotFound
    elif status in (401, 403):
        cls = Unauthorized
    elif status == 412:
        cls = ClientTooOld
    elif status == 429 or status >= 500 or status == 408:
        cls = TemporaryError
    else:
        cls = RegistryError
    exc = cls(message)
    exc.status = status
    exc.retry_after = retry_after
    return exc


def describe_error(method: str, url, status: int, body: bytes) -> str:
    """Docker-style `{"errors":[{"code","message"}]}` or `{"error": ...}` bodies, else raw text."""
    text = body[:300].decode("utf-8", "replace").strip()
    try:
        doc = json.loads(body)
        if isinstance(doc, dict):
            errs = doc.get("errors")
            if isinstance(errs, list) and errs and isinstance(errs[0], dict):
                text = f"{errs[0].get('code', '')}: {errs[0].get('message', '')}".strip(": ")
            elif isinstance(doc.get("error"), str):
                text = doc["error"]
    except ValueError:
        pass
    return f"{method} {url}: HTTP {status}" + (f" ({text})" if text else "")


def parse_retry_after(value: str) -> float | None:
    """Retry-After as seconds or as an HTTP date."""
    value = value.strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
