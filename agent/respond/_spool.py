"""The webhook's durable spool: SQLite in WAL mode under the state dir.

An alert is committed here before any attempt to send it and deleted only once the endpoint took it,
so a restart or a ``kill -9`` loses nothing. ``synchronous=NORMAL``: WAL commits reach the OS at once (a
process crash loses nothing) but are fsynced at checkpoints, so a power cut may lose the last few; FULL
cost 4 ms an alert here, too slow for an alert storm. Order is the
insertion order (``seq``); ``webhook_id`` is unique, so storing the same alert twice stores it once.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from agent.errors import DeliveryError

SPOOL_NAME = "webhook-spool.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pending (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    webhook_id TEXT NOT NULL UNIQUE,
    created_ns INTEGER NOT NULL,
    body BLOB NOT NULL,
    rejections INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS dead (
    seq INTEGER PRIMARY KEY,
    webhook_id TEXT NOT NULL,
    created_ns INTEGER NOT NULL,
    body BLOB NOT NULL,
    dead_ns INTEGER NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


_COLUMNS = {
    "pending": {"seq", "webhook_id", "created_ns", "body", "rejections"},
    "dead": {"seq", "webhook_id", "created_ns", "body", "dead_ns", "reason"},
    "meta": {"key", "value"},
}


def _check_columns(db: sqlite3.Connection) -> None:
    """CREATE TABLE IF NOT EXISTS keeps a table of the same name with other columns (another program's file,
    a damaged one): found here, as one error, not as a crash at the first alert."""
    for table, wanted in _COLUMNS.items():
        have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        if not wanted <= have:
            raise sqlite3.DatabaseError(f"table {table} lacks column(s) {', '.join(sorted(wanted - have))}")


@dataclass(frozen=True, slots=True)
class SpooledAlert:
    seq: int
    webhook_id: str
    created_ns: int
    body: bytes
    rejections: int


@dataclass(frozen=True, slots=True)
class DeadLetter:
    seq: int
    webhook_id: str
    created_ns: int
    body: bytes
    dead_ns: int
    reason: str


@dataclass(frozen=True, slots=True)
class SpoolStatus:
    """What a spool holds, read without its lock (the agent may be delivering from it)."""

    pending: int
    oldest_created_ns: int | None
    dead_letters: int
    overflowed: int
    meta: dict[str, str]


def peek(state_dir: str | os.PathLike[str]) -> SpoolStatus:
    """Read a spool's status while its owner (the running agent) holds it: a read-only SQLite connection,
    which WAL mode lets run beside the writer. Changing the spool still needs its lock."""
    path = Path(state_dir) / SPOOL_NAME
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10.0)
        try:
            pending, oldest = db.execute("SELECT COUNT(*), MIN(created_ns) FROM pending").fetchone()
            dead = db.execute("SELECT COUNT(*) FROM dead").fetchone()[0]
            meta = {str(k): str(v) for k, v in db.execute("SELECT key, value FROM meta")}
        finally:
            db.close()
    except sqlite3.Error as err:
        raise DeliveryError(f"the webhook spool is unreadable: {err}", path=str(path)) from None
    return SpoolStatus(int(pending), None if oldest is None else int(oldest), int(dead),
                       int(meta.get("overflowed", 0) or 0), meta)


class Spool:
    """A bounded FIFO of alert bodies that survives crashes. One process at a time (a lock file)."""

    def __init__(self, state_dir: str | os.PathLike[str], max_rows: int = 100_000) -> None:
        self.path = Path(state_dir) / SPOOL_NAME
        self.max_rows = max_rows
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lockfile = open(f"{self.path}.lock", "w")  # noqa: SIM115 - held for the spool's life
        except OSError as err:
            raise DeliveryError(
                f"cannot create the webhook spool: {err.strerror}", path=str(self.path)
            ) from None
        try:
            fcntl.flock(self._lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lockfile.close()
            raise DeliveryError(
                "the webhook spool is in use by another process", path=str(self.path)
            ) from None
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            _check_columns(self._db)
            self._depth = int(self._db.execute("SELECT COUNT(*) FROM pending").fetchone()[0])
        except sqlite3.DatabaseError as err:
            self._lockfile.close()
            raise DeliveryError(f"the webhook spool is unreadable: {err}", path=str(self.path)) from None

    @property
    def depth(self) -> int:
        return self._depth

    def put(self, webhook_id: str, body: bytes) -> bool:
        """Store one alert; False when the spool is full (the caller counts and reports the overflow)."""
        with self._lock:
            if self._depth >= self.max_rows:
                self._bump_locked("overflowed", 1)
                return False
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO pending (webhook_id, created_ns, body) VALUES (?, ?, ?)",
                (webhook_id, time.time_ns(), body),
            )
            self._depth += cursor.rowcount
            return True

    def head(self) -> SpooledAlert | None:
        """The oldest alert not yet delivered."""
        with self._lock:
            row = self._db.execute(
                "SELECT seq, webhook_id, created_ns, body, rejections FROM pending ORDER BY seq LIMIT 1"
            ).fetchone()
        return None if row is None else SpooledAlert(row[0], row[1], row[2], bytes(row[3]), row[4])

    def delete(self, seq: int) -> None:
        with self._lock:
            self._depth -= self._db.execute("DELETE FROM pending WHERE seq = ?", (seq,)).rowcount

    def reject(self, seq: int) -> int:
        """Count one rejection of an alert by the endpoint; the new count."""
        with self._lock:
            self._db.execute("UPDATE pending SET rejections = rejections + 1 WHERE seq = ?", (seq,))
            row = self._db.execute("SELECT rejections FROM pending WHERE seq = ?", (seq,)).fetchone()
        return 0 if row is None else int(row[0])

    def bury(self, seq: int, reason: str) -> None:
        """Move an alert the endpoint keeps rejecting to the dead letters (kept, never sent again)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT OR REPLACE INTO dead (seq, webhook_id, created_ns, body, dead_ns, reason) "
                    "SELECT seq, webhook_id, created_ns, body, ?, ? FROM pending WHERE seq = ?",
                    (time.time_ns(), reason, seq),
                )
                self._depth -= self._db.execute("DELETE FROM pending WHERE seq = ?", (seq,)).rowcount
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def dead_letters(self) -> list[DeadLetter]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, webhook_id, created_ns, body, dead_ns, reason FROM dead ORDER BY seq"
            ).fetchall()
        return [DeadLetter(r[0], r[1], r[2], bytes(r[3]), r[4], r[5]) for r in rows]

    def requeue_dead(self) -> int:
        """Put every dead letter back in line (in its original place); how many."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                moved = self._db.execute(
                    "INSERT OR IGNORE INTO pending (seq, webhook_id, created_ns, body) "
                    "SELECT seq, webhook_id, created_ns, body FROM dead"
                ).rowcount
                self._db.execute("DELETE FROM dead")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._depth += moved
        return moved

    def _bump_locked(self, key: str, n: int) -> None:
        self._db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + ?",
            (key, str(n), n),
        )

    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str | None) -> None:
        with self._lock:
            if value is None:
                self._db.execute("DELETE FROM meta WHERE key = ?", (key,))
            else:
                self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    @property
    def overflowed(self) -> int:
        """Alerts refused because the spool was full, over the spool's whole life."""
        return int(self.get_meta("overflowed") or 0)

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._lockfile.close()
