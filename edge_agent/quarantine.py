"""Blocks that broke their limits (memory, time, or killed their worker): refused from then
on, whoever uploads or queries them, across restarts (``root/quarantine.json``).

Owned by the edge's loop (``add``, written on the store thread by the caller); ``reason`` and
``__contains__`` read a snapshot that is replaced, never changed, so the network threads may
ask too.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)
_SHA_LEN = 64


class Quarantine:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: Mapping[str, Mapping[str, object]] = self._read(path)

    @staticmethod
    def _read(path: Path) -> dict[str, Mapping[str, object]]:
        try:
            got = json.loads(path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, RecursionError):
            log.warning("ignoring unreadable quarantine file %s", path)
            return {}
        if not isinstance(got, dict):
            return {}
        return {
            k: v
            for k, v in got.items()
            if isinstance(k, str) and len(k) == _SHA_LEN and isinstance(v, dict)
        }

    def __contains__(self, sha: object) -> bool:
        return sha in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def reason(self, sha: str) -> str | None:
        e = self._entries.get(sha)
        return None if e is None else str(e.get("reason", "quarantined"))

    def add(self, sha: str, kind: str, reason: str) -> bool:
        """Quarantine ``sha`` (in memory now; ``save`` writes it). False when it was already."""
        if sha in self._entries:
            return False
        entry = {"kind": kind, "reason": reason[:1000], "time": time.time()}
        self._entries = {**self._entries, sha: entry}
        return True

    def snapshot(self) -> bytes:
        return json.dumps(dict(self._entries), sort_keys=True).encode()

    def save(self, data: bytes) -> None:
        """Write a ``snapshot`` durably (the store thread)."""
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path)
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself, durable
        finally:
            os.close(fd)
