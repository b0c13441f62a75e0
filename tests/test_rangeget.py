"""The data plane (fetcher/rangeget.py) against a scripted HTTP/1.1 server on 127.0.0.1: exact
ranges into the buffer, keep-alive and stale connections, every answer it must refuse or hand
to httpx, stalls and aborts. Also the chunk buffers it fills (cache/chunkbuf.py)."""

import hashlib
import re
import socket
import threading
import time

import pytest
import trio

from modelfs.cache.chunkbuf import BufferPool, Receiver
from modelfs.fetcher.client import ClientConfig, RegistryClient
from modelfs.fetcher.errors import (BadRangeAnswer, NotFound, ProtocolViolation, ShortBody,
                                    TemporaryError)
from modelfs.fetcher.rangeget import Abort, Aborted, NeedsFullClient, RangeGetter

DATA = hashlib.sha256(b"seed").digest() * 40000  # 1.28 MB, not one repeated byte
PATH = "/v2/library/m/blobs/sha256:" + "0" * 64


class ScriptedServer:
    """Answers each request with `answer(conn, first, last, n)`, n counting requests from 1.
    Counts connections and requests; `close_after` closes each connection after one answer."""

    def __init__(self, answer, close_after=False, tls=None):
        self.answer, self.close_after, self.tls = answer, close_after, tls
        self.connections = self.requests = 0
        self.heads: list[str] = []
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}{PATH}"
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._stop:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        if self.tls is not None:
            try:
                conn = self.tls.wrap_socket(conn, server_side=True)
            except OSError:
                return
        with conn:
            buf = b""
            while True:
                while b"\r\n\r\n" not in buf:
                    try:
                        piece = conn.recv(65536)
                    except OSError:
                        return
                    if not piece:
                        return
                    buf += piece
                head, _, buf = buf.partition(b"\r\n\r\n")
                head = head.decode()
                self.heads.append(head)
                self.requests += 1
                m = re.search(r"Range: bytes=(\d+)-(\d+)", head)
                try:
                    self.answer(conn, int(m.group(1)), int(m.group(2)), self.requests)
                except OSError:
                    return
                if self.close_after:
                    return

    def close(self):
        self._stop = True
        self._sock.close()


def partial(conn, first, last, n, extra=b"", body=None, headers=""):
    body = DATA[first:last + 1] if body is None else body
    conn.sendall((f"HTTP/1.1 206 Partial Content\r\nContent-Length: {len(body)}\r\n"
                  f"Content-Range: bytes {first}-{last}/{len(DATA)}\r\n{headers}\r\n").encode()
                 + body + extra)


def status(code, body=b"", headers=""):
    def answer(conn, first, last, n):
        conn.sendall((f"HTTP/1.1 {code} X\r\nContent-Length: {len(body)}\r\n{headers}\r\n")
                     .encode() + body)
    return answer


def getter(**kw):
    config = dict(user_agent="test", connect_timeout=2, read_timeout=2, min_rate=1 << 20)
    config.update(kw)
    return RangeGetter(**config)


def receive(g, url, start, end, size=len(DATA), abort=None):
    pool = BufferPool()
    rec = Receiver(pool.take(end - start))
    g.get_into(url, start, end, size, {"X-Test": "1"}, rec, abort)
    return rec


@pytest.fixture
def server(request):
    servers = []

    def make(answer, **kw):
        s = ScriptedServer(answer, **kw)
        servers.append(s)
        return s
    yield make
    for s in servers:
        s.close()


def test_range_lands_in_the_buffer_hashed_and_the_connection_is_kept(server):
    srv = server(partial)
    g = getter()
    for start, end in [(0, 300000), (300000, 1000000), (5, 6)]:
        rec = receive(g, srv.url, start, end)
        assert bytes(rec.view) == DATA[start:end]
        assert rec.filled == end - start
        assert rec.digest() == "sha256:" + hashlib.sha256(DATA[start:end]).hexdigest()
    assert srv.requests == 3 and srv.connections == 1  # keep-alive
    head = srv.heads[0]
    assert "Range: bytes=0-299999" in head and "X-Test: 1" in head
    assert "Accept-Encoding: identity" in head and "User-Agent: test" in head
    g.close()


def test_a_connection_the_server_closed_is_replaced(server):
    srv = server(partial, close_after=True)  # keep-alive announced, then closed anyway
    g = getter()
    for _ in range(3):
        assert bytes(receive(g, srv.url, 10, 20).view) == DATA[10:20]
    assert srv.connections == 3


@pytest.mark.parametrize("answer, error, match", [
    (lambda c, f, l, n: partial(c, f, l, n, headers=f"Content-Range: bytes {f + 1}-{l}/1\r\n"),
     ProtocolViolation, "conflicting content-range"),
    (lambda c, f, l, n: c.sendall(
        f"HTTP/1.1 206 X\r\nContent-Length: {l - f + 1}\r\nContent-Range: bytes {f + 1}-{l + 1}"
        f"/{len(DATA)}\r\n\r\n".encode() + DATA[f + 1:l + 2]), BadRangeAnswer, "got"),
    (lambda c, f, l, n: partial(c, f, l, n, body=DATA[f:l + 1][:-3]), ShortBody, "gave"),
    (lambda c, f, l, n: partial(c, f, l, n, body=DATA[f:l + 11]), BadRangeAnswer,
     "more than the"),
    (lambda c, f, l, n: (c.sendall(f"HTTP/1.1 206 X\r\nContent-Length: {l - f + 1}\r\n"
                                   f"Content-Range: bytes {f}-{l}/{len(DATA)}\r\n\r\n".encode()
                                   + DATA[f:f + 5]), c.shutdown(socket.SHUT_WR)),
     ShortBody, "gave 5 of"),
    (status(200, DATA[:100]), BadRangeAnswer, "ignored Range"),
    (status(204), ProtocolViolation, "unexpected status 204"),
    (status(404, b'{"errors":[{"code":"BLOB_UNKNOWN","message":"no such blob"}]}'), NotFound,
     "no such blob"),
    (lambda c, f, l, n: c.sendall(b"garbage\r\n\r\n"), ProtocolViolation, "not an HTTP"),
])
def test_bad_answers_are_refused(server, answer, error, match):
    """One attempt, refused with exactly this class: what a flaky edge does is a
    BadRangeAnswer (retried by the caller), a broken server a final ProtocolViolation."""
    srv = server(answer)
    with pytest.raises(error, match=match) as exc:
        receive(getter(), srv.url, 100, 200)
    assert type(exc.value) is error
    assert srv.requests == 1


def test_temporary_failures_carry_retry_after(server):
    srv = server(status(503, b"busy", "Retry-After: 7\r\n"))
    with pytest.raises(TemporaryError) as exc:
        receive(getter(), srv.url, 0, 10)
    assert exc.value.status == 503 and exc.value.retry_after == 7


@pytest.mark.parametrize("answer", [
    status(302),  # a redirect without a Location
    status(401, headers='WWW-Authenticate: Bearer realm="x"\r\n'),
    lambda c, f, l, n: c.sendall(b"HTTP/1.1 206 X\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
])
def test_answers_for_the_full_client_are_handed_over(server, answer):
    srv = server(answer)
    with pytest.raises(NeedsFullClient):
        receive(getter(), srv.url, 0, 10)


def test_a_stalled_transfer_fails_within_its_deadline(server):
    def trickle(conn, first, last, n):
        conn.sendall(f"HTTP/1.1 206 X\r\nContent-Length: {last - first + 1}\r\nContent-Range: "
                     f"bytes {first}-{last}/{len(DATA)}\r\n\r\n".encode())
        for i in range(100):
            conn.sendall(DATA[first + i:first + i + 1])
            time.sleep(0.05)
    srv = server(trickle)
    t = time.monotonic()
    with pytest.raises(TemporaryError, match="stalled"):
        # deadline: 1 s + 100000 bytes at 1 MB/s = 1.1 s, far below what the trickle needs
        receive(getter(read_timeout=1), srv.url, 0, 100000)
    assert time.monotonic() - t < 3


def test_an_abort_breaks_off_a_waiting_transfer(server):
    def hang(conn, first, last, n):
        conn.sendall(b"HTTP/1.1 206 X\r\n")
        time.sleep(5)
    srv = server(hang)
    abort = Abort()
    threading.Timer(0.2, abort.abort).start()
    t = time.monotonic()
    with pytest.raises((Aborted, TemporaryError)):
        receive(getter(read_timeout=10), srv.url, 0, 10, abort=abort)
    assert time.monotonic() - t < 2


@pytest.fixture
def tls_pair(tmp_path):
    """A self-signed certificate for 127.0.0.1: the server's context and a client context
    that trusts it (and nothing else)."""
    import shutil
    import ssl
    import subprocess
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(cert))
    return server, client


def test_ranges_over_tls_are_verified_and_kept_alive(server, tls_pair):
    """The public registry and its CDN speak HTTPS: the same exact ranges over TLS, the
    connection reused; a certificate the client does not trust is refused."""
    import ssl
    srv = server(partial, tls=tls_pair[0])
    g = getter(ssl_context=tls_pair[1])
    for start, end in [(0, 700000), (700000, 1280000)]:
        rec = receive(g, srv.url, start, end)
        assert bytes(rec.view) == DATA[start:end]
        assert rec.digest() == "sha256:" + hashlib.sha256(DATA[start:end]).hexdigest()
    assert srv.requests == 2 and srv.connections == 1
    g.close()
    with pytest.raises(TemporaryError, match="cannot reach"):
        receive(getter(ssl_context=ssl.create_default_context()), srv.url, 0, 10)


def test_an_abort_breaks_off_a_tls_transfer(server, tls_pair):
    def hang(conn, first, last, n):
        conn.sendall(f"HTTP/1.1 206 X\r\nContent-Length: {last - first + 1}\r\nContent-Range: "
                     f"bytes {first}-{last}/{len(DATA)}\r\n\r\n".encode() + DATA[:10])
        time.sleep(5)
    srv = server(hang, tls=tls_pair[0])
    abort = Abort()
    threading.Timer(0.3, abort.abort).start()
    t = time.monotonic()
    with pytest.raises(TemporaryError):
        receive(getter(ssl_context=tls_pair[1], read_timeout=10), srv.url, 0, 1000,
                abort=abort)
    assert time.monotonic() - t < 2


def test_unreachable_registry_is_temporary():
    port = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{port.getsockname()[1]}{PATH}"
    port.close()
    with pytest.raises(TemporaryError, match="cannot reach"):
        receive(getter(), url, 0, 10)


def test_proxied_and_odd_urls_are_left_to_httpx(monkeypatch):
    g = getter()
    assert g.usable("http://127.0.0.1:1/x")
    assert not g.usable("ftp://host/x") and not g.usable("http://user:pw@host/x")
    monkeypatch.setenv("http_proxy", "http://proxy.invalid:3128")
    monkeypatch.setenv("no_proxy", "")
    assert not g.usable("http://registry.test/x")


def test_redirects_are_followed_remembered_and_get_no_credentials(server):
    """The registry sends blob requests to a CDN: followed without the Authorization header,
    and the next chunks go straight to the CDN; a redirect loop is refused."""
    cdn = server(partial)
    registry = server(status(307, headers=f"Location: http://127.0.0.1:{cdn.port}/signed?x=1"
                                          f"\r\n"))
    g = getter()
    pool = BufferPool()
    for start in (0, 1000, 2000):
        rec = Receiver(pool.take(1000))
        g.get_into(registry.url, start, start + 1000, len(DATA),
                   {"Authorization": "Bearer secret"}, rec)
        assert bytes(rec.view) == DATA[start:start + 1000]
        assert rec.digest() == "sha256:" + hashlib.sha256(DATA[start:start + 1000]).hexdigest()
    assert registry.requests == 1 and cdn.requests == 3  # remembered after the first
    assert "Authorization" in registry.heads[0]
    assert all("Authorization" not in h for h in cdn.heads)
    assert cdn.heads[0].startswith("GET /signed?x=1 HTTP/1.1")

    loop = server(status(302, headers="Location: /again\r\n"))
    with pytest.raises(ProtocolViolation, match="redirects"):
        receive(getter(), loop.url, 0, 10)


def test_a_remembered_target_that_fails_is_asked_for_again(server):
    """A signed URL that expired (403 at the CDN): forgotten, the registry redirects anew."""
    fresh = server(partial)
    expired = server(lambda c, f, l, n: (partial if n == 1 else status(403))(c, f, l, n))
    targets = iter([expired.port, fresh.port])
    registry = server(lambda c, f, l, n: status(
        307, headers=f"Location: http://127.0.0.1:{next(targets)}/blob\r\n")(c, f, l, n))
    g = getter()
    assert bytes(receive(g, registry.url, 0, 100).view) == DATA[:100]  # via `expired`, kept
    assert bytes(receive(g, registry.url, 100, 200).view) == DATA[100:200]  # 403 -> again
    assert registry.requests == 2 and expired.requests == 2 and fresh.requests == 1


async def test_client_falls_back_to_httpx_for_an_auth_challenge(live_registry):
    """A 401 on the data plane: httpx answers the challenge, and the range still arrives."""
    from . import faults as F
    reg = await live_registry(chunk_size=64 << 10)
    source, imported = reg.add_model("locked", 256 << 10)
    reg.faults.add("GET", "/blobs/", F.require_auth(
        "Basic dTpw", 'Basic realm="test"'))
    layer = imported.model
    pool = BufferPool()
    rec = Receiver(pool.take(1000))
    config = ClientConfig(read_timeout=5, username="u", password="p")
    async with RegistryClient(config) as client:
        url = client.blob_url(reg.name("locked"), layer.digest)
        await client.fetch_range_into(url, 5000, 6000, layer.size, rec)
    assert bytes(rec.view) == source.read_bytes()[5000:6000]


async def test_cancelled_fetch_never_recycles_its_buffer(server):
    def hang(conn, first, last, n):
        time.sleep(3)
    srv = server(hang)
    pool = BufferPool()
    buf = pool.take(1000)
    rec = Receiver(buf)
    async with RegistryClient(ClientConfig(read_timeout=10)) as client:
        with trio.move_on_after(0.2):
            await client.fetch_range_into(srv.url, 0, 1000, len(DATA), rec)
    assert buf.abandoned
    pool.release(buf)
    assert pool.take(1000) is not buf  # the thread might still write into it


def test_pool_reuses_buffers_and_keeps_refs():
    pool = BufferPool(keep=4 << 20)
    a = pool.take(3 << 20)
    assert a.capacity == 3 << 20 and len(a) == 3 << 20 and a.refs == 1
    pool.hold(a)
    pool.release(a)
    assert pool.take(1 << 20) is not a  # still held once: not free
    pool.release(a)
    b = pool.take(2 << 20)
    assert b is a and len(b) == 2 << 20 and len(b.view) == 2 << 20  # reused, resized view
    big = pool.take(5 << 20)
    pool.release(big)  # more than `keep`: unmapped, not kept
    assert pool.take(5 << 20) is not big
    assert pool.allocated == (3 << 20) + (1 << 20) + (5 << 20)  # a, the 1 MiB one, the new big


def test_receiver_hashes_what_is_in_its_buffer_and_can_start_over():
    pool = BufferPool()
    rec = Receiver(pool.take(100))
    rec.view[:50] = b"x" * 50
    rec.received(50)
    rec.reset()
    rec.view[:] = DATA[:100]
    rec.received(60)
    rec.received(100)
    assert rec.digest() == "sha256:" + hashlib.sha256(DATA[:100]).hexdigest()
    assert Receiver(pool.take(10), hashed=False).digest() is None
