"""The check of an answer to a Range request, shared by both HTTP stacks (the data plane in
rangeget.py and httpx in client.py), so that a pull and a mount classify an answer the same way,
and the one stall deadline they both keep.

Classification (errors.py): what flaky CDN edges and caching proxies do now and then (a 200
with the whole body on a miss, a missing or shifted Content-Range, a body longer or shorter than
the range) is `BadRangeAnswer`, temporary: asked again, with backoff, a few times. What no
retry can fix is `ProtocolViolation`, final: a status no server sends to a Range request, or a
blob whose size is not the one the manifest gives. Neither kind of answer's body is ever used.
"""

from __future__ import annotations

import re
from typing import Mapping

from .errors import BadRangeAnswer, ProtocolViolation, ShortBody, TemporaryError

# Slower than this on average, a chunk transfer counts as stalled (and is retried).
MIN_TRANSFER_RATE = 256 << 10

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def stall_budget(read_timeout: float, length: int, min_rate: int = MIN_TRANSFER_RATE) -> float:
    """Seconds a whole range answer of `length` bytes may take: the first byte within the read
    timeout, then `min_rate` bytes a second. A server that trickles a byte now and then keeps
    each wait short, so only a deadline on the whole answer catches it."""
    return read_timeout + length / min_rate


def stalled(url, start: int, end: int, budget: float,
            min_rate: int = MIN_TRANSFER_RATE) -> TemporaryError:
    return TemporaryError(f"{url}: range {start}-{end - 1} stalled (no answer at "
                          f"{min_rate >> 10} KiB/s within {budget:.0f}s)")


def check_range_answer(url, status: int, headers: Mapping[str, str], start: int, end: int,
                       blob_size: int | None) -> None:
    """Raise unless a `status` with `headers` (lower-case names) is the answer to
    `Range: bytes=start-(end-1)` of a blob of `blob_size` bytes (None: not known). Error
    statuses, redirects and auth challenges are each stack's own business, before this."""
    asked = f"bytes={start}-{end - 1}"
    if status == 200:
        # an edge that missed its cache streams the whole object from the origin
        raise BadRangeAnswer(f"{url}: server ignored Range {asked} (answered 200 with the "
                             f"whole body); refusing to use it")
    if status != 206:
        # 204, 1xx, an unfollowable 3xx: not something that comes right on the next try
        raise ProtocolViolation(f"{url}: unexpected status {status} to Range {asked}")
    value = headers.get("content-range", "")
    m = _CONTENT_RANGE.fullmatch(value.strip())
    if m is None:
        raise BadRangeAnswer(f"{url}: 206 without a valid Content-Range ({value[:60]!r}) "
                             f"to Range {asked}")
    first, last, total = int(m.group(1)), int(m.group(2)), m.group(3)
    if (first, last + 1) != (start, end):
        # a cache that mixed up its stored ranges: another request may hit another copy
        raise BadRangeAnswer(f"{url}: asked for bytes {start}-{end - 1}, got {first}-{last}")
    if blob_size is not None and total != "*" and int(total) != blob_size:
        # a claim about the blob, not about this answer: the content-addressed blob behind
        # the URL has another size than the manifest says, and asking again will not change it
        raise ProtocolViolation(f"{url}: blob is {total} bytes, the manifest says {blob_size}")
    declared = headers.get("content-length", "")
    if declared.isdigit():
        check_length(url, start, end, int(declared), "Content-Length")


def check_length(url, start: int, end: int, got: int, what: str = "body") -> None:
    """A body (or its declared length) of `got` bytes for the range [start, end)."""
    length = end - start
    if got > length:
        raise BadRangeAnswer(f"{url}: more than the {length} bytes asked for by Range "
                             f"bytes={start}-{end - 1} ({what}: {got})")
    if got < length:
        raise ShortBody(f"{url}: range {start}-{end - 1} gave {got} of {length} bytes")
