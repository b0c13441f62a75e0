"""Checks that a cache's index, its files and (for an open BlobCache) its in-memory chunk states
agree: the invariants the tests check at their end (tests/conftest.py) and anyone may check on
a cache directory.

`check_invariants(cache)` for a BlobCache open in this process (trio thread, at a checkpoint:
it never awaits, so it sees one consistent state); `check_cache_dir(path)` for a cache directory
no process has open (after an unmount, a kill -9, a `BlobCache.close`). Both raise
InvariantBroken, listing every problem found (blob, chunk, what is wrong), or return None.
The live check reads private state of the cache's objects (this package's), never changes it.

What is checked (both):
- chunk rows: contiguous, and a chunk list that tiles the blob (invariant 4);
- every chunk recorded present (VERIFIED or LANDED) lies in data of its blob's file, never over
  a hole (SEEK_DATA/SEEK_HOLE: metadata only, every chunk, whatever the size), and its bytes
  match its digest (LANDED ones too: the seal or `verify_landed` will check them, and a chunk
  recorded at all must hold its bytes). Reading is bounded: at most `verify_bytes` (64 MiB) of
  chunks per check are read back and hashed; beyond that an evenly spread sample of the
  chunks is (every k-th in file order), so a 1 GiB cache costs what a 64 MiB one does;
- a blob sealed in `blobs/` (BlobCache.is_sealed: the `sealed` row matches the file's size,
  mtime and inode) has every chunk row present (the budget counts it by its rows) and no
  partial file beside it; an adopted one (rows without digests) is hashed whole, within the
  same byte bound;
- `blobs/` holds only sealed blobs: any other file there is reported, unless `unadopted=True`
  (a test put it there to be adopted: the cache hashes such a file before trusting it,
  `adopt_sealed`); even then it must be a regular file named `sha256-<64 hex>`;
- `partial/` holds only files of blobs the index has rows for, of the blob's size;
- the files hold no more than the chunks the cache counts: a file's allocated blocks
  (st_blocks) are at most the blocks its counted chunks touch, plus one block per chunk
  boundary that is not block-aligned (punching a chunk frees only the blocks wholly inside it,
  so a block shared by two evicted chunks stays), plus its extent tree (2 blocks and one per
  256 data extents), plus what `leftover` allows (below);
- with a cap set, the bytes on disk (st_blocks of partial/ and sealed blobs/ files) are at
  most cap + the slack just described + `over_cap` + (live) what cannot be evicted right now:
  pinned chunks, chunks of a blob being sealed or of a sealer holding its lock, pending writes,
  and for each blob writing a chunk its largest chunk (reserved before its bytes land).
  `over_cap` is the caller's: the budget evicts only when it makes room, so an excess left by
  chunks that were pinned then outlives their pins until the next write (a mount's readers pin
  at most its --max-inflight).
- chunks written but never recorded may stay in the file of a blob nobody has open (a crash, a
  close, a released blob; the next open punches them, `_free_absent`): up to `leftover` bytes
  (check_cache_dir; None: any; a clean unmount records everything it wrote, so `clean=True`
  allows none). They count against the cap like any other bytes on disk.

Live only (check_invariants), the in-memory states of the blobs open in the cache (one state per
chunk, cache/chunkstate.py: so a chunk is never both readable and landed, nor present and not in
the file, by construction):
- present in memory (RECORDED or LANDED) => recorded in the index, as LANDED exactly when
  landed in memory (both change in the same trio step, so nothing is allowed here);
- recorded in the index but not present in memory: only LANDED, with the chunk no longer
  landed in memory: `write_chunk` replaced the unchecked bytes by checked ones and their commit
  records them VERIFIED (until then the row says "check before serving", so nothing unchecked
  can be served; the bytes are in flux and not read);
- readable but not present is normal (verified, written or pending, not yet durable or
  recorded); such chunks that are not pending are in the file and must hold their bytes too;
  an open blob with no rows at all is allowed only while it claims no chunk (a discarded blob);
- the cache's `unrecorded.held` is exactly the sum of the budget shares its blobs' chunks
  hold (open and retired ones: a retired blob's commits may still run), and only chunks in the
  file and not recorded hold one;
- `budget.used` is what DiskBudget._resync would count (the index's present bytes plus the
  chunks in the files of open blobs but not recorded) plus the unrecorded chunks still whole in
  the files of blobs no longer open (counted when written, on disk until reopened). Transiently
  it may lag by the pending writes (counted when their write reserves) and lead by the chunk
  each blob is writing; while an eviction round holds the budget's lock it is half counted (as
  _resync refuses to count then) and is not checked. `budget_exact=False` allows it to count
  more (never less) after the paths that give bytes back without telling it.
"""

from __future__ import annotations

import bisect
import errno
import hashlib
import os
import pathlib
import re
import stat as stat_mod

from .chunks import BadChunkList, Chunk, check_coverage
from .digests import blob_filename
from .index import ABSENT, LANDED, VERIFIED, ChunkIndex
from .partial import partial_name
from .units import digest_of

VERIFY_BYTES = 64 << 20  # bytes of chunks read back and hashed per check, at most
_SHOWN = 25  # problems listed in the message (all are in .problems)
_NAMES = {ABSENT: "ABSENT", VERIFIED: "VERIFIED", LANDED: "LANDED"}


class InvariantBroken(AssertionError):
    """The cache's index, files or in-memory states disagree; `problems` lists how."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        shown = problems[:_SHOWN]
        more = f"\n  ... and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
        super().__init__(f"{len(problems)} cache invariant(s) broken:\n  "
                         + "\n  ".join(shown) + more)


def check_invariants(cache, *, unadopted: bool = False, over_cap: int = 0,
                     budget_exact: bool = True, verify_bytes: int = VERIFY_BYTES) -> None:
    """Check a BlobCache open in this process (see the module docstring). `budget_exact=False`:
    `budget.used` may count more than the exact figure (never less): after paths that give
    bytes back without telling the budget, which its next recount corrects (a discarded blob,
    landed chunks dropped: PartialBlob.discard and LandedChecks.drop)."""
    checker = _Checker(cache.root, cache.index, verify_bytes, unadopted)
    checker.run(live=cache, over_cap=over_cap, cap=cache.budget.cap, leftover=None,
                budget_exact=budget_exact)


def check_cache_dir(path: os.PathLike | str, *, unadopted: bool = False, clean: bool = False,
                    crashed: bool = False, leftover: int | None = None,
                    over_cap: int | None = None, verify_bytes: int = VERIFY_BYTES) -> None:
    """Check a cache directory no process has open (see the module docstring). `clean`: it
    was closed by a clean unmount, which records every chunk it wrote. `crashed`: its process
    may have been killed between two steps that the next open completes: a blob renamed into
    blobs/ before the sealed table has it (it is hashed before it is trusted, as `unadopted`
    allows), a partial file whose rows were forgotten before it was unlinked (the next open
    removes it, BlobCache._clean_leftovers). `over_cap`: None skips the cap check, else the
    bytes allowed over the cap the index remembers (`cache_max`)."""
    root = pathlib.Path(path)
    index = ChunkIndex(root / "index.sqlite", readonly=True)
    try:
        cap = index.get_meta("cache_max")
        checker = _Checker(root, index, verify_bytes, unadopted or crashed)
        checker.orphans_allowed = crashed
        checker.run(live=None, over_cap=over_cap, cap=int(cap) if cap else None,
                    leftover=0 if clean else leftover)
    finally:
        index.close()


def _short(digest: str) -> str:
    return digest[:19] + "…"


def _where(digest: str, i: int, chunk: Chunk) -> str:
    return f"blob {_short(digest)} chunk {i} (bytes {chunk.start}-{chunk.end - 1})"


def _data_runs(fd: int, size: int) -> list[tuple[int, int]]:
    """The file's data extents as [start, end) pairs, in order (SEEK_DATA/SEEK_HOLE)."""
    runs, pos = [], 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole from pos to the end
                break
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        if end <= start:
            break
        runs.append((start, end))
        pos = end
    return runs


def _hole_in(runs: list[tuple[int, int]], starts: list[int], lo: int, hi: int) -> int | None:
    """The first offset in [lo, hi) outside every data run, or None."""
    k = bisect.bisect_right(starts, lo) - 1
    pos = lo
    while pos < hi:
        if k < 0 or k >= len(runs) or runs[k][1] <= pos or runs[k][0] > pos:
            return pos
        pos = runs[k][1]
        k += 1
    return None


def _blocks(lo: int, hi: int, bs: int) -> range:
    return range(lo // bs, -(-hi // bs))


class _File:
    """One blob file as found on disk."""

    def __init__(self, path: pathlib.Path, size: int):
        self.path = path
        fd = os.open(path, os.O_RDONLY)
        try:
            st = os.fstat(fd)
            self.st_size, self.allocated = st.st_size, st.st_blocks * 512
            self.bs = max(4096, st.st_blksize)
            self.runs = _data_runs(fd, max(size, st.st_size))
        finally:
            os.close(fd)
        self.starts = [r[0] for r in self.runs]


class _Checker:
    def __init__(self, root: pathlib.Path, index: ChunkIndex, verify_bytes: int,
                 unadopted: bool):
        self.root, self.index = pathlib.Path(root), index
        self.blobs_dir, self.partial_dir = self.root / "blobs", self.root / "partial"
        self.verify_bytes, self.unadopted = verify_bytes, unadopted
        self.problems: list[str] = []
        self.to_read: list[tuple[str, pathlib.Path, int, Chunk, str]] = []  # (digest, file, i..)
        self.whole: list[tuple[str, pathlib.Path, int]] = []  # adopted sealed blobs to hash
        self.disk = 0  # allocated bytes of the cache's blob files
        self.slack = 0  # of those, what block rounding and extent trees allow beyond chunks
        self.leftover = 0  # allocated in absent chunks of blobs nobody has open
        self.unrecorded_closed = 0  # bytes of such chunks still whole in their files
        self.orphans_allowed = False  # partial files without rows (a crash before the unlink)

    def fail(self, text: str) -> None:
        self.problems.append(text)

    # -- the whole check ------------------------------------------------------------------------

    def run(self, *, live, over_cap, cap, leftover, budget_exact=True) -> None:
        rows = self._rows()
        self._blobs_dir()
        self._partial_dir(rows)
        open_blobs = {} if live is None else dict(live._open)
        for digest, (size, chunks, present) in rows.items():
            self._blob(digest, size, chunks, present, open_blobs.get(digest))
        for digest, blob in open_blobs.items():
            if digest not in rows:
                self._open_without_rows(digest, blob)
        self._verify_bytes()
        if leftover is not None and self.leftover > leftover:
            self.fail(f"files hold {self.leftover} bytes in chunks the index does not record, "
                      f"at most {leftover} allowed"
                      + (" (a clean unmount records every chunk it wrote)" if not leftover
                         else ""))
        if live is not None:
            self._budget(live, budget_exact)
            self._shares(live)
        if cap is not None and over_cap is not None:
            allowed = cap + over_cap + self.slack
            if live is not None:
                allowed += self._unevictable(live)
            if self.disk > allowed:
                self.fail(f"cap exceeded: {self.disk} bytes on disk, cap {cap}, allowed up to "
                          f"{allowed} (over_cap {over_cap}, slack {self.slack}"
                          + (", plus what cannot be evicted now)" if live is not None else ")"))
        if self.problems:
            raise InvariantBroken(self.problems)

    def _rows(self) -> dict[str, tuple[int, list[Chunk], list[int]]]:
        rows = {}
        for digest in self.index.digests():
            stored = self.index.load(digest)
            if stored is None:
                self.fail(f"blob {_short(digest)}: its chunk rows are not numbered 0..n-1")
                continue
            size, chunks, present = stored
            try:
                check_coverage(chunks, size)
            except BadChunkList as exc:
                self.fail(f"blob {_short(digest)}: its chunk rows do not tile it: {exc}")
                continue
            rows[digest] = stored
        return rows

    def _sealed(self, digest: str, size: int) -> bool:
        """BlobCache.is_sealed, from the index alone."""
        try:
            st = (self.blobs_dir / blob_filename(digest)).stat()
        except FileNotFoundError:
            return False
        return self.index.sealed_as(digest) == (size, st.st_mtime_ns, st.st_ino) == (
            st.st_size, st.st_mtime_ns, st.st_ino)

    # -- the directories ------------------------------------------------------------------------

    def _blobs_dir(self) -> None:
        for path in sorted(self.blobs_dir.iterdir()) if self.blobs_dir.exists() else []:
            name = path.name
            hexpart = name[len("sha256-"):]
            well_named = name.startswith("sha256-") and len(hexpart) == 64 and all(
                ch in "0123456789abcdef" for ch in hexpart)
            if not stat_mod.S_ISREG(path.lstat().st_mode) or not well_named:
                self.fail(f"blobs/{name}: not a blob file (a regular file named sha256-<hex>)")
                continue
            digest = "sha256:" + hexpart
            sealed = self.index.sealed_as(digest)
            if sealed is not None and self._sealed(digest, sealed[0]):
                continue
            if not self.unadopted:
                why = "not in the sealed table" if sealed is None else \
                    "its size, mtime or inode differ from the sealed table's"
                self.fail(f"blobs/{name}: not a sealed blob ({why})")

    def _partial_dir(self, rows) -> None:
        known = {partial_name(d): d for d in self.index.digests()}
        for path in sorted(self.partial_dir.iterdir()) if self.partial_dir.exists() else []:
            digest = known.get(path.name)
            if digest is None:
                if self.orphans_allowed and re.fullmatch(r"sha256-[0-9a-f]{64}\.partial",
                                                         path.name):
                    continue
                self.fail(f"partial/{path.name}: no blob of the index has this file")
            elif digest in rows and self._sealed(digest, rows[digest][0]):
                self.fail(f"partial/{path.name}: blob {_short(digest)} is sealed in blobs/ too")

    # -- one blob -------------------------------------------------------------------------------

    def _blob(self, digest, size, chunks, present, blob) -> None:
        sealed_here = self._sealed(digest, size)
        partial = self.partial_dir / partial_name(digest)
        final = self.blobs_dir / blob_filename(digest)
        if sealed_here:
            path = final
        elif partial.exists():
            path = partial
        elif self.unadopted and final.exists():
            path = final  # sealed once, changed since: hashed again before it is trusted
        else:
            path = None
        if sealed_here:
            absent = [i for i, p in enumerate(present) if not p]
            if absent:
                self.fail(f"blob {_short(digest)} is sealed in blobs/ but {len(absent)} of its "
                          f"chunk rows are not present (first: chunk {absent[0]}): the budget "
                          f"does not count them")
        if blob is not None and blob.sealed and not sealed_here:
            self.fail(f"blob {_short(digest)} is sealed in memory, but blobs/ does not hold it "
                      f"as sealed")

        # Which chunks must hold their bytes, and which the budget counts as on disk.
        if blob is not None:
            expect, counted = self._memory(digest, chunks, present, blob)
        else:
            expect = [i for i, p in enumerate(present) if p]
            counted = set(expect)
        if path is None:
            if expect:
                self.fail(f"blob {_short(digest)}: {len(expect)} chunks recorded present "
                          f"(first: chunk {expect[0]}) but no file holds the blob")
            return
        try:
            f = _File(path, size)
        except FileNotFoundError:
            return  # (unlinked meanwhile: only in a live cache, by a thread we do not wait for)
        where = path.relative_to(self.root)
        if f.st_size != size:
            self.fail(f"{where}: {f.st_size} bytes, the blob has {size}")
        for i in expect:
            chunk = chunks[i]
            what = f"recorded {_NAMES.get(present[i], present[i])}" if present[i] else \
                "written (not recorded yet)"
            hole = _hole_in(f.runs, f.starts, chunk.start, chunk.end)
            if hole is not None:
                self.fail(f"{_where(digest, i, chunk)}: {what} but {where} has a hole at "
                          f"offset {hole}")
            elif chunk.digest is not None:
                self.to_read.append((digest, path, i, chunk, what))
        if sealed_here and expect and all(c.digest is None for c in chunks):
            self.whole.append((digest, path, size))
        self._allocation(digest, chunks, counted, f, where, open_now=blob is not None)

    def _memory(self, digest, chunks, present, blob) -> tuple[list[int], set[int]]:
        """Compare an open blob's states with its rows; returns the chunks that must hold
        their bytes in the file and the chunks the budget counts as on disk."""
        expect, counted = [], set()
        if len(blob.chunks) != len(chunks) or blob.chunks != chunks:
            self.fail(f"blob {_short(digest)}: the open blob's chunk list is not the index's")
            recorded = [i for i, p in enumerate(present) if p]
            return recorded, set(recorded)
        states = blob._states
        for i, chunk in enumerate(chunks):
            mem_present, landed = states.is_present(i), states.is_landed(i)
            in_file = states.in_file(i)
            row = present[i]
            at = _where(digest, i, chunk)
            if mem_present:
                if not row:
                    self.fail(f"{at}: present in memory but not recorded in the index")
                elif (row == LANDED) != landed:
                    self.fail(f"{at}: recorded {_NAMES.get(row, row)} but "
                              f"{'landed' if landed else 'verified'} in memory")
            elif row and not (row == LANDED and not landed):
                self.fail(f"{at}: recorded {_NAMES.get(row, row)} in the index but not present "
                          f"in memory")
            if mem_present and row:
                expect.append(i)
            elif in_file and not mem_present and not states.is_pending(i):
                expect.append(i)  # written, waiting for its sync: in the file already
            if row or in_file:
                counted.add(i)  # (pending ones too: about to be in the file)
        return expect, counted

    def _open_without_rows(self, digest, blob) -> None:
        claimed = [i for i in range(len(blob.chunks)) if blob._states.in_file(i)]
        if claimed:
            self.fail(f"blob {_short(digest)} is open with chunks in memory (first: chunk "
                      f"{claimed[0]}) but the index has no rows for it")

    def _allocation(self, digest, chunks, counted, f: _File, where, open_now: bool) -> None:
        """Allocated blocks against the blocks of the chunks the cache counts (see the module
        docstring), and what lies in chunks it does not count."""
        bs = f.bs
        used_blocks = 0
        last = -1  # highest block already counted
        for i in sorted(counted):
            blocks = _blocks(chunks[i].start, chunks[i].end, bs)
            first = max(blocks.start, last + 1)
            if blocks.stop > first:
                used_blocks += blocks.stop - first
                last = blocks.stop - 1
        unaligned = sum(1 for c in chunks if c.end % bs)
        extents = 2 + len(f.runs) // 256
        counted_bytes = sum(chunks[i].length for i in counted)
        bound = (used_blocks + unaligned + extents) * bs
        stray = 0
        if not open_now:
            # chunks written but never recorded (a crash, a close, a release): the data in
            # whole blocks of chunks the index calls absent; and the chunks that are data
            # throughout, which the budget counted when they were written
            for i, chunk in enumerate(chunks):
                if i in counted:
                    continue
                lo = -(-chunk.start // bs) * bs
                hi = chunk.end // bs * bs
                if hi > lo:
                    stray += self._data_between(f, lo, hi)
                # (a chunk smaller than a block cannot tell: its punch leaves its blocks, as
                # data; only tests make such chunks)
                if _hole_in(f.runs, f.starts, chunk.start, chunk.end) is None:
                    self.unrecorded_closed += chunk.length
        self.leftover += stray
        if f.allocated > bound + stray:
            self.fail(f"{where}: {f.allocated} bytes allocated, but the chunks the cache counts "
                      f"({counted_bytes} bytes) allow at most {bound + stray}: bytes on disk "
                      f"that nothing accounts for")
        self.disk += f.allocated
        self.slack += max(0, bound - counted_bytes)

    @staticmethod
    def _data_between(f: _File, lo: int, hi: int) -> int:
        k = max(0, bisect.bisect_right(f.starts, lo) - 1)
        total = 0
        while k < len(f.runs) and f.runs[k][0] < hi:
            s, e = f.runs[k]
            total += max(0, min(e, hi) - max(s, lo))
            k += 1
        return total

    # -- reading back -----------------------------------------------------------------------------

    def _verify_bytes(self) -> None:
        # every k-th chunk in file order, so that about verify_bytes are read, never more
        total = sum(c.length for _, _, _, c, _ in self.to_read)
        step = max(1, -(-total // self.verify_bytes)) if self.verify_bytes > 0 else 0
        chosen, budget = [], self.verify_bytes
        for item in self.to_read[::step] if step else []:
            if item[3].length <= budget:
                chosen.append(item)
                budget -= item[3].length
        fds: dict[pathlib.Path, int] = {}
        try:
            for digest, path, i, chunk, what in chosen:
                fd = fds.get(path)
                if fd is None:
                    try:
                        fd = fds[path] = os.open(path, os.O_RDONLY)
                    except FileNotFoundError:
                        continue
                data = os.pread(fd, chunk.length, chunk.start)
                if digest_of(chunk, data) != chunk.digest:
                    self.fail(f"{_where(digest, i, chunk)}: {what}, but the bytes in "
                              f"{path.relative_to(self.root)} do not match its digest")
            for digest, path, size in self.whole:
                if size > budget:
                    continue
                budget -= size
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    while piece := f.read(8 << 20):
                        h.update(piece)
                if "sha256:" + h.hexdigest() != digest:
                    self.fail(f"{path.relative_to(self.root)}: sealed, but does not hash to its "
                              f"digest")
        finally:
            for fd in fds.values():
                os.close(fd)

    # -- the budget (live) ----------------------------------------------------------------------

    def _budget(self, cache, exact: bool) -> None:
        budget = cache.budget
        if budget._lock.locked():
            return  # an eviction round is half counted (DiskBudget.resync waits for it)
        unrecorded = pending = writing = 0
        for blob in cache.open_blobs():
            for i, chunk in enumerate(blob.chunks):
                if blob.in_file(i) and not blob.present[i]:
                    unrecorded += chunk.length
            pending += sum(c.length for i, c in enumerate(blob.chunks)
                           if blob._states.is_pending(i))
            if blob._io.lock.locked():
                writing += max(c.length for c in blob.chunks)
        # (+ chunks left unrecorded in the files of blobs no longer open: counted when they
        # were written, on disk until the blob is opened again, _free_absent)
        expected = self.index.usage() + unrecorded + self.unrecorded_closed
        if not expected - pending <= budget.used <= (expected + writing if exact else budget.used):
            self.fail(f"budget.used is {budget.used}, but the index's present chunks and the "
                      f"chunks written but not recorded make {expected} (off by "
                      f"{budget.used - expected:+d}; allowed: -{pending} for pending writes, "
                      f"+{writing} for writes under way)")

    def _shares(self, cache) -> None:
        """The unrecorded budget against the shares the chunks hold (chunkstate.py)."""
        shares = 0
        for blob in [*cache._open.values(), *cache._retired]:
            states = blob._states
            for i, chunk in enumerate(blob.chunks):
                share = states.share(i)
                shares += share
                if share and not states.unrecorded(i):
                    self.fail(f"{_where(blob.digest, i, chunk)}: holds {share} bytes of the "
                              f"unrecorded budget but is {states.state(i).value}")
        if cache.unrecorded.held != shares:
            self.fail(f"unrecorded.held is {cache.unrecorded.held}, but the chunks' shares "
                      f"make {shares}")

    def _unevictable(self, cache) -> int:
        """Bytes the budget could not evict right now (see the module docstring)."""
        budget, total = cache.budget, 0
        for digest, blob in cache._open.items():
            largest = max(c.length for c in blob.chunks)
            for i, chunk in enumerate(blob.chunks):
                if not blob.in_file(i):
                    continue
                if budget.pinned(digest, i) or blob.sealing or blob._states.is_pending(i) or \
                        blob._sealer.may_be_reading(i):
                    total += chunk.length
            if blob._io.lock.locked():
                total += largest
        for digest, i in list(budget._pins):  # pins of blobs not open as a PartialBlob
            if digest in cache._open:
                continue
            stored = self.index.load(digest)
            if stored is not None:
                _, chunks, present = stored
                total += sum(c.length for k, (c, p) in enumerate(zip(chunks, present))
                             if p and (i is None or k == i))
        return total
