"""The query log: the score of each recent query, for drift (drift.py). A file of its own, `queries.sqlite`,
beside the catalog: queries are reads, so they must never take the writer lock or touch the catalog (a
bundle's catalog is sealed by its manifest). Best effort: a log that cannot be written (a read-only folder,
a busy file) loses that entry and nothing else, and is never needed for a verdict.
"""
from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path

import numpy as np

QUERY_LOG = "queries.sqlite"
KEEP = 10_000  # entries kept: far more than any drift window

log = logging.getLogger("simsearch")


class QueryLog:
    def __init__(self, directory: Path):
        self.path = Path(directory) / QUERY_LOG

    def record(self, entries: list[tuple[int, float, bool, int, int]]) -> None:
        """Append (calibration id, score, above the drift line, the line's rank k, its calibration's N) entries
        of comparable, calibrated queries; drop the oldest past KEEP."""
        if not entries:
            return
        try:
            db = sqlite3.connect(self.path, timeout=0.5)
            try:
                with db:
                    db.execute("CREATE TABLE IF NOT EXISTS queries (id INTEGER PRIMARY KEY, at REAL NOT NULL, "
                               "calibration_id INTEGER NOT NULL, score REAL NOT NULL, above INTEGER NOT NULL, "
                               "k INTEGER NOT NULL, n_good INTEGER NOT NULL)")
                    db.executemany("INSERT INTO queries (at, calibration_id, score, above, k, n_good) "
                                   "VALUES (?, ?, ?, ?, ?, ?)",
                                   [(time.time(), c, float(s), int(a), int(k), int(n)) for c, s, a, k, n in entries])
                    db.execute("DELETE FROM queries WHERE id <= (SELECT MAX(id) FROM queries) - ?", (KEEP,))
            finally:
                db.close()
        except (sqlite3.Error, OSError) as exc:
            log.debug("query log %s not written: %s", self.path, exc)

    def recent(self, window: int) -> tuple[np.ndarray, int | None, int | None]:
        """The last `window` entries, newest first: (n,) bool above the drift line, and the newest entry's
        (k, N); empty and None when there is no log."""
        rows = []
        if self.path.is_file():
            try:
                db = sqlite3.connect(self.path.resolve().as_uri() + "?mode=ro", uri=True, timeout=0.5)
                try:
                    rows = db.execute("SELECT above, k, n_good FROM queries ORDER BY id DESC LIMIT ?",
                                      (int(window),)).fetchall()
                finally:
                    db.close()
            except sqlite3.Error as exc:
                log.debug("query log %s not read: %s", self.path, exc)
        above = np.asarray([r[0] for r in rows], dtype=bool)
        return (above, rows[0][1], rows[0][2]) if rows else (above, None, None)
