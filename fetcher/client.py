"""The registry client: manifests, chunk plans and verified-size range GETs over one
`httpx.AsyncClient` with timeouts on every request, a bounded connection pool, bearer-token and
basic auth, and retries for temporary failures.

Concurrency contract: one RegistryClient per process, shared by all tasks. Concurrency is bounded
by `httpx.Limits(max_connections)`; callers add their own limiter for how many chunks they want in
flight. Responses are streamed only inside `async with client.stream()`, so a cancelled fetch
returns its connection to the pool (style.md §3.11).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import logging
import os
import platform
import re
import urllib.parse

import httpcore._async.http11
import httpx
import trio

from modelfs.cache.buffers import Pieces
from modelfs.cache.chunks import DEFAULT_CHUNK_SIZE, Chunk, fixed_chunks
from modelfs.cache.units import FETCH_UNIT

from . import __version__
from .chunksums import MAX_CHUNKS, PARSE_STEP, ChunksumsParser
from .answer import MIN_TRANSFER_RATE, check_length, check_range_answer, stall_budget, stalled
from .errors import (NotFound, ProtocolViolation, RegistryError, RegistryUnreachable,
                     TemporaryError, Unauthorized, describe_error, error_for_status,
                     parse_retry_after)
from .manifest import (MANIFEST_MEDIA_TYPE, MAX_MANIFEST_BYTES, OCI_MANIFEST_MEDIA_TYPE, Layer,
                       Manifest, parse_manifest)
from .names import ModelName
from .rangeget import Abort, NeedsFullClient, RangeGetter
from .retry import RetryPolicy, retrying

log = logging.getLogger(__name__)

# The public registry refuses clients whose User-Agent does not look like a current Ollama
# (protocol.md §2.1: 412 "requires a newer version"). We send that form with the version we are
# compatible with, and name ourselves in a trailing product token.
# httpcore receives 64 KiB at a time: for multi-MiB range bodies that is some 16,000 trips
# through h11, httpcore and trio per GiB, which profiled at 1.9 s of CPU per GiB here; 1 MiB
# receives cut it to 0.75 s. A class attribute meant as a setting; we are its only user.
httpcore._async.http11.AsyncHTTP11Connection.READ_NUM_BYTES = 1 << 20

OLLAMA_COMPAT_VERSION = os.environ.get("MODELFS_OLLAMA_VERSION", "0.13.0")
_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


def user_agent() -> str:
    arch = _ARCH.get(platform.machine(), platform.machine() or "unknown")
    return f"ollama/{OLLAMA_COMPAT_VERSION} ({arch} linux) modelfs/{__version__}"


@dataclasses.dataclass(frozen=True)
class ClientConfig:
    connect_timeout: float = 10.0
    read_timeout: float = 30.0  # also the stall timeout: no byte for this long is a failure
    pool_timeout: float = 60.0
    max_connections: int = 16
    # the registry's small chunks are fetched together, in units of up to this many bytes
    fetch_unit: int = FETCH_UNIT
    # a chunk list of more registry chunks is refused: what it costs in memory (chunksums.py)
    max_chunks: int = MAX_CHUNKS
    retry: RetryPolicy = RetryPolicy()
    username: str | None = None
    password: str | None = None

    @classmethod
    def from_env(cls, **overrides) -> "ClientConfig":
        user, password = os.environ.get("MODELFS_REGISTRY_USER"), os.environ.get(
            "MODELFS_REGISTRY_PASSWORD")
        return cls(username=user, password=password, **overrides)


@dataclasses.dataclass(frozen=True)
class ChunkPlan:
    url: str
    chunks: list[Chunk]  # fetch units (cache/units.py): the registry's chunks, grouped
    chunk_digests: bool  # False: client-chosen ranges, servable only after the seal


def _error_message(response: httpx.Response, body: bytes) -> str:
    return describe_error(response.request.method, response.request.url, response.status_code,
                          body)


def _retry_after(response: httpx.Response) -> float | None:
    return parse_retry_after(response.headers.get("retry-after", ""))


@contextlib.contextmanager
def map_transport_errors(url):
    """Translate httpx exceptions into fetcher errors, chained (the only place)."""
    try:
        yield
    except httpx.ConnectError as exc:
        raise RegistryUnreachable(f"cannot reach {_origin(url)}: {exc or 'connection failed'}") from exc
    except httpx.TimeoutException as exc:
        raise RegistryUnreachable(f"{url}: timed out ({type(exc).__name__})") from exc
    except (httpx.UnsupportedProtocol, httpx.LocalProtocolError) as exc:
        raise RegistryError(f"{url}: {exc}") from exc
    except httpx.TransportError as exc:
        # resets, a body cut short by the peer, malformed framing: the next try may succeed
        raise TemporaryError(f"{url}: {type(exc).__name__}: {exc}") from exc
    except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError) as exc:
        # too many redirects, undecodable bodies, bad URLs: asking again will not help
        raise RegistryError(f"{url}: {type(exc).__name__}: {exc}") from exc


def _origin(url) -> str:
    u = httpx.URL(str(url))
    return f"{u.scheme}://{u.netloc.decode()}"


_CHALLENGE_RE = re.compile(r'(\w+)="([^"]*)"')


def _fill(receiver, data: Pieces) -> None:
    view, pos = receiver.view, 0
    for part in data.parts:
        view[pos:pos + len(part)] = part
        pos += len(part)
        receiver.received(pos)


class RegistryClient:
    def __init__(self, config: ClientConfig = ClientConfig(), *,
                 transport: httpx.AsyncBaseTransport | None = None):
        self.config = config
        self._tokens: dict[str, str] = {}  # origin -> Authorization header value
        self._auth_lock = trio.Lock()
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(connect=config.connect_timeout, read=config.read_timeout,
                                  write=config.read_timeout, pool=config.pool_timeout),
            limits=httpx.Limits(max_connections=config.max_connections,
                                max_keepalive_connections=config.max_connections),
            headers={"User-Agent": user_agent()},
            follow_redirects=True,
            transport=transport,
        )
        # The data plane (rangeget.py) for chunk bodies, unless the transport is a test double
        # or MODELFS_DATA_PLANE=httpx asks for httpx everywhere.
        self._raw = None
        if transport is None and os.environ.get("MODELFS_DATA_PLANE", "direct") != "httpx":
            self._raw = RangeGetter(user_agent=user_agent(),
                                    connect_timeout=config.connect_timeout,
                                    read_timeout=config.read_timeout,
                                    min_rate=MIN_TRANSFER_RATE,
                                    max_idle=config.max_connections,
                                    ssl_context=httpx.create_ssl_context())

    async def __aenter__(self) -> "RegistryClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._raw is not None:
            self._raw.close()
        await self._http.aclose()

    # -- requests ---------------------------------------------------------------------------

    def _auth_headers(self, url: str) -> dict[str, str]:
        token = self._tokens.get(_origin(url))
        return {"Authorization": token} if token else {}

    def _basic(self) -> str:
        pair = f"{self.config.username}:{self.config.password or ''}".encode()
        return "Basic " + base64.b64encode(pair).decode()

    async def _authenticate(self, origin: str, challenge: str, used: str | None) -> bool:
        """Answer a 401 challenge from `origin`; True if a retry with new credentials makes
        sense. One token request at a time: tasks that got the same challenge reuse it."""
        async with self._auth_lock:
            if self._tokens.get(origin) != used:
                return True  # another task authenticated meanwhile
            scheme = challenge.split(" ", 1)[0].lower()
            if scheme == "basic" and self.config.username is not None:
                self._tokens[origin] = self._basic()
                return True
            if scheme != "bearer":
                return False
            params = dict(_CHALLENGE_RE.findall(challenge))
            realm = params.pop("realm", "")
            if not realm:
                return False
            # A token service elsewhere could harvest our credentials (protocol.md §3.4), and
            # one without TLS where the registry has it would leak them.
            realm_url, registry_url = httpx.URL(realm), httpx.URL(origin)
            if realm_url.netloc != registry_url.netloc or (
                    realm_url.scheme != registry_url.scheme and realm_url.scheme != "https"):
                raise Unauthorized(f"token realm {realm} is not on the registry {origin}")
            headers = {"Authorization": self._basic()} if self.config.username is not None \
                else {}
            query = {k: v for k, v in params.items() if k in ("service", "scope")}
            with map_transport_errors(realm):
                answer = await self._http.get(realm, params=query, headers=headers)
            if answer.status_code != 200:
                raise error_for_status(answer.status_code, "token request: " + _error_message(
                    answer, answer.content))
            try:
                doc = answer.json()
                token = doc.get("token") or doc.get("access_token")
            except (ValueError, AttributeError):
                token = None
            if not isinstance(token, str) or not token:
                raise Unauthorized(f"token service {realm} gave no token")
            self._tokens[origin] = "Bearer " + token
            return True

    @contextlib.asynccontextmanager
    async def _stream(self, method: str, url: str, headers: dict[str, str] | None = None):
        """A streamed response with a success status; an auth challenge is answered once.
        The 401 response is closed before authenticating, so the token request never waits
        for a connection the challenge itself holds."""
        origin = _origin(url)
        for attempt in (1, 2):
            used = self._tokens.get(origin)
            req_headers = {**self._auth_headers(url), **(headers or {})}
            challenge = None
            with map_transport_errors(url):
                async with self._http.stream(method, url, headers=req_headers) as response:
                    if (response.status_code == 401 and attempt == 1
                            and _origin(response.request.url) == origin):
                        challenge = response.headers.get("www-authenticate", "")
                    elif response.status_code >= 400:
                        body = await response.aread()
                        raise error_for_status(response.status_code,
                                               _error_message(response, body),
                                               _retry_after(response))
                    else:
                        yield response
                        return
            if not await self._authenticate(origin, challenge, used):
                raise Unauthorized(f"{method} {url}: HTTP 401 and no way to authenticate "
                                   f"(set MODELFS_REGISTRY_USER / MODELFS_REGISTRY_PASSWORD)")
        raise AssertionError("unreachable")

    async def _get_bytes(self, url: str, limit: int, headers: dict[str, str] | None = None):
        async with self._stream("GET", url, headers) as response:
            declared = int(response.headers.get("content-length", "0") or 0)
            if declared > limit:
                raise RegistryError(f"{url}: answer of {declared} bytes is larger than {limit}")
            body = bytearray()
            with map_transport_errors(url):
                async for piece in response.aiter_bytes():
                    body += piece
                    if len(body) > limit:
                        raise RegistryError(f"{url}: answer larger than {limit} bytes")
            return response, bytes(body)

    # -- protocol ---------------------------------------------------------------------------

    async def fetch_manifest(self, name: ModelName) -> Manifest:
        url = f"{name.base_url}/v2/{name.namespace}/{name.model}/manifests/{name.tag}"
        # Plain OCI registries answer 400 by tag without this Accept header (protocol.md §10).
        headers = {"Accept": f"{MANIFEST_MEDIA_TYPE}, {OCI_MANIFEST_MEDIA_TYPE}"}

        async def once():
            try:
                _, body = await self._get_bytes(url, MAX_MANIFEST_BYTES, headers)
            except NotFound:
                raise NotFound(f"model {name.short()} not found at {name.base_url}") from None
            return parse_manifest(body)

        return await retrying(once, self.config.retry, f"manifest of {name}")

    def blob_url(self, name: ModelName, digest: str) -> str:
        return f"{name.base_url}/v2/{name.namespace}/{name.model}/blobs/{digest}"

    async def chunk_plan(self, name: ModelName, layer: Layer,
                         chunk_size: int = DEFAULT_CHUNK_SIZE,
                         whole_up_to: int | None = None) -> ChunkPlan:
        """How to fetch `layer`: the registry's chunk list, or client-chosen ranges without
        chunk digests when the registry has no chunksums endpoint (404). Layers of at most
        `whole_up_to` bytes (default: `chunk_size`) are one chunk, verified by the layer
        digest, with no list to ask for."""
        blob_url = self.blob_url(name, layer.digest)
        if layer.size <= (chunk_size if whole_up_to is None else whole_up_to):
            # One chunk whose digest is the layer digest: no list to ask for.
            chunks = [Chunk(0, layer.size, layer.digest)] if layer.size else []
            return ChunkPlan(blob_url, chunks, True)
        url = f"{name.base_url}/v2/{name.namespace}/{name.model}/chunksums/{layer.digest}"

        async def once():
            async with self._stream("GET", url) as response:
                if response.status_code != 200:
                    raise ProtocolViolation(f"{url}: unexpected status {response.status_code}")
                location = response.headers.get("content-location") or blob_url
                units = await self._read_chunksums(url, response, layer.size)
            return ChunkPlan(urllib.parse.urljoin(str(response.url), location), units, True)

        try:
            return await retrying(once, self.config.retry, f"chunksums of {layer.digest[:19]}")
        except NotFound:
            log.info("registry %s has no chunksums for %s; using %d-byte ranges, verified as a "
                     "whole blob", name.base_url, layer.digest[:19], chunk_size)
            return ChunkPlan(blob_url, fixed_chunks(layer.size, chunk_size), False)

    async def _read_chunksums(self, url: str, response: httpx.Response,
                              size: int) -> list[Chunk]:
        """The fetch units of the chunk list in `response`, parsed as it arrives: a piece
        of PARSE_STEP bytes at a time, in a worker thread (a long list takes a while), while
        the next comes in; never the whole body at once (chunksums.py)."""
        parser = ChunksumsParser(size, self.config.fetch_unit, self.config.max_chunks)
        declared = int(response.headers.get("content-length", "0") or 0)
        if declared > parser.max_bytes:
            raise RegistryError(f"{url}: answer of {declared} bytes is larger than "
                                f"{parser.max_bytes}")
        pending: list[bytes] = []
        held = 0
        with map_transport_errors(url):
            async for piece in response.aiter_bytes():
                pending.append(piece)
                held += len(piece)
                if held >= PARSE_STEP:
                    data, pending, held = b"".join(pending), [], 0
                    await trio.to_thread.run_sync(parser.feed, data)
        data = b"".join(pending)
        if len(data) > 64 << 10:
            await trio.to_thread.run_sync(parser.feed, data)
        else:
            parser.feed(data)
        return parser.finish()

    async def fetch_range_into(self, url: str, start: int, end: int, blob_size: int | None,
                               receiver) -> None:
        """Bytes [start, end) of the blob at `url` into `receiver` (cache/chunkbuf.py), or an
        error. One attempt. Through the data plane in a worker thread when it can take the
        answer; else, or when the answer needs more (a redirect, an auth challenge), httpx."""
        if self._raw is not None and self._raw.usable(url):
            abort = Abort()
            try:
                await trio.to_thread.run_sync(
                    self._raw.get_into, url, start, end, blob_size, self._auth_headers(url),
                    receiver, abort, abandon_on_cancel=True)
                return
            except trio.Cancelled:
                # the thread may still be writing into the buffer: it is never reused
                abort.abort()
                receiver.buf.abandon()
                raise
            except NeedsFullClient:
                receiver.reset()
        data = await self.fetch_range(url, start, end, blob_size, receiver)
        await trio.to_thread.run_sync(_fill, receiver, data)  # it hashes: off the loop

    async def fetch_range(self, url: str, start: int, end: int, blob_size: int | None = None,
                          receiver=None):
        """Exactly bytes [start, end) of the blob at `url`, or an error. One attempt. The
        bytes are counted as they come into `receiver.arrived` (progress: fetcher/deadline.py).

        httpx's read timeout bounds each wait for bytes; this bounds the whole answer, so a
        server that trickles a byte now and then cannot hold a chunk forever (a stall)."""
        budget = stall_budget(self.config.read_timeout, end - start)
        with trio.move_on_after(budget) as scope:
            return await self._fetch_range(url, start, end, blob_size, receiver)
        assert scope.cancelled_caught
        raise stalled(url, start, end, budget)

    async def _fetch_range(self, url: str, start: int, end: int, blob_size: int | None,
                           receiver):
        length = end - start
        headers = {"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"}
        async with self._stream("GET", url, headers) as response:
            # (error statuses were raised by _stream; a redirect left here had no Location)
            check_range_answer(url, response.status_code, response.headers, start, end,
                               blob_size)
            parts, pos = [], 0
            with map_transport_errors(url):
                async for piece in response.aiter_bytes():
                    pos += len(piece)
                    if pos > length:  # (more than its Content-Length said, or none was given)
                        check_length(url, start, end, pos, "received")
                    parts.append(piece)  # kept as received: no copy into one buffer
                    if receiver is not None:
                        receiver.arrived += len(piece)
            check_length(url, start, end, pos)
            return Pieces(parts)

