"""Stage 2 kept across backend restarts: an SQLite database in WAL mode.

Stage 2 is host state the guest cannot rebuild (QEMU never replays it): the
RAM regions adopted, the mapped ranges with their permissions, the
generation. It changes only over QMP (``stage2-map``/``-unmap``/``-protect``,
an armed unmap when it fires) and when QEMU hands over guest RAM, never on the
translation path, so a transaction per change is cheap enough and gives
atomicity for free: a process killed mid-change leaves the change saved or not,
never half of it.

The database holds a base (a snapshot: the RAM regions, the merged ranges, the
generation) and the log of every change since, one row each (:class:`Stage2Change`).
A backend started on it restores the base and replays the log: the builder is
deterministic, so it gets the same tables and generation as before. When the
log is long (:data:`COMPACT_AT` rows), at a start or while the backend runs,
a new base is written and the log emptied (the snapshot walks every leaf: too
slow for each change, cheap once in thousands), so that neither the database
nor a restart's replay grows with the backend's uptime.

``synchronous=NORMAL``: a committed change survives the process being killed
(SIGKILL included: the WAL is in the page cache); a host crash or power loss
may lose the last changes (the database stays consistent), but takes the guest
with it anyway.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

from ..vmsa import Perm
from .stage2 import Stage2, Stage2Change, Stage2Error, Stage2Range

log = logging.getLogger(__name__)

FILE_NAME = "stage2.sqlite"
"""The database's name in a backend's state directory."""
COMPACT_AT = 4096
"""Rows of log past which a new base is written (at a start, or after a change)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS ram (gpa INTEGER PRIMARY KEY, size INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS ranges (ipa INTEGER PRIMARY KEY, pa INTEGER NOT NULL,
                                   size INTEGER NOT NULL, perm INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS log (seq INTEGER PRIMARY KEY, op TEXT NOT NULL,
                                ipa INTEGER NOT NULL, size INTEGER NOT NULL,
                                pa INTEGER NOT NULL, perm INTEGER NOT NULL);
"""


class Stage2Store:
    """The saved stage 2 of one guest in ``path`` (created if missing)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)
        self.commits = 0
        self.compactions = 0
        self._stage2: Stage2 | None = None
        self._log_rows = 0

    @classmethod
    def in_dir(cls, state_dir: Path) -> Stage2Store:
        """The store of a backend's state directory (made if missing)."""
        state_dir.mkdir(parents=True, exist_ok=True)
        return cls(state_dir / FILE_NAME)

    def attach(self, stage2: Stage2) -> bool:
        """Restores ``stage2`` (fresh) from the store if it holds one, then saves every
        later change of it. True if it was restored; False if the store was empty
        (then its base is ``stage2`` as it is now). Raises Stage2Error if the saved
        stage 2 has another IPA or output size."""
        meta = dict(self.db.execute("SELECT key, value FROM meta").fetchall())
        restored = "generation" in meta
        if restored:
            for key, mine in (("ias", stage2.ias), ("oas", stage2.config.oas)):
                if meta.get(key) != mine:
                    raise Stage2Error(f"{self.path}: the saved stage 2 has {key} "
                                      f"{meta.get(key)}, this one {mine}")
            ram = self.db.execute("SELECT gpa, size FROM ram ORDER BY gpa").fetchall()
            rows = self.db.execute("SELECT ipa, pa, size, perm FROM ranges ORDER BY ipa")
            stage2.restore(ram, [Stage2Range(i, p, s, Perm(f)) for i, p, s, f in rows],
                           meta["generation"])
            changes = self.db.execute(
                "SELECT op, ipa, size, pa, perm FROM log ORDER BY seq").fetchall()
            for change in changes:
                stage2.replay(Stage2Change(*change))
            log.info("stage 2 restored from %s: base generation %d and %d changes, "
                     "generation %d", self.path, meta["generation"], len(changes),
                     stage2.generation)
            self._log_rows = len(changes)
            if len(changes) >= COMPACT_AT:
                self.compact(stage2)
        else:
            self.compact(stage2)
        self._stage2 = stage2
        stage2.on_change = self.record
        return restored

    def record(self, change: Stage2Change) -> None:
        """Appends ``change`` to the log (one transaction); Stage2Error if it cannot."""
        try:
            self.db.execute("INSERT INTO log (op, ipa, size, pa, perm) VALUES (?, ?, ?, ?, ?)",
                            change)
        except sqlite3.Error as e:
            log.error("stage 2 change %s not saved in %s: %s", change, self.path, e)
            raise Stage2Error(f"the change was made but not saved in {self.path}: {e}"
                              ) from None
        self.commits += 1
        self._log_rows += 1
        if self._log_rows >= COMPACT_AT and self._stage2 is not None:
            try:  # the change is saved already; a failed compaction only waits
                self.compact(self._stage2)
            except sqlite3.Error as e:
                log.error("stage 2 in %s not compacted: %s", self.path, e)

    def compact(self, stage2: Stage2) -> None:
        """Makes ``stage2`` as it is now the base, and empties the log."""
        rows = [(r.ipa, r.pa, r.size, int(r.perm)) for r in stage2.ranges()]
        with self.db:  # one transaction
            self.db.execute("BEGIN")
            for table in ("ranges", "ram", "log"):
                self.db.execute(f"DELETE FROM {table}")
            self.db.executemany("INSERT INTO ranges VALUES (?, ?, ?, ?)", rows)
            self.db.executemany("INSERT INTO ram VALUES (?, ?)", stage2.ram)
            self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                [("ias", stage2.ias), ("oas", stage2.config.oas),
                                 ("generation", stage2.generation)])
        self._log_rows = 0
        self.compactions += 1

    def close(self) -> None:
        """Closes the database (what was committed stays)."""
        self.db.close()
