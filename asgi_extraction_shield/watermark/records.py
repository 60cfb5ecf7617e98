"""Where record-keeping watermarks keep the queries they marked.

In memory, per identity, bounded (the most recent ``per_identity`` distinct queries of at
most ``max_identities`` identities, least recently marked forgotten first; a query marked
again is not recorded twice); and, when a path
is set (``WATERMARK_RECORDS_PATH``), appended to a JSONL file, one object per line with
at least ``input`` (the query as the API took it), which ``extraction-shield verify
--records`` reads; on Redis, also to a list per identity (:mod:`..storage.redis_records`,
exported by ``extraction-shield records``). A file that cannot be written never fails a
request: the error is logged (as a ``storage_error`` line, at most once a minute) and the
memory copy is kept.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import orjson

from ..events import OccasionalErrorLog


class RecordSink(Protocol):
    def add(self, identity: str, records: list[dict[str, Any]]) -> None:
        """Take the records of ``identity``; never raises, never blocks."""
        ...


class RecordStore:
    def __init__(
        self,
        path: str | Path | None = None,
        per_identity: int = 1_000,
        max_identities: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if per_identity < 1 or max_identities < 1:
            raise ValueError("records: per_identity and max_identities must be at least 1")
        self.path = Path(path) if path else None
        self.per_identity = per_identity
        self.max_identities = max_identities
        self.write_errors = 0
        self._errors = OccasionalErrorLog("watermark records", clock=clock)
        self._by_identity: OrderedDict[str, OrderedDict[bytes, dict[str, Any]]] = OrderedDict()
        self.sink: RecordSink | None = None
        """Where records also go, e.g. Redis (:mod:`..storage.redis_records`)."""

    def add(self, identity: str, records: Iterable[tuple[bytes, dict[str, Any]]]) -> None:
        """Record ``(canonical key, record)`` pairs; a key already held is only refreshed."""
        kept = self._by_identity.pop(identity, None)
        if kept is None:
            kept = OrderedDict()
            while len(self._by_identity) >= self.max_identities:
                self._by_identity.popitem(last=False)
        new: list[dict[str, Any]] = []
        for key, record in records:
            if key in kept:
                kept.move_to_end(key)
                continue
            kept[key] = record
            new.append(record)
            if len(kept) > self.per_identity:
                kept.popitem(last=False)
        self._by_identity[identity] = kept
        if not new:
            return
        if self.path is not None:
            self._append(new)
        if self.sink is not None:
            self.sink.add(identity, new)

    def records(self, identity: str | None = None) -> list[dict[str, Any]]:
        """The records in memory, of one identity (its hashed key) or of all."""
        if identity is not None:
            return list(self._by_identity.get(identity, {}).values())
        return [r for kept in self._by_identity.values() for r in kept.values()]

    def identities(self) -> list[str]:
        return list(self._by_identity)

    def export(self, path: str | Path, identity: str | None = None) -> int:
        """Write the records in memory to a JSONL file; the number written."""
        rows = self.records(identity)
        with Path(path).open("wb") as out:
            for row in rows:
                out.write(_line(row))
        return len(rows)

    def _append(self, batch: list[dict[str, Any]]) -> None:
        assert self.path is not None
        try:
            data = b"".join(_line(row) for row in batch)
            with self.path.open("ab") as out:
                out.write(data)
        except (OSError, TypeError, orjson.JSONEncodeError) as exc:
            self.write_errors += 1
            self._errors.report(error=type(exc).__name__, errors=self.write_errors)


def _line(row: dict[str, Any]) -> bytes:
    return orjson.dumps(row) + b"\n"
