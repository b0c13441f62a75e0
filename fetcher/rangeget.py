"""Range GETs received straight into chunk buffers: the fetcher's data plane.

Why not httpx for these: profiled on a cold read of 1 GiB, httpx/httpcore/h11 copied every byte
two or three times in user space (into h11's receive buffer, out of it, into the response
pieces), allocated a fresh MiB object per receive and made a trip through the trio loop for
each, while the cache wrote through the page cache. Here a worker thread receives with
`recv_into` into the chunk's own buffer, the cache hashes each MiB while it is hot, and nothing
is copied or allocated: the same loopback transfer took about half the CPU.

Scope: HTTP/1.1 over TCP or TLS, keep-alive, one request per connection at a time. A response
taken here is a `206` with a Content-Length and no Transfer-Encoding that passes the range check
both stacks share (answer.py); a failure status (other than 401) is turned into the same error
the client raises. Redirects are followed here (without credentials to another origin) and
remembered for a few minutes, so a registry that sends blobs to a CDN costs one extra request per
blob, not per chunk. Anything that needs the full client (an auth challenge, chunked framing) is
`NeedsFullClient`: nothing was taken into the buffer, and the caller asks again through httpx.
So does a URL that a proxy from the environment applies to (`usable`).

Concurrency contract: `get_into` blocks; it runs in a worker thread. The idle connections are
shared under a threading.Lock, a connection is used by one thread at a time. `Abort.abort()` may
be called from any thread (the trio side, when the fetch is cancelled): a blocked `get_into`
then fails at once. Every wait on the network has a timeout, and the whole answer a deadline
(`answer.stall_budget`), so a trickling server cannot hold a thread forever.
"""

from __future__ import annotations

import re
import select
import socket
import ssl
import threading
import time
import urllib.parse
import urllib.request

from .answer import check_length, check_range_answer, stall_budget, stalled
from .errors import (ProtocolViolation, RegistryError, RegistryUnreachable, TemporaryError,
                     describe_error, error_for_status, parse_retry_after)

MAX_HEAD = 64 << 10  # status line and headers
MAX_REDIRECTS = 5
REDIRECT_MEMORY = 300.0  # seconds a redirect target (a CDN's signed URL) is used again
REDIRECT_MEMOS = 256
MAX_ERROR_BODY = 64 << 10  # an error answer's body is read (for its message) up to this
HASH_STEP = 1 << 20  # the receiver hashes this much at a time, while it is in the CPU cache


class _Redirect(Exception):
    def __init__(self, location: str):
        super().__init__(location)
        self.location = location


class NeedsFullClient(Exception):
    """The answer needs httpx (redirect, 401, chunked framing...): nothing was consumed."""


class Aborted(TemporaryError):
    """The fetch was cancelled from outside while it waited on the network."""


class Abort:
    """Lets another thread break a transfer off (by shutting its socket down)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self.aborted = False

    def attach(self, sock: socket.socket) -> None:
        with self._lock:
            if self.aborted:
                sock.close()
                raise Aborted("fetch cancelled")
            self._sock = sock

    def detach(self) -> None:
        with self._lock:
            self._sock = None

    def abort(self) -> None:
        with self._lock:
            self.aborted = True
            if self._sock is not None:
                try:
                    # the plain socket's shutdown, also under TLS: SSLSocket.shutdown would
                    # change the TLS state under the thread that is using it
                    socket.socket.shutdown(self._sock, socket.SHUT_RDWR)
                except OSError:
                    pass


def _origin(url: str) -> tuple:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, parts.hostname, parts.port


class _Stale(Exception):
    """A kept-alive connection the server had closed: nothing was sent back at all."""


class _Conn:
    __slots__ = ("sock", "key", "reused")

    def __init__(self, sock: socket.socket, key: tuple):
        self.sock, self.key, self.reused = sock, key, False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class _Head:
    __slots__ = ("version", "status", "headers", "rest")

    def __init__(self, version: str, status: int, headers: dict[str, str], rest: bytes):
        self.version, self.status, self.headers, self.rest = version, status, headers, rest


class RangeGetter:
    def __init__(self, *, user_agent: str, connect_timeout: float, read_timeout: float,
                 min_rate: int, max_idle: int = 16, ssl_context: ssl.SSLContext | None = None):
        self._user_agent = user_agent
        self._connect_timeout, self._read_timeout = connect_timeout, read_timeout
        self._min_rate = min_rate
        self._max_idle = max_idle
        self._ssl = ssl_context
        self._idle: dict[tuple, list[_Conn]] = {}
        self._redirects: dict[str, tuple[str, float]] = {}  # url -> (target, until)
        self._lock = threading.Lock()
        self.requests = 0  # statistics

    def usable(self, url: str) -> bool:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.username:
            return False
        proxies = urllib.request.getproxies()
        return not (parts.scheme in proxies or "all" in proxies) or bool(
            urllib.request.proxy_bypass(parts.hostname))

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()

    # -- one range ------------------------------------------------------------------------

    def get_into(self, url: str, start: int, end: int, blob_size: int | None,
                 headers: dict[str, str], receiver, abort: Abort | None = None) -> None:
        """Receive bytes [start, end) of `url` into `receiver.view[:end - start]` (blocking).

        Redirects are followed (a registry sends blob requests to its CDN) and their target is
        remembered for a while, so the next chunks go straight there; a remembered target that
        fails is forgotten and the registry asked again. Credentials go to the registry's
        origin only, never to where it redirects."""
        target, remembered = self._remembered(url), True
        if target is None:
            target, remembered = url, False
        for _ in range(MAX_REDIRECTS + 1):
            if target != url and not self.usable(target):
                raise NeedsFullClient(f"{target}: a redirect the full client must follow")
            send = headers if _origin(target) == _origin(url) else {}
            try:
                self._get_one(target, start, end, blob_size, send, receiver, abort)
            except _Redirect as redirect:
                receiver.reset()
                target, remembered = redirect.location, False
                continue
            except Aborted:
                raise
            except (RegistryError, NeedsFullClient):
                if not remembered:
                    raise
                self._forget(url)  # an expired signed URL, say: ask the registry again
                receiver.reset()
                target, remembered = url, False
                continue
            if target != url and not remembered:
                self._remember(url, target)
            return
        raise ProtocolViolation(f"{url}: more than {MAX_REDIRECTS} redirects")  # a loop: final

    def _remembered(self, url: str) -> str | None:
        with self._lock:
            memo = self._redirects.get(url)
            if memo is None or memo[1] < time.monotonic():
                self._redirects.pop(url, None)
                return None
            return memo[0]

    def _remember(self, url: str, target: str) -> None:
        with self._lock:
            if len(self._redirects) >= REDIRECT_MEMOS:
                self._redirects.pop(next(iter(self._redirects)))
            self._redirects[url] = (target, time.monotonic() + REDIRECT_MEMORY)

    def _forget(self, url: str) -> None:
        with self._lock:
            self._redirects.pop(url, None)

    def _get_one(self, url: str, start: int, end: int, blob_size: int | None,
                 headers: dict[str, str], receiver, abort: Abort | None) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise NeedsFullClient(f"{url}: not a URL for the data plane")
        key = (parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https"
                                                           else 80))
        deadline = time.monotonic() + stall_budget(self._read_timeout, end - start,
                                                   self._min_rate)
        abort = abort or Abort()
        for attempt in (1, 2):
            conn = self._checkout(key, abort)
            try:
                keep = self._exchange(conn, url, parts, start, end, blob_size, headers,
                                      receiver, deadline, abort)
            except _Stale:
                conn.close()
                receiver.reset()
                if attempt == 2 or not conn.reused:
                    raise TemporaryError(f"{url}: connection closed before any answer") from None
                continue  # a kept-alive connection the server had dropped: a new one
            except BaseException:
                conn.close()
                raise
            finally:
                abort.detach()  # before the connection can go to another thread
            if keep:
                self._checkin(conn)
            else:
                conn.close()
            return

    def _checkout(self, key: tuple, abort: Abort) -> _Conn:
        with self._lock:
            idle = self._idle.get(key, [])
            while idle:
                conn = idle.pop()
                # readable while idle means the server closed it (or sent junk): not reusable
                poller = select.poll()
                poller.register(conn.sock, select.POLLIN)
                if poller.poll(0):
                    conn.close()
                    continue
                conn.reused = True
                abort.attach(conn.sock)
                return conn
        scheme, host, port = key
        try:
            sock = socket.create_connection((host, port), timeout=self._connect_timeout)
        except OSError as exc:
            raise RegistryUnreachable(f"cannot reach {scheme}://{host}:{port}: "
                                      f"{exc.strerror or exc}") from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if scheme == "https":
                context = self._ssl or ssl.create_default_context()
                sock = context.wrap_socket(sock, server_hostname=host)
        except (OSError, ssl.SSLError) as exc:
            sock.close()
            raise RegistryUnreachable(f"cannot reach {scheme}://{host}:{port}: {exc}") from exc
        abort.attach(sock)
        return _Conn(sock, key)

    def _checkin(self, conn: _Conn) -> None:
        with self._lock:
            idle = self._idle.setdefault(conn.key, [])
            if len(idle) < self._max_idle:
                idle.append(conn)
                return
        conn.close()

    def _exchange(self, conn: _Conn, url: str, parts, start: int, end: int,
                  blob_size: int | None, headers: dict[str, str], receiver, deadline: float,
                  abort: Abort) -> bool:
        """One request and its answer; True if the connection may be used again."""
        sock = conn.sock
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        lines = [f"GET {target} HTTP/1.1", f"Host: {parts.netloc}",
                 f"User-Agent: {self._user_agent}", "Accept-Encoding: identity",
                 f"Range: bytes={start}-{end - 1}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.requests += 1
        try:
            self._settimeout(sock, deadline, url, start, end)
            try:
                sock.sendall(request)
            except (BrokenPipeError, ConnectionResetError):
                if conn.reused:
                    raise _Stale() from None
                raise
            head = self._read_head(conn, url, deadline, start, end)
            if head.status != 206:
                self._not_partial(conn, url, head, start, end, blob_size, deadline)
            te = head.headers.get("transfer-encoding")
            declared = head.headers.get("content-length")
            if te is not None or declared is None or not declared.isdigit():
                raise NeedsFullClient(f"{url}: framing we leave to httpx")
            check_range_answer(url, head.status, head.headers, start, end, blob_size)
            self._read_body(sock, head.rest, receiver, url, start, end, deadline, abort)
        except socket.timeout as exc:
            if time.monotonic() >= deadline:
                raise self._stalled(url, start, end) from exc
            raise RegistryUnreachable(f"{url}: timed out (no byte for "
                                      f"{self._read_timeout:.0f}s)") from exc
        except ssl.SSLError as exc:
            raise TemporaryError(f"{url}: TLS error: {exc}") from exc
        except OSError as exc:
            if abort.aborted:
                raise Aborted(f"{url}: fetch cancelled") from exc
            raise TemporaryError(f"{url}: {type(exc).__name__}: {exc}") from exc
        return head.version == "HTTP/1.1" and "close" not in head.headers.get(
            "connection", "").lower()

    def _stalled(self, url: str, start: int, end: int) -> TemporaryError:
        budget = stall_budget(self._read_timeout, end - start, self._min_rate)
        return stalled(url, start, end, budget, self._min_rate)

    def _settimeout(self, sock, deadline: float, url: str, start: int, end: int) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise self._stalled(url, start, end)
        sock.settimeout(min(self._read_timeout, left))

    def _read_head(self, conn: _Conn, url: str, deadline: float, start: int, end: int) -> _Head:
        buf = b""
        while True:
            cut = buf.find(b"\r\n\r\n")
            if cut >= 0:
                break
            # Final, here and below: an answer that is not HTTP we can parse safely is a broken
            # server or proxy, not an edge that missed its cache.
            if len(buf) > MAX_HEAD:
                raise ProtocolViolation(f"{url}: answer headers larger than {MAX_HEAD} bytes")
            self._settimeout(conn.sock, deadline, url, start, end)
            try:
                piece = conn.sock.recv(65536)
            except ConnectionResetError:
                if conn.reused and not buf:
                    raise _Stale() from None
                raise
            if not piece:
                if conn.reused and not buf:
                    raise _Stale()
                raise TemporaryError(f"{url}: connection closed in the middle of the headers")
            buf += piece
        lines = buf[:cut].decode("latin-1").split("\r\n")
        m = re.fullmatch(r"(HTTP/1\.[01]) (\d{3})(?: .*)?", lines[0])
        if m is None:
            raise ProtocolViolation(f"{url}: not an HTTP/1.x answer ({lines[0][:60]!r})")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise ProtocolViolation(f"{url}: malformed header line {line[:60]!r}")
            name, value = name.lower(), value.strip()
            if name in headers and headers[name] != value:
                if name in ("content-length", "content-range", "transfer-encoding"):
                    raise ProtocolViolation(f"{url}: conflicting {name} headers")
                value = headers[name] + ", " + value
            headers[name] = value
        return _Head(m.group(1), int(m.group(2)), headers, buf[cut + 4:])

    def _not_partial(self, conn: _Conn, url: str, head: _Head, start: int, end: int,
                     blob_size: int | None, deadline: float) -> None:
        status = head.status
        if status < 300:  # a 200 (whole body) or another status no Range answer has
            check_range_answer(url, status, head.headers, start, end, blob_size)
        location = head.headers.get("location")
        if status in (301, 302, 303, 307, 308) and location:
            raise _Redirect(urllib.parse.urljoin(url, location))
        if status == 401 or 300 <= status < 400:  # (httpx follows it, or says why not)
            raise NeedsFullClient(f"{url}: HTTP {status}")
        body = head.rest
        declared = head.headers.get("content-length", "")
        if declared.isdigit() and int(declared) <= MAX_ERROR_BODY:
            try:
                while len(body) < int(declared):
                    self._settimeout(conn.sock, deadline, url, start, end)
                    piece = conn.sock.recv(MAX_ERROR_BODY)
                    if not piece:
                        break
                    body += piece
            except OSError:
                pass  # the status is what matters; its message is a bonus
        raise error_for_status(status, describe_error("GET", url, status, bytes(body)),
                               parse_retry_after(head.headers.get("retry-after", "")))

    def _read_body(self, sock, rest: bytes, receiver, url: str, start: int, end: int,
                   deadline: float, abort: Abort) -> None:
        length = end - start
        if len(rest) > length:  # bytes after the body it declared: the stream is not ours
            check_length(url, start, end, len(rest), "received")
        view = receiver.view
        got = len(rest)
        view[:got] = rest
        receiver.arrived += got
        while got < length:
            if abort.aborted:
                raise Aborted(f"{url}: fetch cancelled")
            self._settimeout(sock, deadline, url, start, end)
            n = sock.recv_into(view[got:length], length - got)
            if n == 0:
                check_length(url, start, end, got)
            got += n
            receiver.arrived += n  # progress, for readers' deadlines
            if got - receiver.filled >= HASH_STEP:
                receiver.received(got)
        receiver.received(got)
