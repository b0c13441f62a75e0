"""Retries with jittered exponential backoff, for temporary failures only (errors.py says which
are). The one policy for chunks: a pull and a mount both fetch them through `fetch.fetch_chunk`,
so a flaky source is retried the same way under both."""

from __future__ import annotations

import copy
import dataclasses
import logging
import random
from typing import Awaitable, Callable, TypeVar

import trio

from modelfs.cache.errors import ChunkDigestMismatch, ModelfsError

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    base_delay: float = 0.2
    max_delay: float = 5.0
    max_retry_after: float = 30.0  # a Retry-After longer than this is capped, not obeyed

    def delay(self, attempt: int, retry_after: float | None) -> float:
        delay = min(self.max_delay, self.base_delay * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_retry_after))
        return delay


def is_retryable(exc: BaseException) -> bool:
    # A chunk that fails its digest may have been damaged in transit: ask again, a few times.
    return isinstance(exc, ModelfsError) and (exc.temporary or isinstance(exc, ChunkDigestMismatch))


async def retrying(fn: Callable[[], Awaitable[T]], policy: RetryPolicy, what: str,
                   on_retry: Callable[[BaseException], None] | None = None) -> T:
    """Run `fn` until it succeeds, a final error comes, or the attempts run out. `on_retry`
    is told of each failure that is tried again (statistics)."""
    attempt = 1
    kinds: list[type] = []
    while True:
        try:
            return await fn()
        except ModelfsError as exc:
            if not is_retryable(exc):
                raise
            kinds.append(type(exc))
            if attempt >= policy.attempts:
                final = copy.copy(exc)  # same class and status, a message that says why
                final.args = (f"{exc} ({_how_often(kinds)})",)
                raise final from exc
            if on_retry is not None:
                on_retry(exc)
            delay = policy.delay(attempt, getattr(exc, "retry_after", None))
            level = logging.INFO if attempt == 1 else logging.WARNING
            log.log(level, "%s failed (%s); retry %d/%d in %.2fs",
                    what, exc, attempt, policy.attempts - 1, delay)
            attempt += 1
            await trio.sleep(delay)


def _how_often(kinds: list[type]) -> str:
    """Whether the source kept failing this way, or this was only the last of mixed failures."""
    alike = sum(kind is kinds[-1] for kind in kinds)
    if alike == len(kinds):
        return f"gave up after {len(kinds)} attempts, each failing like this"
    return f"gave up after {len(kinds)} attempts, {alike} of them failing like this"
