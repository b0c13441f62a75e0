"""The error tree shared by every layer (cache is the bottom layer, so it lives here).

Each error carries the errno a FUSE handler should answer with and whether retrying the same
operation may succeed (`temporary`). Messages are one line, meant for users.
"""

from __future__ import annotations

import errno as _errno


class ModelfsError(Exception):
    """Base of every error modelfs raises on purpose."""

    errno: int = _errno.EIO
    temporary: bool = False


class InvalidName(ModelfsError):
    """A model name, digest or path component that fails validation (checked before any I/O)."""

    errno = _errno.ENOENT


class IntegrityError(ModelfsError):
    """Bytes that do not match the digest they were promised to have."""


class ChunkDigestMismatch(IntegrityError):
    """A chunk whose sha256 differs from its chunk digest. Never written, never served."""


class SealMismatch(IntegrityError):
    """Every chunk arrived, but the whole blob does not hash to the manifest digest."""


class LandedChunksBad(IntegrityError):
    """A blob checked as a whole (a pull) did not match its digest, and these of its chunks
    did not match their own digests: they were dropped and must be fetched again."""

    temporary = True

    def __init__(self, message: str, indexes: list[int]):
        super().__init__(message)
        self.indexes = indexes


class SealInterrupted(ModelfsError):
    """A chunk of the blob went while it was being sealed; it is sealed once complete again."""

    temporary = True


class CacheFull(ModelfsError):
    """No room for a chunk, even after evicting what could be evicted."""
