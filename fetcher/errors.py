"""Registry errors, classified once: `temporary` errors are retried with backoff, the rest are
final. Transport exceptions from httpx are translated in one place (`client.map_transport_errors`)
and always chained."""

from __future__ import annotations

import errno as _errno

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
    """An answer that breaks the protocol and will not get better by asking again
    (a 200 with the whole blob in answer to a Range request, a wrong Content-Range)."""


class ShortBody(TemporaryError):
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
