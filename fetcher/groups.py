"""Exception groups from nurseries, turned back into the one error a caller can act on."""

from __future__ import annotations

import contextlib

import trio


def _leaves(group: BaseExceptionGroup):
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


@contextlib.contextmanager
def first_error():
    """Re-raise the first real error inside a nursery's ExceptionGroup (KeyboardInterrupt
    first, Cancelled last), so callers see `NotFound`, not a group that wraps it. The group
    stays attached as the cause."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = list(_leaves(group))
        for kind in (KeyboardInterrupt, Exception, BaseException):
            for exc in leaves:
                if isinstance(exc, kind) and not isinstance(exc, trio.Cancelled):
                    raise exc from group
        raise
