"""An ASGI middleware around the real registry app: counts every request and injects faults.

Rules match on method and a path substring (and optionally the Range header) and apply an
action a limited number of times (`times=None`: always). Everything not matched goes to the real
app unchanged.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import re
from typing import Awaitable, Callable

import trio


@dataclasses.dataclass
class Seen:
    method: str
    path: str
    range: str | None
    status: int | None = None
    query: str = ""
    user_agent: str | None = None


Action = Callable[["Faults", dict, Callable, Callable], Awaitable[None]]


@dataclasses.dataclass
class Rule:
    method: str
    path_contains: str
    action: Action
    times: int | None = None
    range: str | None = None

    def matches(self, seen: Seen) -> bool:
        return (self.times is None or self.times > 0) and seen.method == self.method and \
            self.path_contains in seen.path and (self.range is None or seen.range == self.range)


class Faults:
    def __init__(self, app):
        self.app = app
        self.seen: list[Seen] = []
        self.rules: list[Rule] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.ranges_in_flight = 0
        self.max_ranges_in_flight = 0
        self.delay = 0.0  # seconds added before each blob range answer

    def add(self, method: str, path_contains: str, action: Action, times: int | None = None,
            range: str | None = None) -> Rule:
        rule = Rule(method, path_contains, action, times, range)
        self.rules.append(rule)
        return rule

    def ranges(self, path_contains: str = "/blobs/") -> list[str]:
        return [s.range for s in self.seen if s.method == "GET" and path_contains in s.path
                and s.range]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        seen = Seen(scope["method"], scope["raw_path"].decode(), headers.get("range"),
                    query=scope.get("query_string", b"").decode(),
                    user_agent=headers.get("user-agent"))
        self.seen.append(seen)

        async def recording_send(message):
            if message["type"] == "http.response.start":
                seen.status = message["status"]
            await send(message)

        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.ranges_in_flight += bool(seen.range)
        self.max_ranges_in_flight = max(self.max_ranges_in_flight, self.ranges_in_flight)
        try:
            if self.delay and seen.range:
                await trio.sleep(self.delay)
            for rule in self.rules:
                if rule.matches(seen):
                    if rule.times is not None:
                        rule.times -= 1
                    return await rule.action(self, scope, receive, recording_send)
            await self.app(scope, receive, recording_send)
        finally:
            self.in_flight -= 1
            self.ranges_in_flight -= bool(seen.range)


# -- actions ----------------------------------------------------------------------------------

def reply(status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> Action:
    async def action(faults, scope, receive, send):
        hdrs = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
        hdrs.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": hdrs})
        await send({"type": "http.response.body", "body": body})
    return action


def answer() -> Action:
    """Pass the request on to the app unchanged: with `times`, a rule of it lets that many
    requests through before the rules after it take over."""
    async def action(faults, scope, receive, send):
        await faults.app(scope, receive, send)
    return action


class Hold:
    """An action that never answers: the request is held for as long as its client stays
    connected (then dropped). `held`: the requests it holds right now."""

    def __init__(self):
        self.held = 0

    async def __call__(self, faults, scope, receive, send):
        self.held += 1
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
        finally:
            self.held -= 1


def without_range() -> Action:
    """Pass the request on with its Range header removed: the app answers 200, whole body."""
    async def action(faults, scope, receive, send):
        scope = dict(scope, headers=[(k, v) for k, v in scope["headers"]
                                     if k.lower() != b"range"])
        await faults.app(scope, receive, send)
    return action


def corrupt_body() -> Action:
    """Flip one byte of the body (the headers stay honest)."""
    async def action(faults, scope, receive, send):
        done = False

        async def flipping(message):
            nonlocal done
            if message["type"] == "http.response.body" and message.get("body") and not done:
                body = bytearray(message["body"])
                body[len(body) // 2] ^= 0xFF
                message = dict(message, body=bytes(body))
                done = True
            await send(message)
        await faults.app(scope, receive, flipping)
    return action


def short_body(missing: int = 10) -> Action:
    """A complete, well-framed answer that is `missing` bytes short of the range."""
    async def action(faults, scope, receive, send):
        state = {"left": None}

        async def trimming(message):
            if message["type"] == "http.response.start":
                hdrs = []
                for k, v in message["headers"]:
                    if k.lower() == b"content-length":
                        state["left"] = int(v) - missing
                        v = str(state["left"]).encode()
                    hdrs.append((k, v))
                message = dict(message, headers=hdrs)
            elif message["type"] == "http.response.body" and state["left"] is not None:
                body = message.get("body", b"")[:state["left"]]
                state["left"] -= len(body)
                message = dict(message, body=body)
            await send(message)
        await faults.app(scope, receive, trimming)
    return action


def wrong_content_range(shift: int = 1) -> Action:
    """The app's answer with its Content-Range moved `shift` bytes on and the body unchanged
    (a cache that mixed up the ranges it keeps)."""
    async def action(faults, scope, receive, send):
        async def shifting(message):
            if message["type"] == "http.response.start":
                hdrs = []
                for k, v in message["headers"]:
                    if k.lower() == b"content-range":
                        first, last, total = re.fullmatch(rb"bytes (\d+)-(\d+)/(\d+)",
                                                          v).groups()
                        v = f"bytes {int(first) + shift}-{int(last) + shift}/{int(total)}" \
                            .encode()
                    hdrs.append((k, v))
                message = dict(message, headers=hdrs)
            await send(message)
        await faults.app(scope, receive, shifting)
    return action


class FlakyEdge:
    """A CDN edge in front of the app: every `every`-th range request reaching it is a cache
    miss, answered 200 with the whole blob (`without_range`); a range it missed on is a hit
    from then on. `missed` lists the (path, range) pairs it answered 200."""

    def __init__(self, every: int = 3):
        self.every, self.count = every, 0
        self.missed: list[tuple[str, str]] = []

    async def __call__(self, faults, scope, receive, send):
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        key = (scope["raw_path"].decode(), headers.get("range"))
        self.count += 1
        if self.count % self.every == 0 and key not in self.missed:
            self.missed.append(key)
            return await without_range()(faults, scope, receive, send)
        await faults.app(scope, receive, send)


class FlakySource:
    """Everything a flaky edge does to the blob ranges of one registry: `FlakyEdge` for all
    blobs, and once each a short body and a shifted Content-Range for two chunks of the blob
    `digest` (given as Range header values)."""

    def __init__(self, faults: Faults, digest: str, short: str, shifted: str, every: int = 3):
        self.faults, self.digest = faults, digest
        self.short = faults.add("GET", digest, short_body(), times=1, range=short)
        self.shifted = faults.add("GET", digest, wrong_content_range(), times=1, range=shifted)
        self.edge = FlakyEdge(every)
        faults.add("GET", "/blobs/", self.edge)

    def asked(self) -> collections.Counter:
        """How often each (path, range) was asked for."""
        return collections.Counter((s.path, s.range) for s in self.faults.seen
                                   if s.method == "GET" and "/blobs/" in s.path and s.range)

    def check_every_bad_answer_was_asked_again(self) -> None:
        """Each range was asked for once, and once more for each bad answer it got: the
        bad answers were retried, nothing else was."""
        asked = self.asked()
        path = next(p for p, _ in asked if self.digest in p)
        bad = collections.Counter(self.edge.missed)
        bad[(path, self.short.range)] += 1
        bad[(path, self.shifted.range)] += 1
        assert self.short.times == 0 and self.shifted.times == 0, asked  # both came into play
        assert len(self.edge.missed) >= 3, self.edge.missed  # the edge did miss, now and then
        assert asked == collections.Counter({key: 1 + bad[key] for key in asked})
        assert all(key in asked for key in bad)


class _Reset(Exception):
    pass


def reset_mid_body() -> Action:
    """Send the headers and part of the body, then drop the connection."""
    async def action(faults, scope, receive, send):
        async def breaking(message):
            if message["type"] == "http.response.body" and message.get("body"):
                body = message["body"]
                await send(dict(message, body=body[:len(body) // 2], more_body=True))
                raise _Reset("connection reset by the test")
            await send(message)
        try:
            await faults.app(scope, receive, breaking)
        except _Reset:
            raise
    return action


def serve_bytes(data: bytes, chunk_size: int) -> tuple[Action, Action]:
    """(chunksums action, blob action) serving `data` in place of the real blob, with a chunk
    list that is consistent with `data` (for the seal test)."""
    lines = []
    for start in range(0, len(data), chunk_size):
        piece = data[start:start + chunk_size]
        lines.append(f"sha256:{hashlib.sha256(piece).hexdigest()} {start}-{start + len(piece) - 1}")
    chunksums_body = ("\n".join(lines) + "\n").encode()

    async def chunksums(faults, scope, receive, send):
        await reply(200, chunksums_body)(faults, scope, receive, send)

    async def blob(faults, scope, receive, send):
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        first, last = headers["range"].removeprefix("bytes=").split("-")
        first, last = int(first), int(last)
        await reply(206, data[first:last + 1],
                    {"content-range": f"bytes {first}-{last}/{len(data)}"})(
            faults, scope, receive, send)

    return chunksums, blob


def require_auth(expected: str, challenge: str) -> Action:
    """401 with `challenge` unless the request carries `Authorization: <expected>`."""
    async def action(faults, scope, receive, send):
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        if headers.get("authorization") == expected:
            return await faults.app(scope, receive, send)
        await reply(401, b'{"errors":[{"code":"UNAUTHORIZED"}]}',
                    {"www-authenticate": challenge})(faults, scope, receive, send)
    return action


def throttled(rate: int, stall_after: int | None = None, step: int = 64 << 10) -> Action:
    """The real answer with its body sent in `step` pieces at `rate` bytes per second (per
    request); with `stall_after`, nothing more once that many body bytes went out (the
    connection stays open, as a stalled server's does)."""
    async def action(faults, scope, receive, send):
        sent = 0

        async def slow(message):
            nonlocal sent
            if message["type"] != "http.response.body" or not message.get("body"):
                return await send(message)
            body = message["body"]
            for pos in range(0, len(body), step):
                piece = body[pos:pos + step]
                if stall_after is not None and sent + len(piece) > stall_after:
                    await trio.sleep_forever()
                await send({"type": "http.response.body", "body": piece, "more_body": True})
                sent += len(piece)
                await trio.sleep(len(piece) / rate)
            if not message.get("more_body", False):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        await faults.app(scope, receive, slow)
    return action
