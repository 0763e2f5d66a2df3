"""A content-addressed SQLite cache for expensive stage results.

Probe generations and judge verdicts cost GPU time or money; the cache makes
sure a resumed or repeated run, in any run directory and any recipe, never
pays for the same request twice. The key is a hash of everything that
determines the answer: (backend, model, request, parameters).

One file serves many processes: WAL journaling lets readers proceed while one
writer commits, and the busy timeout makes concurrent writers wait their turn
instead of failing.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

DEFAULT_CACHE_PATH = Path(os.environ.get("CURATE_CACHE", Path.home() / ".cache" / "curate" / "cache.sqlite"))


def cache_key(backend: str, model: str, request: Any, params: Any) -> str:
    """sha256 of the canonical JSON of what determines a result."""
    canonical = json.dumps(
        {"backend": backend, "model": model, "request": request, "params": params},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


class Cache:
    def __init__(self, path: Path = DEFAULT_CACHE_PATH) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0
        # A Ray Data actor sets its stage up in one thread and calls it from another (one call at a time).
        self._db = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, value TEXT NOT NULL, created REAL NOT NULL)"
        )

    def get(self, key: str) -> Any | None:
        row = self._db.execute("SELECT value FROM results WHERE key = ?", (key,)).fetchone()
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        return json.loads(row[0])

    def put(self, key: str, value: Any) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO results (key, value, created) VALUES (?, ?, ?)",
            (key, json.dumps(value, ensure_ascii=False), time.time()),
        )

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM results").fetchone()[0]

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Cache:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
