"""Chunk lists for `modelfs serve`: the sha256 of every fixed-size chunk of a served blob,
computed once and remembered in a state directory outside the served models directory.

A chunk list is computed in one sequential read of the blob that also hashes the whole file; if
the whole-file sha256 differs from the blob's digest the blob is refused (`BlobCorrupt`, logged
at ERROR) and no chunk list is ever given out for it, because a mirror must not vouch for bytes
that are not what their name promises.

Saved files are `<state dir>/sha256-<hex>.<chunk size>.json` and record the blob's size and
mtime_ns; a saved list is used only while both still match and the file parses cleanly, otherwise
it is recomputed (a garbled file is a cold cache, never an error).

Concurrency contract:
- All bookkeeping (`_flights`, `_corrupt`, counters) lives on the trio side and changes only
  between awaits. Threads get paths and immutable values and return a value; they touch no
  shared state.
- Everything that touches the disk (stat, reading saved lists, hashing, `atomic_write`) runs in
  `trio.to_thread.run_sync`; the trio loop never blocks on file I/O.
- Single flight per (digest, chunk size): the first request starts the work, every request that
  arrives meanwhile waits for the same result.
- The work runs in a trio *system task*, not in the requesting task, so a client that gives up
  (timeout, disconnect) does not throw away a half-hashed multi-GiB blob: the next request joins
  the same flight. Hashes of different blobs are bounded by a CapacityLimiter; loading a saved
  list is not, so it never queues behind a long hash. When the trio run ends the hashing thread
  is abandoned and told to stop at its next 1 MiB piece, without writing anything.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import threading

import trio

from modelfs.cache.chunks import DEFAULT_CHUNK_SIZE, Chunk
from modelfs.cache.digests import blob_filename, parse_digest
from modelfs.cache.errors import IntegrityError, ModelfsError
from modelfs.cache.store import atomic_write

log = logging.getLogger("modelfs.chunksums")

# The smallest chunk size offered (`serve --chunk-size`, `--export`): a page. Another registry
# may choose chunks this small, so we must be able to serve them to test the client against
# them (scripts/bench case 8); the default stays 8M, as small chunks make long chunk lists.
# Tests use tiny chunks through the API.
MIN_CHUNK_SIZE = 4 << 10


def chunksums_text(chunks: list[Chunk]) -> bytes:
    """The chunk list as the chunksums endpoint sends it (inclusive ends)."""
    return "".join(f"{c.digest} {c.start}-{c.end - 1}\n" for c in chunks).encode()

STATE_FORMAT = "modelfs-chunksums"
STATE_VERSION = 1
_PIECE = 1 << 20  # read size while hashing: memory stays bounded whatever the chunk size
_HEX = frozenset("0123456789abcdef")


class BlobCorrupt(IntegrityError):
    """A served blob whose content does not hash to the digest in its file name."""


class BlobChanged(ModelfsError):
    """The blob was modified or truncated while it was being hashed."""

    temporary = True


class _Abandoned(Exception):
    """The trio run went away; the hashing thread stops without saving."""


def default_state_dir() -> pathlib.Path:
    """`$XDG_STATE_HOME/modelfs/chunksums`, or `~/.local/state/modelfs/chunksums`."""
    base = os.environ.get("XDG_STATE_HOME", "")
    # The XDG spec says relative values are invalid and must be ignored.
    root = pathlib.Path(base) if os.path.isabs(base) else pathlib.Path.home() / ".local" / "state"
    return root / "modelfs" / "chunksums"


@dataclasses.dataclass(frozen=True)
class _Result:
    size: int
    mtime_ns: int
    chunks: list[Chunk] | None  # None when the blob is corrupt
    computed: bool = False
    mismatch: str | None = None  # what a corrupt blob hashes to
    save_error: str | None = None


@dataclasses.dataclass
class _Flight:
    done: trio.Event = dataclasses.field(default_factory=trio.Event)
    result: _Result | None = None
    error: BaseException | None = None


# --- pure helpers (run in threads) ------------------------------------------------------------


def _chunks_from_hexes(hexes: list[str], size: int, chunk_size: int) -> list[Chunk]:
    return [Chunk(i * chunk_size, min((i + 1) * chunk_size, size), "sha256:" + h)
            for i, h in enumerate(hexes)]


def _expected_count(size: int, chunk_size: int) -> int:
    return -(-size // chunk_size)


def _encode_state(digest: str, chunk_size: int, size: int, mtime_ns: int,
                  hexes: list[str]) -> bytes:
    doc = {"format": STATE_FORMAT, "version": STATE_VERSION, "digest": digest,
           "chunk_size": chunk_size, "size": size, "mtime_ns": mtime_ns, "chunks": hexes}
    return json.dumps(doc, separators=(",", ":")).encode() + b"\n"


def _decode_state(raw: bytes, digest: str, chunk_size: int, size: int,
                  mtime_ns: int) -> list[str] | None:
    """The chunk hexes from a saved file, or None if it is garbled or describes another file."""
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    expected = {"format": STATE_FORMAT, "version": STATE_VERSION, "digest": digest,
                "chunk_size": chunk_size, "size": size, "mtime_ns": mtime_ns}
    if any(doc.get(k) != v or type(doc.get(k)) is not type(v) for k, v in expected.items()):
        return None
    hexes = doc.get("chunks")
    if not isinstance(hexes, list) or len(hexes) != _expected_count(size, chunk_size):
        return None
    if not all(isinstance(h, str) and len(h) == 64 and set(h) <= _HEX for h in hexes):
        return None
    return hexes


def _load_saved(blob: pathlib.Path, state_file: pathlib.Path, digest: str, chunk_size: int,
                known_bad: tuple[int, int] | None) -> _Result | None:
    """The saved chunk list if it still describes `blob`; None means: compute it.

    Raises FileNotFoundError when the blob does not exist."""
    st = os.stat(blob)
    if known_bad == (st.st_size, st.st_mtime_ns):
        return _Result(st.st_size, st.st_mtime_ns, None)  # unchanged since found corrupt
    try:
        raw = state_file.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read saved chunk list %s (%s); recomputing", state_file, exc)
        return None
    hexes = _decode_state(raw, digest, chunk_size, st.st_size, st.st_mtime_ns)
    if hexes is None:
        log.info("saved chunk list %s is stale or garbled; recomputing", state_file)
        return None
    return _Result(st.st_size, st.st_mtime_ns, _chunks_from_hexes(hexes, st.st_size, chunk_size))


def _hash_blob(blob: pathlib.Path, chunk_size: int,
               cancel: threading.Event) -> tuple[os.stat_result, str, list[str]]:
    """One read pass: (stat, whole-file hex, per-chunk hexes)."""
    with open(blob, "rb", buffering=0) as f:
        st = os.fstat(f.fileno())
        whole = hashlib.sha256()
        hexes: list[str] = []
        buf = memoryview(bytearray(min(_PIECE, chunk_size)))
        offset = 0
        while offset < st.st_size:
            chunk = hashlib.sha256()
            chunk_end = min(offset + chunk_size, st.st_size)
            while offset < chunk_end:
                if cancel.is_set():
                    raise _Abandoned()
                n = f.readinto(buf[:min(len(buf), chunk_end - offset)])
                if not n:
                    raise BlobChanged(f"{blob} shrank while it was being hashed")
                whole.update(buf[:n])
                chunk.update(buf[:n])
                offset += n
            hexes.append(chunk.hexdigest())
        after = os.fstat(f.fileno())
    if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
        raise BlobChanged(f"{blob} changed while it was being hashed")
    return st, whole.hexdigest(), hexes


def _compute_and_save(blob: pathlib.Path, state_file: pathlib.Path, digest: str,
                      chunk_size: int, cancel: threading.Event) -> _Result:
    st, whole_hex, hexes = _hash_blob(blob, chunk_size, cancel)
    if "sha256:" + whole_hex != digest:
        return _Result(st.st_size, st.st_mtime_ns, None, computed=True,
                       mismatch="sha256:" + whole_hex)
    save_error = None
    try:
        atomic_write(state_file, _encode_state(digest, chunk_size, st.st_size, st.st_mtime_ns,
                                               hexes))
    except OSError as exc:
        # Serving the list matters more than remembering it; the caller warns.
        save_error = str(exc)
    return _Result(st.st_size, st.st_mtime_ns, _chunks_from_hexes(hexes, st.st_size, chunk_size),
                   computed=True, save_error=save_error)


# --- the store (trio side) --------------------------------------------------------------------


class ChunksumStore:
    """Remembered chunk lists for the blobs of one or more models directories."""

    def __init__(self, state_dir: os.PathLike | str | None = None, *, max_hashing: int = 2):
        self.state_dir = pathlib.Path(state_dir) if state_dir is not None else default_state_dir()
        self._hash_limiter = trio.CapacityLimiter(max_hashing)
        self._flights: dict[tuple[str, int], _Flight] = {}
        # digest -> (size, mtime_ns) of a blob found corrupt, so it is not hashed again and
        # the blob endpoint can refuse it too.
        self._corrupt: dict[str, tuple[int, int]] = {}
        self._computed = 0
        self._loaded = 0

    def state_file(self, digest: str, chunk_size: int) -> pathlib.Path:
        return self.state_dir / f"{blob_filename(digest)}.{chunk_size}.json"

    def is_known_corrupt(self, digest: str, size: int, mtime_ns: int) -> bool:
        return self._corrupt.get(parse_digest(digest)) == (size, mtime_ns)

    def statistics(self) -> dict[str, int]:
        return {"computed": self._computed, "loaded": self._loaded,
                "in_flight": len(self._flights), "known_corrupt": len(self._corrupt)}

    async def chunks(self, digest: str, blob: os.PathLike | str,
                     chunk_size: int = DEFAULT_CHUNK_SIZE) -> list[Chunk]:
        """The chunk list of the blob file `blob`, whose content must hash to `digest`.

        Raises BlobCorrupt, BlobChanged, FileNotFoundError (no such blob) or other OSError."""
        digest = parse_digest(digest)
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        key = (digest, chunk_size)
        flight = self._flights.get(key)
        if flight is None:
            flight = self._flights[key] = _Flight()
            trio.lowlevel.spawn_system_task(
                self._run_flight, key, flight, pathlib.Path(blob), name=f"chunksums {digest}")
        await flight.done.wait()
        return self._unwrap(digest, flight)

    def _unwrap(self, digest: str, flight: _Flight) -> list[Chunk]:
        if flight.error is not None:
            # A copy per waiter: one exception object raised in several tasks would tangle
            # its traceback and context.
            raise copy.copy(flight.error)
        assert flight.result is not None
        if flight.result.chunks is None:
            raise BlobCorrupt(f"blob {digest} on this server does not match its digest; "
                              "refusing to serve it")
        return flight.result.chunks

    async def _run_flight(self, key: tuple[str, int], flight: _Flight,
                          blob: pathlib.Path) -> None:
        # Runs as a system task: it must not raise anything but Cancelled.
        digest, chunk_size = key
        try:
            flight.result = await self._load_or_compute(digest, chunk_size, blob)
            self._record(digest, blob, flight.result)
        except trio.Cancelled:
            flight.error = BlobChanged("server shutting down")
            raise
        except Exception as exc:
            if not isinstance(exc, (OSError, ModelfsError)):
                log.exception("computing the chunk list of %s failed", blob)
            flight.error = exc
        finally:
            if self._flights.get(key) is flight:
                del self._flights[key]
            flight.done.set()

    async def _load_or_compute(self, digest: str, chunk_size: int,
                               blob: pathlib.Path) -> _Result:
        state_file = self.state_file(digest, chunk_size)
        saved = await trio.to_thread.run_sync(
            _load_saved, blob, state_file, digest, chunk_size, self._corrupt.get(digest))
        if saved is not None:
            return saved
        cancel = threading.Event()
        try:
            # abandon_on_cancel: shutdown must not wait for a multi-GiB hash; the flag stops it.
            return await trio.to_thread.run_sync(
                _compute_and_save, blob, state_file, digest, chunk_size, cancel,
                limiter=self._hash_limiter, abandon_on_cancel=True)
        except BaseException:
            cancel.set()
            raise

    def _record(self, digest: str, blob: pathlib.Path, result: _Result) -> None:
        if result.computed:
            self._computed += 1
        else:
            self._loaded += 1
        if result.chunks is None:
            if result.computed:  # log loudly once per detection, not once per request
                log.error("CORRUPT BLOB: %s hashes to %s, not to %s; it will not be served",
                          blob, result.mismatch, digest)
            self._corrupt[digest] = (result.size, result.mtime_ns)
            return
        self._corrupt.pop(digest, None)
        if result.save_error:
            log.warning("cannot save the chunk list of %s (%s); it will be computed again",
                        digest, result.save_error)
