"""`modelfs serve`: an Ollama models directory served as a registry (protocol.md §2-§4, §9).

A plain ASGI 3 application (`RegistryApp`) run by hypercorn's trio worker (`serve`). Routes, all
GET or HEAD (anything else is 405):

    /v2/                                    200 `{}`
    /v2/<ns>/<model>/manifests/<tag>        the manifest bytes exactly as stored
    /v2/<ns>/<model>/blobs/sha256:<hex>     the blob; one `Range: bytes=...` gives 206
    /v2/<ns>/<model>/chunksums/sha256:<hex> `sha256:<hex> <start>-<end>` lines (inclusive end)
                                            with an absolute `Content-Location` of the blob

Errors are Docker-style bodies `{"errors":[{"code":...,"message":...}]}`: 404 MANIFEST_UNKNOWN,
BLOB_UNKNOWN, NAME_UNKNOWN/UNSUPPORTED (no such endpoint); 400 NAME_INVALID/DIGEST_INVALID (unsafe
or invalid path, checked before any I/O); 400 RANGE_INVALID for a malformed Range, 416 for a range
starting at or past the end and for several ranges (we never answer a Range with 200: a client
writing a 200 body at its chunk offset would corrupt its copy); 500 BLOB_CORRUPT for a blob whose
content does not hash to its name (found while computing its chunk list; blob GETs are not
re-hashed, clients verify what they get, but a blob already found corrupt is refused too);
500 UNKNOWN for a bug,
with the traceback logged. Manifests are looked up under `manifests/registry.ollama.ai/` first,
then under every other host directory, sorted.

Path safety (invariant 11): the route is parsed from the ASGI `raw_path`, never from the decoded
`path`. Bytes outside printable ASCII, backslashes, empty components, `.`/`..` components (also
percent-encoded) and percent-escapes that decode to a separator or a control byte are refused
with 400 before anything touches the filesystem; names then pass `validate_part` and digests
`parse_digest`, whose grammars hold no separator at all.

Access log: exactly one line per HTTP request, at INFO on the logger `modelfs.serve`, and nothing
else on that logger or below it (hypercorn's own access log is off; errors and tracebacks go to
`modelfs.server`, hypercorn's messages to `modelfs.server.hypercorn`):

    <client> "<METHOD> <raw path>" range=<Range header or -> <status> <bytes sent>

e.g. `127.0.0.1:51234 "GET /v2/library/m/blobs/sha256:ab..." range=bytes=0-99 206 100`.
`<client>` is `host:port` (or `-`); the method, raw path and Range value are printed with every
byte outside `!`..`~`, and `"` and `\\`, escaped as `\\xNN`, so a line always has these six
space-separated fields. `<status>` is `-` if no response was started (cancelled at shutdown);
`<bytes sent>` counts body bytes handed to the server (0 for HEAD). The line is written just
before the last piece of the response is sent, so once a client has read a whole response its
line exists; a response cut short (client gone, error mid-body) is logged when the handler ends.

Concurrency contract: every request is a trio task in hypercorn's nursery. The loop never blocks
on file I/O: opening and stat-ing blobs, reading manifests and every `os.pread` of a body piece
run in `trio.to_thread.run_sync` (body reads under a CapacityLimiter shared by all requests);
chunk lists come from `ChunksumStore`, which hashes in threads and single-flights per blob.
Memory per request is one body piece (~1 MiB): the next piece is read only after the server has
taken the previous one, and a client disconnect cancels the stream. `os.close` of a read-only fd
is the one file syscall made on the loop (it does not wait on the disk).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pathlib
import re
import stat
from collections.abc import Callable

import hypercorn.config
import hypercorn.trio
import trio

from modelfs.cache.errors import InvalidName
from modelfs.cache.store import ModelsDir
from modelfs.fetcher.chunksum_store import (DEFAULT_CHUNK_SIZE, MIN_CHUNK_SIZE,  # noqa: F401
                                            BlobChanged, BlobCorrupt, ChunksumStore,
                                            chunksums_text, default_state_dir)
from modelfs.fetcher.names import DEFAULT_HOST, validate_part
from modelfs.fetcher.routes import (Headers, HttpError, Receive, Route, Scope, Send, blob_url,
                                    parse_path, parse_range, printable, range_header, raw_path)


log = logging.getLogger("modelfs.serve")
# Not a child of "modelfs.serve": a handler on that logger must see access lines only.
error_log = logging.getLogger("modelfs.server")

MANIFEST_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
PIECE_SIZE = 1 << 20


# --- response ---------------------------------------------------------------------------------


class _Response:
    """Sends one response, counts body bytes and writes the access line exactly once."""

    def __init__(self, send: Send, head: bool, access_line: Callable[["_Response"], None]):
        self._send = send
        self._access_line = access_line
        self.head = head
        self.status: int | None = None
        self.sent = 0
        self._logged = False

    @property
    def started(self) -> bool:
        return self.status is not None

    def log_once(self) -> None:
        if not self._logged:
            self._logged = True
            self._access_line(self)

    async def start(self, status: int, headers: Headers) -> None:
        self.status = status
        await self._send({"type": "http.response.start", "status": status,
                          "headers": [(k.lower().encode(), v.encode("latin-1"))
                                      for k, v in headers]})

    async def body(self, data: bytes, *, more: bool = False) -> None:
        if self.head:
            data = b""
        self.sent += len(data)
        if not more:
            self.log_once()  # before the last send: a client that saw the end finds the line
        await self._send({"type": "http.response.body", "body": data, "more_body": more})

    async def whole(self, status: int, headers: Headers, data: bytes) -> None:
        await self.start(status, [*headers, ("Content-Length", str(len(data)))])
        await self.body(data)

    async def error(self, exc: HttpError) -> None:
        await self.whole(exc.status, [("Content-Type", "application/json"), *exc.headers],
                         exc.body())


# --- blocking helpers (run in threads) --------------------------------------------------------


def _open_blob(path: pathlib.Path) -> tuple[int, os.stat_result] | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        return None
    return fd, st


def _find_manifest(models: ModelsDir, namespace: str, model: str,
                   tag: str) -> tuple[bytes, str] | None:
    """(raw bytes, digest of the bytes) of the first host directory that has the manifest."""
    try:
        others = sorted(h for h in os.listdir(models.manifests) if h != DEFAULT_HOST)
    except (FileNotFoundError, NotADirectoryError):
        others = []
    for host in [DEFAULT_HOST, *others]:
        try:
            validate_part("host", host)
            raw = models.read_manifest((host, namespace, model, tag))
        except (InvalidName, IsADirectoryError):
            continue  # not a host directory, or a directory where the tag file should be
        if raw is not None:
            return raw, "sha256:" + hashlib.sha256(raw).hexdigest()
    return None


# --- the application --------------------------------------------------------------------------


class RequestCounts:
    """Requests answered and body bytes sent, by (method, status), for the metrics page.
    Counted where the access line is written: once per request."""

    def __init__(self) -> None:
        self.by_answer: dict[tuple[str, str], tuple[int, int]] = {}

    def answered(self, method: str, status: int | None, sent: int) -> None:
        key = (method if method in ("GET", "HEAD") else "other",
               "-" if status is None else str(status))
        n, nbytes = self.by_answer.get(key, (0, 0))
        self.by_answer[key] = (n + 1, nbytes + sent)


class RegistryApp:
    """The ASGI 3 callable serving `models` as a read-only registry."""

    def __init__(self, models: ModelsDir, chunk_store: ChunksumStore,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, *, max_disk_threads: int = 16):
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        self.models = models
        self.chunk_store = chunk_store
        self.chunk_size = chunk_size
        self._disk_limiter = trio.CapacityLimiter(max_disk_threads)
        self.counts = RequestCounts()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)
        # websocket: not served; returning without accepting makes the server refuse it.

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        resp = _Response(send, scope["method"] == "HEAD",
                         functools.partial(_access_line, scope, self.counts))
        try:
            await self._dispatch(scope, receive, resp)
        except HttpError as exc:
            if resp.started:
                error_log.error("refusal after the response started: %s", exc)
            else:
                await resp.error(exc)
        except Exception:
            error_log.exception("internal error on %s %s", scope["method"],
                                printable(raw_path(scope)))
            # Once the body has started the status is sent: the server drops the connection
            # because the body is short, which the client sees as an error.
            if not resp.started:
                await resp.error(HttpError(500, "UNKNOWN", "internal server error"))
        finally:
            resp.log_once()

    async def _dispatch(self, scope: Scope, receive: Receive, resp: _Response) -> None:
        route = parse_path(raw_path(scope))
        if scope["method"] not in ("GET", "HEAD"):
            raise HttpError(405, "UNSUPPORTED", f"method {scope['method'][:20]} not allowed",
                            [("Allow", "GET, HEAD")])
        if route.kind == "base":
            await resp.whole(200, [("Content-Type", "application/json")], b"{}")
        elif route.kind == "manifest":
            await self._manifest(route, resp)
        elif route.kind == "blob":
            await self._blob(route, scope, receive, resp)
        else:
            await self._chunksums(route, scope, resp)

    async def _manifest(self, route: Route, resp: _Response) -> None:
        found = await trio.to_thread.run_sync(
            _find_manifest, self.models, route.namespace, route.model, route.ref)
        if found is None:
            raise HttpError(404, "MANIFEST_UNKNOWN", "manifest unknown")
        raw, digest = found
        await resp.whole(200, [("Content-Type", MANIFEST_MEDIA_TYPE),
                               ("Docker-Content-Digest", digest)], raw)

    async def _blob(self, route: Route, scope: Scope, receive: Receive,
                    resp: _Response) -> None:
        opened = await trio.to_thread.run_sync(_open_blob, self.models.blob_path(route.ref))
        if opened is None:
            raise HttpError(404, "BLOB_UNKNOWN", "blob unknown to registry")
        fd, st = opened
        try:
            await self._send_blob(fd, st, route.ref, scope, receive, resp)
        finally:
            os.close(fd)

    async def _send_blob(self, fd: int, st: os.stat_result, digest: str, scope: Scope,
                         receive: Receive, resp: _Response) -> None:
        if self.chunk_store.is_known_corrupt(digest, st.st_size, st.st_mtime_ns):
            raise HttpError(500, "BLOB_CORRUPT", f"blob {digest} on this server does not "
                                                 "match its digest; refusing to serve it")
        size = st.st_size
        headers = [("Content-Type", "application/octet-stream"), ("Accept-Ranges", "bytes"),
                   ("Docker-Content-Digest", digest)]
        try:
            wanted = parse_range(range_header(scope), size)
        except HttpError as exc:
            exc.headers.append(("Accept-Ranges", "bytes"))
            raise
        if wanted is None:
            status, start, end = 200, 0, size
        else:
            (start, end), status = wanted, 206
            headers.append(("Content-Range", f"bytes {start}-{end - 1}/{size}"))
        await resp.start(status, [*headers, ("Content-Length", str(end - start))])
        if resp.head or start == end:
            await resp.body(b"")
        else:
            await self._stream(fd, start, end, receive, resp)

    async def _stream(self, fd: int, start: int, end: int, receive: Receive,
                      resp: _Response) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
            offset = start
            while offset < end:
                data = await trio.to_thread.run_sync(
                    os.pread, fd, min(PIECE_SIZE, end - offset), offset,
                    limiter=self._disk_limiter)
                if not data:
                    raise BlobChanged(f"blob shrank to {offset} bytes while being served")
                offset += len(data)
                await resp.body(data, more=offset < end)
            nursery.cancel_scope.cancel()

    async def _chunksums(self, route: Route, scope: Scope, resp: _Response) -> None:
        try:
            chunks = await self.chunk_store.chunks(
                route.ref, self.models.blob_path(route.ref), self.chunk_size)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise HttpError(404, "BLOB_UNKNOWN", "blob unknown to registry") from None
        except BlobCorrupt as exc:
            raise HttpError(500, "BLOB_CORRUPT", str(exc)) from None
        except BlobChanged as exc:  # being replaced while we hashed it: ask again shortly
            raise HttpError(503, "BLOB_CHANGED", str(exc), [("Retry-After", "1")]) from None
        body = chunksums_text(chunks)
        await resp.whole(200, [("Content-Type", "text/plain; charset=utf-8"),
                               ("Content-Location", blob_url(scope, route))], body)


async def _cancel_on_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    # Without this a gone client would not stop us reading the rest of a multi-GiB blob.
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def _access_line(scope: Scope, counts: RequestCounts, resp: _Response) -> None:
    counts.answered(scope["method"], resp.status, resp.sent)
    client = scope.get("client")
    who = f"{client[0]}:{client[1]}" if client else "-"
    rng = range_header(scope)
    log.info('%s "%s %s" range=%s %s %d', who, printable(scope["method"], 20),
             printable(raw_path(scope)), "-" if rng is None else printable(rng, 200),
             "-" if resp.status is None else resp.status, resp.sent)


# --- serve ------------------------------------------------------------------------------------


def _check_state_dir(state_dir: pathlib.Path, models_root: pathlib.Path) -> None:
    state, root = state_dir.resolve(), models_root.resolve()
    if state == root or root in state.parents:
        raise ValueError(f"the chunksums state directory {state_dir} must be outside the "
                         f"served models directory {models_root}")


def _hypercorn_config(host: str, port: int) -> hypercorn.config.Config:
    config = hypercorn.config.Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None  # the app writes its own, stable access line
    config.errorlog = logging.getLogger("modelfs.server.hypercorn")
    config.include_server_header = False
    return config


_BLOB_NAME = re.compile(r"sha256-([0-9a-f]{64})")


async def _warm_chunk_lists(models: ModelsDir, store: ChunksumStore, chunk_size: int) -> None:
    """Compute (or load) the chunk list of every blob larger than a chunk, one at a time,
    right after startup, so a client's first chunksums request does not wait for a whole-blob
    hash (a request that comes first joins the same computation)."""
    def large_blobs() -> list[tuple[str, pathlib.Path]]:
        found = []
        for path in sorted((models.root / "blobs").iterdir()):
            m = _BLOB_NAME.fullmatch(path.name)
            try:
                if m is not None and path.stat().st_size > chunk_size:
                    found.append(("sha256:" + m.group(1), path))
            except OSError:
                continue
        return found

    try:
        blobs = await trio.to_thread.run_sync(large_blobs)
    except OSError:
        return
    for digest, path in blobs:
        try:
            await store.chunks(digest, path, chunk_size)
        except Exception as exc:  # logged by the store; the next request tries again
            error_log.info("chunk list of %s not prepared: %s", path.name, exc)


def _port_of(bind: str) -> int:
    # hypercorn reports binds as "http://127.0.0.1:8000" or "http://[::1]:8000".
    return int(bind.rsplit(":", 1)[1])


async def serve(models_root: os.PathLike | str, *, host: str = "127.0.0.1", port: int = 0,
                chunk_size: int = DEFAULT_CHUNK_SIZE,
                state_dir: os.PathLike | str | None = None,
                metrics: tuple[str, int] | None = None,
                task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve `models_root` until cancelled; `task_status.started(port)` once listening;
    `metrics`: (host, port) of a Prometheus metrics page (fetcher/metrics.py)."""
    models = ModelsDir(models_root)
    state = pathlib.Path(state_dir) if state_dir is not None else default_state_dir()
    _check_state_dir(state, models.root)
    store = ChunksumStore(state)
    app = RegistryApp(models, store, chunk_size)
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(functools.partial(
            hypercorn.trio.serve, app, _hypercorn_config(host, port), mode="asgi"))
        if metrics is not None:
            from .metrics import ServeCollector, serve_metrics
            await nursery.start(serve_metrics, metrics, ServeCollector(app.counts))
        task_status.started(_port_of(binds[0]))
        nursery.start_soon(_warm_chunk_lists, models, store, chunk_size)
