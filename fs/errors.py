"""The one place where errors become errno values for the kernel (invariant 6).

Every filesystem operation is wrapped by `fuse_errors`: FUSEError passes through, modelfs errors
carry their own errno, a read past its deadline is EIO, and anything unexpected is logged with
its traceback and answered with EIO. Nothing else may escape a handler: pyfuse3 would take the
whole mount down with it.
"""

from __future__ import annotations

import errno
import functools
import logging

import pyfuse3
import trio

from modelfs.cache.errors import ModelfsError

log = logging.getLogger("modelfs.fs")


def errno_for(exc: BaseException) -> int:
    if isinstance(exc, pyfuse3.FUSEError):
        return exc.errno
    if isinstance(exc, ModelfsError):
        return exc.errno
    if isinstance(exc, trio.TooSlowError):
        return errno.EIO
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO


def fuse_errors(method):
    """Decorator for an async Operations method: every exception becomes a FUSEError."""
    name = method.__name__

    @functools.wraps(method)
    async def wrapper(*args):
        try:
            return await method(*args)
        except pyfuse3.FUSEError:
            raise
        except ModelfsError as exc:
            code = exc.errno
            level = logging.DEBUG if code == errno.ENOENT else logging.WARNING
            log.log(level, "%s: %s -> %s", name, exc, errno.errorcode.get(code, code))
            raise pyfuse3.FUSEError(code) from None
        except trio.TooSlowError:
            log.warning("%s: not served within the read deadline -> EIO", name)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception as exc:
            log.exception("%s: unexpected error -> EIO", name)
            raise pyfuse3.FUSEError(errno_for(exc) if isinstance(exc, OSError)
                                    else errno.EIO) from None

    return wrapper
