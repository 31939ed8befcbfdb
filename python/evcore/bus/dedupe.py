"""Processed-event ids kept with a consumer's effects, so a repeated event is dropped.

JetStream drops a repeated ``Nats-Msg-Id`` only inside its duplicate window; an outbox replay after
a long outage, or a redelivery after a lost ack, can outlast it. A consumer therefore stores each
event id in the same transaction as the effect of that event and skips ids it already has.
``ProcessedIds`` is that store on SQLite; pass your own connection to put the ids in your
transaction (``add(..., commit=False)``, then commit with your effects). Other stores (PostgreSQL)
implement the two-method :class:`evcore.bus.api.ProcessedIdStore` protocol.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from evcore.clock import Clock, WallClock

_SCHEMA = """
CREATE TABLE IF NOT EXISTS evcore_processed_ids (
    consumer TEXT NOT NULL,
    event_id TEXT NOT NULL,
    processed_at REAL NOT NULL,
    PRIMARY KEY (consumer, event_id)
) WITHOUT ROWID;
"""


class ProcessedIds:
    """Ids of events a named consumer has already applied."""

    def __init__(
        self,
        db: str | Path | sqlite3.Connection,
        consumer: str,
        *,
        clock: Clock | None = None,
    ) -> None:
        if not consumer:
            raise ValueError("ProcessedIds: consumer name must not be empty")
        self.consumer = consumer
        self._clock = clock or WallClock()
        if isinstance(db, sqlite3.Connection):
            self.db = db
            self._owned = False
        else:
            Path(db).parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(db, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            # Survives a process crash (SIGKILL); a power cut may lose the last commits.
            self.db.execute("PRAGMA synchronous=NORMAL")
            self._owned = True
        self.db.executescript(_SCHEMA)
        self.db.commit()

    def contains(self, event_id: str) -> bool:
        row = self.db.execute(
            "SELECT 1 FROM evcore_processed_ids WHERE consumer = ? AND event_id = ?",
            (self.consumer, event_id),
        ).fetchone()
        return row is not None

    def __contains__(self, event_id: object) -> bool:
        return isinstance(event_id, str) and self.contains(event_id)

    def add(self, event_id: str, *, commit: bool = True) -> bool:
        """Record ``event_id``; False when it was already there.

        ``commit=False`` leaves the commit to the caller, so the id lands atomically with the
        caller's effects."""
        cur = self.db.execute(
            "INSERT OR IGNORE INTO evcore_processed_ids(consumer, event_id, processed_at) "
            "VALUES (?,?,?)",
            (self.consumer, event_id, self._clock.now()),
        )
        if commit:
            self.db.commit()
        return cur.rowcount == 1

    def count(self) -> int:
        row = self.db.execute(
            "SELECT COUNT(*) FROM evcore_processed_ids WHERE consumer = ?", (self.consumer,)
        ).fetchone()
        return int(row[0])

    def prune(self, older_than_s: float) -> int:
        """Forget ids processed more than ``older_than_s`` ago (longer than any replay lags)."""
        cur = self.db.execute(
            "DELETE FROM evcore_processed_ids WHERE consumer = ? AND processed_at < ?",
            (self.consumer, self._clock.now() - older_than_s),
        )
        self.db.commit()
        return int(cur.rowcount)

    def close(self) -> None:
        if self._owned:
            self.db.close()
