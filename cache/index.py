"""The chunk index, in SQLite (WAL): the chunk list of every blob the cache holds or is
filling (kept after sealing: eviction works chunk by chunk), which chunks are present, when
each was last read, and which files in `blobs/` were sealed (or adopted) as they are.

Concurrency contract: one ChunkIndex per process, used only from the trio thread. Each call is
a short synchronous transaction (well under a millisecond for these row counts). With WAL and
synchronous=NORMAL a commit does not fsync; SQLite's automatic checkpoint (every ~1000 pages
of WAL) does, on the loop: a known, rare pause of one small fsync, accepted for now. So does
`mark_absent`, on purpose (synchronous=FULL): an eviction is durable before its hole is punched.
Durability order is the caller's job: a chunk is marked present only after its bytes were
fdatasync'ed, so a lost commit only means a chunk is fetched again, never a wrong byte.

A damaged index is moved aside and replaced by an empty one: the cache degrades to cold, it
never stops a pull or a mount.
"""

from __future__ import annotations

import logging
import os
import pathlib
import sqlite3
import time

from .chunks import Chunk

log = logging.getLogger(__name__)

# 4: chunks.present may be LANDED. A version-3 index has none, so it is taken as it is; a
# modelfs that knows only 3 sets a version-4 index aside rather than serve landed chunks.
# 5: a row is a fetch unit (units.py), with the registry chunks it groups in chunks.parts. A
# 3 or 4 index gets the column (NULL: a unit of one chunk, which all its rows are); a modelfs
# that knows only 4 sets a version-5 index aside rather than take a unit's digest for a chunk's.
FORMAT_VERSION = "5"
UPGRADABLE = {"3", "4"}
ABSENT, VERIFIED, LANDED = 0, 1, 2  # chunks.present

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS blobs (
    digest TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS sealed (
    digest TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ino INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    digest TEXT NOT NULL,
    idx INTEGER NOT NULL,
    start INTEGER NOT NULL,
    "end" INTEGER NOT NULL,
    chunk_digest TEXT,
    present INTEGER NOT NULL DEFAULT 0,  -- 0 absent, 1 verified, 2 landed (see mark_present)
    last_access REAL NOT NULL DEFAULT 0,
    parts BLOB,  -- a unit's registry chunks (units.py), NULL for a unit of one
    PRIMARY KEY (digest, idx)
) WITHOUT ROWID;
"""


class ChunkIndex:
    def __init__(self, path: os.PathLike | str, *, readonly: bool = False):
        self.path = pathlib.Path(path)
        if readonly:  # for `modelfs status` beside a live mount: no schema, no repair
            self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True,
                                       isolation_level=None)
            return
        try:
            self._db = self._open()
        except sqlite3.DatabaseError as exc:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            log.warning("chunk index %s is unreadable (%s); moved to %s, starting with an empty "
                        "cache index", self.path, exc, aside.name)
            for suffix in ("", "-wal", "-shm"):
                try:
                    os.replace(f"{self.path}{suffix}", f"{aside}{suffix}")
                except FileNotFoundError:
                    pass
            self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            row = db.execute("SELECT value FROM meta WHERE key='format'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('format', ?)", (FORMAT_VERSION,))
            elif row[0] in UPGRADABLE:
                columns = {r[1] for r in db.execute("PRAGMA table_info(chunks)")}
                if "parts" not in columns:
                    db.execute("ALTER TABLE chunks ADD COLUMN parts BLOB")
                db.execute("UPDATE meta SET value=? WHERE key='format'", (FORMAT_VERSION,))
            elif row[0] != FORMAT_VERSION:
                raise sqlite3.DatabaseError(f"index format {row[0]!r}, expected {FORMAT_VERSION}")
            db.execute("SELECT count(*) FROM chunks").fetchone()  # touch the pages once
        except BaseException:
            db.close()
            raise
        return db

    def close(self) -> None:
        self._db.close()

    def load(self, digest: str) -> tuple[int, list[Chunk], list[int]] | None:
        """(size, chunk list, presence of each chunk: ABSENT, VERIFIED or LANDED)."""
        row = self._db.execute("SELECT size FROM blobs WHERE digest=?", (digest,)).fetchone()
        if row is None:
            return None
        rows = self._db.execute(
            'SELECT idx, start, "end", chunk_digest, present, parts FROM chunks WHERE digest=? '
            "ORDER BY idx", (digest,)).fetchall()
        if [r[0] for r in rows] != list(range(len(rows))):
            return None
        chunks = [Chunk(r[1], r[2], r[3], r[5]) for r in rows]
        return row[0], chunks, [r[4] for r in rows]

    def replace(self, digest: str, size: int, chunks: list[Chunk]) -> None:
        """Record a fresh chunk list for `digest`, none of it present."""
        with self._transaction():
            self._db.execute("DELETE FROM chunks WHERE digest=?", (digest,))
            self._db.execute("INSERT OR REPLACE INTO blobs VALUES (?, ?, ?)",
                             (digest, size, time.time()))
            self._db.executemany(
                'INSERT INTO chunks (digest, idx, start, "end", chunk_digest, parts) '
                "VALUES (?,?,?,?,?,?)",
                [(digest, i, c.start, c.end, c.digest, c.parts) for i, c in enumerate(chunks)])

    def mark_present(self, digest: str, indexes: list[int], verified: bool = True) -> None:
        """Durable in the blob file: VERIFIED (its own digest or the whole blob's matched), or
        LANDED (a pull that checks the blob as a whole wrote it: it must be verified before
        anyone is served from it)."""
        now = time.time()
        with self._transaction():
            self._db.executemany(
                "UPDATE chunks SET present=?, last_access=? WHERE digest=? AND idx=?",
                [(VERIFIED if verified else LANDED, now, digest, i) for i in indexes])

    def forget(self, digest: str) -> None:
        with self._transaction():
            self._db.execute("DELETE FROM chunks WHERE digest=?", (digest,))
            self._db.execute("DELETE FROM blobs WHERE digest=?", (digest,))

    def record_sealed(self, digest: str, size: int, mtime_ns: int, ino: int) -> None:
        """`blobs/` file (as identified by size, mtime and inode) whose whole sha256 we checked."""
        with self._transaction():
            self._db.execute("INSERT OR REPLACE INTO sealed VALUES (?, ?, ?, ?)",
                             (digest, size, mtime_ns, ino))

    def sealed_as(self, digest: str) -> tuple[int, int, int] | None:
        row = self._db.execute("SELECT size, mtime_ns, ino FROM sealed WHERE digest=?",
                               (digest,)).fetchone()
        return tuple(row) if row else None

    def forget_sealed(self, digest: str) -> None:
        with self._transaction():
            self._db.execute("DELETE FROM sealed WHERE digest=?", (digest,))

    def mark_absent(self, digest: str, indexes: list[int]) -> None:
        """Durably (this commit is synced): the caller punches the chunks' holes next, and a
        power loss must never leave a chunk recorded over a hole."""
        self._db.execute("PRAGMA synchronous=FULL")
        try:
            with self._transaction():
                self._db.executemany("UPDATE chunks SET present=0 WHERE digest=? AND idx=?",
                                     [(digest, i) for i in indexes])
        finally:
            self._db.execute("PRAGMA synchronous=NORMAL")

    def touch(self, items: list[tuple[float, str, int]]) -> None:
        """Record reads: (time, digest, chunk index) each."""
        with self._transaction():
            self._db.executemany(
                "UPDATE chunks SET last_access=max(last_access, ?) WHERE digest=? AND idx=?",
                items)

    def victims(self, limit: int) -> list[tuple[str, int, int]]:
        """Present chunks, least recently used first: (digest, index, length)."""
        return self._db.execute(
            'SELECT digest, idx, "end" - start FROM chunks WHERE present>0 '
            "ORDER BY last_access, digest, idx LIMIT ?", (limit,)).fetchall()

    def present_bytes(self, digest: str, size: int) -> int:
        """Bytes of `digest`'s present chunks (0 if the index knows it at another size)."""
        row = self._db.execute(
            'SELECT sum(CASE WHEN c.present THEN c."end" - c.start ELSE 0 END) FROM blobs b '
            "JOIN chunks c ON c.digest = b.digest WHERE b.digest=? AND b.size=?",
            (digest, size)).fetchone()
        return row[0] or 0

    def usage(self) -> int:
        """Bytes of every present chunk, sealed blobs included."""
        row = self._db.execute('SELECT sum("end" - start) FROM chunks WHERE present>0').fetchone()
        return row[0] or 0

    def blob_summary(self) -> dict[str, tuple[int, int, float]]:
        """digest -> (size, bytes present, last access)."""
        rows = self._db.execute(
            'SELECT b.digest, b.size, coalesce(sum(CASE WHEN c.present THEN c."end" - c.start '
            "END), 0), coalesce(max(c.last_access), 0) FROM blobs b LEFT JOIN chunks c "
            "ON c.digest = b.digest GROUP BY b.digest").fetchall()
        return {r[0]: (r[1], r[2], r[3]) for r in rows}

    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self._transaction():
            self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def in_progress(self) -> list[str]:
        """Blobs with chunk rows that are not sealed: their files are in partial/."""
        return [r[0] for r in self._db.execute(
            "SELECT digest FROM blobs WHERE digest NOT IN (SELECT digest FROM sealed)")]

    def digests(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT digest FROM blobs")]

    def _transaction(self):
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def __enter__(self):
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb):
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")
